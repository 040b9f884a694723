"""The files of an output folder: atomic writes, the append-only response log, where stages look."""

from __future__ import annotations

import json

import pytest

from benchmarks import outputs


def test_write_atomic_replaces_the_whole_file_or_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    outputs.write_json(path, {"f1": 0.5, "name": "café"})
    assert path.read_bytes() == b'{\n  "f1": 0.5,\n  "name": "caf\\u00e9"\n}\n'
    outputs.write_atomic(path, "naïve\n")
    assert path.read_text(encoding="utf-8") == "naïve\n"
    outputs.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left

    def crash(src, dst):  # a crash before the rename: the reader still sees the old file whole
        raise OSError("disk gone")

    monkeypatch.setattr(outputs.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        outputs.write_atomic(path, "new")
    assert path.read_bytes() == b"\x00\x01"


def test_append_lines_drops_a_torn_last_line_before_appending(tmp_path):
    path = tmp_path / "responses.jsonl"
    outputs.append_lines(path, '{"id": "a"}\n')
    outputs.append_lines(path, '{"id": "b"}\n')
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    with open(path, "a") as file:
        file.write('{"id": "c", "resp')  # a crash mid-append
    outputs.append_lines(path, '{"id": "c"}\n')
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
    path.write_text('{"id": "a"')  # the only line torn
    outputs.append_lines(path, '{"id": "d"}\n')
    assert path.read_text() == '{"id": "d"}\n'


def test_read_append_log_ignores_only_a_torn_last_line(tmp_path):
    path = tmp_path / "responses.jsonl"
    assert outputs.read_append_log(path) == []  # not written yet
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "resp')
    assert outputs.read_append_log(path) == [{"id": "a"}, {"id": "b"}]
    path.write_text('{"id": "a"}\n{"id": "b", \n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"responses.jsonl:2: not a JSON object"):
        outputs.read_append_log(path)


def test_read_append_log_refuses_a_blank_line_inside_the_log(tmp_path):
    """append_lines writes whole lines only: a blank line before the last is corruption (or a
    hand edit), named with its file and line, not skipped; the final newline is no blank line."""
    path = tmp_path / "responses.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n')
    assert outputs.read_append_log(path) == [{"id": "a"}, {"id": "b"}]
    for blank in ("", "  ", "\t"):
        path.write_text(f'{{"id": "a"}}\n{blank}\n{{"id": "b"}}\n')
        with pytest.raises(ValueError, match=r"responses.jsonl:2: not a JSON object"):
            outputs.read_append_log(path)


def test_the_official_response_file_and_why_it_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `capture --out"):
        outputs.official_responses(tmp_path)
    (tmp_path / outputs.RESPONSES).write_text('{"id": "a"}\n')
    with pytest.raises(FileNotFoundError, match="its capture did not finish; rerun"):
        outputs.official_responses(tmp_path)
    for name in ("responses_official.json", "responses_official.jsonl"):  # AMBER's, the others'
        (tmp_path / name).write_text("[]")
        assert outputs.official_responses(tmp_path) == tmp_path / name
        (tmp_path / name).unlink()


def test_capture_info_names_the_missing_file_and_accepts_its_own_benchmark(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"missing {tmp_path / 'capture.json'}: run `capt"):
        outputs.capture_info(tmp_path, "easyvqa")
    info = {"settings": {"model": "default"}, "data": {"kinds": "yesno"}}
    (tmp_path / outputs.CAPTURE).write_text(json.dumps(info))
    assert outputs.capture_info(tmp_path, "easyvqa") == info
    assert outputs.capture_info(tmp_path) == info
    with pytest.raises(ValueError, match=r"is a capture of easyvqa \(data flags \['kinds'\]\)"):
        outputs.capture_info(tmp_path, "amber")
    # POPE's flags share --images with AMBER's: a capture of one is still refused by the other
    pope = {"questions_dir": "/q", "images": "/coco", "splits": "random", "questions": None}
    (tmp_path / outputs.CAPTURE).write_text(json.dumps({**info, "data": pope}))
    with pytest.raises(ValueError, match="is a capture of pope .* not of amber"):
        outputs.capture_info(tmp_path, "amber")
