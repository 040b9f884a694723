"""Reading a run's files: a truncated, corrupt or foreign file is one error naming it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vlm_sparsify.files import (
    UnreadableFileError,
    load_safetensors,
    load_torch,
    open_safetensors,
    read_json,
    read_jsonl,
    unreadable,
)


class Payload:
    """A pickled object of a class: code that torch.load(weights_only=False) would import."""


def test_read_json_names_the_file_and_what_is_wrong(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"sae": {"k": 4}, "cross_layer": 2}')
    assert read_json(path, keys=("sae",)) == {"sae": {"k": 4}, "cross_layer": 2}
    with pytest.raises(UnreadableFileError, match=rf"{path} lacks hookpoints, run: not the file"):
        read_json(path, keys=("sae", "hookpoints", "run"))
    path.write_text("[1, 2]")
    assert read_json(path) == [1, 2]
    for keys in ((), ("sae",)):  # an object is expected even when no key is required
        with pytest.raises(UnreadableFileError, match="holds a JSON list where an object is"):
            read_json(path, keys=keys)
    path.write_text('{"sae": ')
    with pytest.raises(UnreadableFileError, match=rf"{path} is not valid JSON: Expecting value"):
        read_json(path)
    path.write_bytes(b'{"name": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(UnreadableFileError, match=rf"{path} is not valid JSON"):
        read_json(path)


def test_read_json_reads_utf8_with_a_byte_order_mark_and_utf16(tmp_path):
    """The bytes decide, not the locale: a file saved by an editor that writes a BOM, and JSON's
    other encodings, read as the same document."""
    path = tmp_path / "features.json"
    document = {"name": "café", "layers": [0, 3]}
    for data in (
        json.dumps(document, ensure_ascii=False).encode("utf-8"),
        b"\xef\xbb\xbf" + json.dumps(document, ensure_ascii=False).encode("utf-8"),
        json.dumps(document, ensure_ascii=False).encode("utf-16"),
    ):
        path.write_bytes(data)
        assert read_json(path) == document


def test_read_jsonl_skips_blank_lines_and_a_byte_order_mark_and_numbers_lines_from_1(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(UnreadableFileError, match=rf"{path}:3: not valid JSON"):
        read_jsonl(path)


def test_load_torch_loads_tensors_and_refuses_code_and_damage(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"global_step": 3, "w": torch.ones(2)}, path)
    state = load_torch(path)
    assert state["global_step"] == 3 and torch.equal(state["w"], torch.ones(2))
    torch.save({"global_step": 3, "extra": Payload()}, path)
    with pytest.raises(UnreadableFileError, match=rf"cannot read {path}: it is not a readable "):
        load_torch(path)
    torch.save({"global_step": 3}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UnreadableFileError, match="not a readable torch file"):
        load_torch(path)
    with pytest.raises(FileNotFoundError):  # missing: the loader's own error, not "corrupt"
        load_torch(tmp_path / "absent.pt")


def test_safetensors_damage_and_folders_are_named(tmp_path):
    path = tmp_path / "sae.safetensors"
    save_file({"W": torch.arange(4.0)}, str(path))
    assert torch.equal(load_safetensors(path)["W"], torch.arange(4.0))
    with open_safetensors(path) as f:
        assert torch.equal(f.get_tensor("W"), torch.arange(4.0))
    path.write_bytes(path.read_bytes()[:30])
    for read in (load_safetensors, lambda p: open_safetensors(p).__enter__()):
        with pytest.raises(UnreadableFileError, match=rf"cannot read {path}: it is not a readable"):
            read(path)
    for read in (load_safetensors, lambda p: open_safetensors(p).__enter__()):
        with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder, not a safetensors"):
            read(tmp_path)


def test_the_error_keeps_the_first_line_of_the_loaders_message(tmp_path):
    error = unreadable(tmp_path / "x.pt", "torch file", RuntimeError("bad zip\n  at frame 3"))
    assert str(error) == (
        f"cannot read {tmp_path / 'x.pt'}: it is not a readable torch file (truncated or "
        "corrupt? bad zip)"
    )
    assert str(unreadable("x", "file", EOFError())).endswith("(truncated or corrupt? EOFError)")
