"""Feature store: exact round trip, resume, crash leftovers, size per feature."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from benchmarks.store import FeatureStore, StoreMeta

HOOKPOINTS = [f"model.language_model.layers.{i}.mlp" for i in range(3)]


def topk_sample(sample_id: str, rows: int, num_latents: int, k: int, seed: int):
    """A sample shaped like a TopK coder's output: k distinct latents per row and layer."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, len(HOOKPOINTS), num_latents, generator=generator)
    values, indices = scores.topk(k, dim=-1)
    regions = {"image": [(0, 2)], "prompt": [(2, 3)], "response": [(3, rows)]}
    return sample_id, indices, (values * 7).to(torch.bfloat16), regions


def make_store(path, num_latents=65536, k=4, value_dtype="bfloat16"):
    return FeatureStore(path, StoreMeta(HOOKPOINTS, k, num_latents, value_dtype))


def assert_same(stored, original):
    sample_id, indices, values, regions = original
    assert stored.id == sample_id
    assert stored.indices.dtype == torch.int64
    assert torch.equal(stored.indices, indices)
    assert stored.values.dtype == values.dtype
    assert torch.equal(stored.values, values)
    assert stored.regions == regions


@pytest.mark.parametrize("num_latents", [65536, 70000])
def test_round_trip_is_exact(tmp_path, num_latents):
    # 65536 latents: indices above 32767 go through the int16 / uint16 reinterpretation
    store = make_store(tmp_path / "store", num_latents=num_latents)
    samples = [
        topk_sample(f"s{i}", rows=5 + i, num_latents=num_latents, k=4, seed=i) for i in range(4)
    ]
    assert max(s[1].max() for s in samples) > 32767
    store.append(samples[:2])
    store.append(samples[2:])
    # the writer reads back what a reader opening the folder reads (its index kept in memory)
    for stored, original in zip(store, samples, strict=True):
        assert_same(stored, original)

    reopened = FeatureStore(tmp_path / "store")
    assert reopened.meta.index_dtype == ("int16" if num_latents <= 65536 else "int32")
    for stored, original in zip(reopened, samples, strict=True):
        assert_same(stored, original)
    assert_same(reopened.load("s2"), samples[2])
    shard = next(reopened.shards())
    expected = samples[1][2].float().numpy()
    assert (shard.values(slice(5, 11)) == expected).all()


def test_values_in_float32_are_kept_exactly(tmp_path):
    store = make_store(tmp_path / "store", value_dtype="float32")
    sample_id, indices, values, regions = topk_sample("a", 4, 65536, 4, seed=0)
    exact = torch.rand(values.shape, dtype=torch.float32)
    store.append([(sample_id, indices, exact, regions)])
    assert torch.equal(FeatureStore(tmp_path / "store").load("a").values, exact)


def test_resume_skips_stored_ids(tmp_path):
    store = make_store(tmp_path / "store")
    a, b, c = (topk_sample(name, 4, 65536, 4, seed=i) for i, name in enumerate("abc"))
    assert store.append([a, b]) == 2
    reopened = FeatureStore(tmp_path / "store")
    assert reopened.append([b, c]) == 1
    assert reopened.append([a]) == 0
    assert FeatureStore(tmp_path / "store").ids() == ["a", "b", "c"]
    assert reopened.append([topk_sample("d", 4, 65536, 4, seed=5)] * 2) == 1  # once per batch
    assert FeatureStore(tmp_path / "store").ids() == ["a", "b", "c", "d"]
    assert len(list((tmp_path / "store" / "shards").iterdir())) == 3


def test_orphan_shard_is_ignored_and_overwritten(tmp_path):
    store = make_store(tmp_path / "store")
    a, b = topk_sample("a", 4, 65536, 4, seed=0), topk_sample("b", 6, 65536, 4, seed=1)
    store.append([a])
    # a crash after the rename of shard 1 and before its index line
    store.shard_path(1).write_bytes(b"half of a shard nobody indexed")
    reopened = FeatureStore(tmp_path / "store")
    assert reopened.ids() == ["a"]
    assert [s.id for s in reopened] == ["a"]
    reopened.append([b])
    assert_same(FeatureStore(tmp_path / "store").load("b"), b)


