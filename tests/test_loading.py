"""Loading a VLM: model names, dtypes, and the model as the tools get it (frozen, eval mode)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from vlm_sparsify.loading import (
    DEFAULT_MODEL,
    load_model_and_processor,
    pick_dtype,
    portable_model,
    resolve_model,
)


def test_auto_dtype_is_bfloat16_only_on_a_gpu_that_has_it(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert pick_dtype("auto", gpu) == (torch.bfloat16 if supported else torch.float32)
        assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("float16", cpu) == torch.float16
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp16'; choose auto, float32, bfloat16"):
        pick_dtype("fp16", cpu)


def test_model_names_resolve_to_what_a_run_records(tmp_path, monkeypatch):
    assert resolve_model("default") == DEFAULT_MODEL
    assert resolve_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a Hub id
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny") == str(tmp_path.resolve() / "tiny")
    assert resolve_model(str(tmp_path / "tiny")) == str(tmp_path / "tiny")
    (tmp_path / "tiny" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(ValueError, match="MODEL 'tiny' looks like a dataset"):
        resolve_model("tiny")
    (tmp_path / "tiny" / "config.json").write_text("{}")  # a model folder that holds a metadata.csv
    assert resolve_model("tiny") == str(tmp_path.resolve() / "tiny")


def test_files_record_the_embedded_model_by_name_so_a_moved_checkout_finds_it(tmp_path):
    assert portable_model(DEFAULT_MODEL) == portable_model("default") == "default"
    assert portable_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert portable_model(str(tmp_path)) == str(tmp_path)
    # a file an older version wrote from a checkout since moved: its path to the embedded model
    moved = tmp_path / "old-checkout" / "vlm_sparsify" / "tiny" / "easyvqa_llava"
    assert resolve_model(str(moved)) == DEFAULT_MODEL
    assert portable_model(str(moved)) == "default"
    (tmp_path / "elsewhere" / "easyvqa_llava").mkdir(parents=True)  # any other folder is kept
    assert resolve_model(str(tmp_path / "elsewhere" / "easyvqa_llava")).startswith(str(tmp_path))


def test_the_model_loads_frozen_in_eval_mode_in_the_dtype_asked(tiny_llava_dir, monkeypatch):
    asked = []
    from_pretrained = transformers.AutoConfig.from_pretrained

    def config_spy(*args, **kwargs):
        asked.append(kwargs)
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_spy)
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model, processor, recipe = load_model_and_processor(
            str(tiny_llava_dir), dtype=dtype, device="cpu"
        )
        assert recipe.model_type == "llava" and processor.tokenizer is not None
        assert not model.training and not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        assert {p.dtype for p in model.parameters()} == {expected}
    assert asked and not any(kwargs.get("trust_remote_code") for kwargs in asked)  # not asked
    with pytest.raises(OSError, match=r"could not load model '.*absent' \(no such local folder"):
        load_model_and_processor(str(Path(tiny_llava_dir) / "absent"), recipe, device="cpu")
