import json

import pytest

from benchmarks.__main__ import run
from benchmarks.easyvqa.items import load_items
from benchmarks.responses import load_records
from tests.benchmarks import shared_data


@pytest.mark.parametrize("text", ["", "\n\n", "[]"])
def test_a_file_without_records_is_an_error(tmp_path, text: str) -> None:
    path = tmp_path / "responses.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match="holds no records"):
        load_records(path)
    # not a table of zero splits with mean F1 0.00
    argv = ["--questions-dir", str(shared_data("pope", "coco")), "--responses", str(path)]
    with pytest.raises(SystemExit, match="holds no records"):
        run(["pope", "score", *argv])


def test_a_truncated_json_array_names_the_file(tmp_path) -> None:
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{"id": 1, "response": "Yes"}] * 3)[:-20])
    with pytest.raises(ValueError, match="responses.json: not a valid JSON array"):
        load_records(path)


def test_errors_show_a_shortened_record(tmp_path) -> None:
    path = tmp_path / "responses.json"
    wrapped = {"responses": [{"id": i, "response": "Yes"} for i in range(1, 10_001)]}
    path.write_text(json.dumps([wrapped]))
    with pytest.raises(SystemExit, match="lacks id, response") as error:
        run(["amber", "score", "--data-dir", str(shared_data("amber")), "--responses", str(path)])
    assert len(str(error.value)) < 300  # not the 10,000 wrapped records


def test_a_corrupt_capture_json_or_amber_file_is_named(tmp_path) -> None:
    (tmp_path / "capture.json").write_text('{"settings": ')  # a capture killed mid-write
    with pytest.raises(SystemExit, match="capture.json is not valid JSON"):
        run(["pope", "classify", "--out", str(tmp_path)])
    data = tmp_path / "amber"
    data.mkdir()
    (data / "relation.json").write_text('{"dog": [')
    responses = tmp_path / "responses.json"
    responses.write_text('[{"id": 1, "response": "A dog."}]')
    with pytest.raises(SystemExit, match="relation.json is not valid JSON"):
        run(["amber", "score", "--data-dir", str(data), "--responses", str(responses)])


@pytest.mark.parametrize(
    "benchmark, extra",
    [
        ("easyvqa", []),
        ("amber", []),
        ("pope", []),
        ("pope", ["--question-file", "llava_pope_test.jsonl"]),
    ],
)
def test_score_out_refuses_a_responses_file_too(tmp_path, benchmark: str, extra: list) -> None:
    """`score --responses F --out D` scored F into D/metrics.json (easy-VQA), or ignored F (AMBER,
    POPE): D/metrics.json must stay D's capture's metrics."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"of": "this capture"}')
    responses = tmp_path / "other.jsonl"
    first = load_items()[0].id  # an easy-VQA item: its score would replace D's metrics
    responses.write_text(json.dumps({"id": first, "response": "yes"}) + "\n")
    flags = ["--responses", str(responses), *extra]
    with pytest.raises(SystemExit, match=f"{flags[0]}.* with --out: --out scores the responses"):
        run([benchmark, "score", *flags, "--out", str(out)])
    assert json.loads((out / "metrics.json").read_text()) == {"of": "this capture"}
    if extra:  # a question file alone is refused as well: it only reads a --responses file
        with pytest.raises(SystemExit, match="--question-file with --out"):
            run([benchmark, "score", *extra, "--out", str(out)])


def test_a_json_array_after_blank_space_is_read_as_an_array(tmp_path) -> None:
    path = tmp_path / "responses.json"
    path.write_text('\n  [{"id": 1, "response": "Yes"},\n {"id": 2, "response": "No"}]\n')
    assert load_records(path) == [{"id": 1, "response": "Yes"}, {"id": 2, "response": "No"}]