def test_torn_index_line_is_dropped(tmp_path):
    store = make_store(tmp_path / "store")
    a, b = topk_sample("a", 4, 65536, 4, seed=0), topk_sample("b", 4, 65536, 4, seed=1)
    store.append([a])
    with open(store.index_path, "a") as index:
        index.write('{"id": "b", "shard": 1, "sta')
    reopened = FeatureStore(tmp_path / "store")
    assert reopened.ids() == ["a"]
    reopened.append([b])
    lines = store.index_path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b"]
    assert_same(FeatureStore(tmp_path / "store").load("b"), b)


def test_a_torn_last_line_whose_json_is_whole_is_dropped_too(tmp_path):
    # the crash cut just the newline: the next append truncates the line, so it is not a sample
    store = make_store(tmp_path / "store")
    a, b = topk_sample("a", 4, 65536, 4, seed=0), topk_sample("b", 4, 65536, 4, seed=1)
    store.append([a, b])
    index = store.index_path.read_text()
    store.index_path.write_text(index.rstrip("\n"))
    reopened = FeatureStore(tmp_path / "store")
    assert reopened.ids() == ["a"]
    assert reopened.append([b]) == 1
    assert FeatureStore(tmp_path / "store").ids() == ["a", "b"]


@pytest.mark.parametrize("bad", ["{not json", '{"id": "x"}', "", "[1, 2]"])
def test_a_bad_index_line_before_the_last_is_an_error_naming_it(tmp_path, bad):
    store = make_store(tmp_path / "store")
    a, b = topk_sample("a", 4, 65536, 4, seed=0), topk_sample("b", 4, 65536, 4, seed=1)
    store.append([a])
    store.append([b])
    first, second = store.index_path.read_text().splitlines()
    for lines in ([bad, first, second], [first, second, bad]):  # complete lines, newline-ended
        store.index_path.write_text("".join(line + "\n" for line in lines))
        line = lines.index(bad) + 1
        with pytest.raises(ValueError, match=f"index.jsonl:{line}: not a sample record"):
            FeatureStore(tmp_path / "store").ids()


def test_a_truncated_shard_is_an_error_naming_it(tmp_path):
    store = make_store(tmp_path / "store")
    store.append([topk_sample("a", 4, 65536, 4, seed=0)])
    store.append([topk_sample("b", 40, 65536, 4, seed=1)])
    path = store.shard_path(1)
    whole = path.read_bytes()
    for size in (len(whole) - 100, 300, 5, 0):
        path.write_bytes(whole[:size])
        reopened = FeatureStore(tmp_path / "store")
        with pytest.raises(ValueError, match=r"shard .*00001\.safetensors cannot be read"):
            list(reopened)
        with pytest.raises(ValueError, match=r"00001\.safetensors"):
            reopened.load("b")
    assert FeatureStore(tmp_path / "store").load("a").id == "a"
    path.write_bytes(store.shard_path(0).read_bytes())  # a whole shard, but too short for b
    with pytest.raises(ValueError, match=r"00001\.safetensors holds 4 rows.*'b' at rows 0..40"):
        FeatureStore(tmp_path / "store").load("b")
    # one row short: an index line claiming a row past the shard's end is refused too
    index = store.index_path.read_text().replace('"stop": 4,', '"stop": 5,')
    store.index_path.write_text(index)
    with pytest.raises(ValueError, match=r"00000\.safetensors holds 4 rows.*'a' at rows 0..5"):
        FeatureStore(tmp_path / "store").load("a")


def test_bytes_per_active_feature(tmp_path):
    k = 32
    store = make_store(tmp_path / "store", num_latents=8192, k=k)
    samples = [topk_sample(f"s{i}", 60, 8192, k, seed=i) for i in range(8)]
    store.append(samples[:4])
    store.append(samples[4:])
    per_feature = store.bytes_per_active_feature()
    files = [*(tmp_path / "store" / "shards").iterdir(), store.index_path, store.path / "meta.json"]
    pairs = 8 * 60 * len(HOOKPOINTS) * k
    assert per_feature == pytest.approx(sum(f.stat().st_size for f in files) / pairs)
    assert 4.0 < per_feature <= 4.5  # 2-byte index + bf16 value, plus headers and index lines


def test_mismatched_meta_and_shapes_are_refused(tmp_path):
    make_store(tmp_path / "store", k=4)
    with pytest.raises(ValueError, match="use a new folder"):
        make_store(tmp_path / "store", k=8)
    store = FeatureStore(tmp_path / "store")
    sample_id, indices, values, regions = topk_sample("a", 4, 65536, 4, seed=0)
    with pytest.raises(ValueError, match="k=4"):
        store.append([(sample_id, indices[..., :2], values[..., :2], regions)])
    with pytest.raises(ValueError, match="region 'response'"):
        store.append([(sample_id, indices, values, {"response": [(3, 9)]})])
    with pytest.raises(ValueError, match="region 'response'"):  # one row past its 4
        store.append([(sample_id, indices, values, {"response": [(3, 5)]})])
    too_large = indices.clone()
    too_large[0, 0, 0] = 65536  # one past the last latent
    with pytest.raises(ValueError, match="latent index outside"):
        store.append([(sample_id, too_large, values, regions)])
    assert store.ids() == []
    with pytest.raises(FileNotFoundError, match="meta.json"):
        FeatureStore(tmp_path / "elsewhere")


def test_a_store_older_than_fingerprints_resumes_and_takes_one(tmp_path):
    make_store(tmp_path / "store")  # no fingerprint, as written before they were recorded
    fingerprinted = StoreMeta(HOOKPOINTS, 4, 65536, "bfloat16", fingerprint="abc")
    with pytest.raises(ValueError, match="use a new folder"):
        FeatureStore(tmp_path / "store", replace(fingerprinted, k=8))
    assert FeatureStore(tmp_path / "store").meta.fingerprint is None  # a refusal writes nothing
    assert FeatureStore(tmp_path / "store", fingerprinted).meta == fingerprinted
    assert FeatureStore(tmp_path / "store").meta.fingerprint == "abc"


def test_the_index_past_16_bits_round_trips_at_65537_latents(tmp_path):
    # 65,536 latents is the most 16 bits hold (indices 0-65535); index 65536 needs 32
    assert StoreMeta(HOOKPOINTS, 1, 65536).index_dtype == "int16"
    assert StoreMeta(HOOKPOINTS, 1, 65537).index_dtype == "int32"
    store = make_store(tmp_path / "store", num_latents=65537, k=2)
    indices = torch.tensor([[[65536, 0], [65535, 1], [32768, 65536]]])
    sample = ("s0", indices, torch.ones(1, 3, 2, dtype=torch.bfloat16), {"response": [(0, 1)]})
    store.append([sample])
    assert_same(FeatureStore(tmp_path / "store").load("s0"), sample)


@pytest.mark.parametrize(
    ("stage", "file", "text", "error"),
    [
        ("classify", "capture.json", "[]", "capture.json holds a JSON list where an object is"),
        ("classify", "capture.json", '{"settings": {}}', "capture.json lacks data: not the file"),
        ("analyze", "classification.json", "[]", "classification.json holds a JSON list"),
        ("plot", "features.json", "{}", "features.json lacks features, total_good_samples"),
        ("analyze", "store/meta.json", "[1]", "meta.json holds a JSON list where an object is"),
    ],
)
def test_a_json_file_of_another_shape_is_one_line_naming_it(tmp_path, stage, file, text, error):
    """Valid JSON that is not the file the stage wrote (a list, a missing key) ended in a
    TypeError / AttributeError / KeyError traceback."""
    from benchmarks.__main__ import run

    make_store(tmp_path / "store", num_latents=16).append([topk_sample("a", 5, 16, 4, 0)])
    (tmp_path / "capture.json").write_text('{"settings": {}, "data": {}}')
    (tmp_path / "classification.json").write_text('{"GOOD": [{"id": "a"}], "BAD": []}')
    (tmp_path / file).write_text(text)
    with pytest.raises(SystemExit, match=f"easyvqa {stage}: .*{error}"):
        run(["easyvqa", stage, "--out", str(tmp_path), "--force"] if stage == "analyze"
            else ["easyvqa", stage, "--out", str(tmp_path)])  # fmt: skip
