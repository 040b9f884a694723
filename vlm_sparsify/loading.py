"""Load a VLM and its processor through the real `from_pretrained` path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from vlm_sparsify.data import check_image_token
from vlm_sparsify.recipe import Recipe, find_recipe, model_type_mismatch, transformers_class

DEFAULT_MODEL = str(resources.files("vlm_sparsify") / "tiny" / "easyvqa_llava")
"""The embedded offline default: a tiny LLaVA trained on easy-VQA, shipped with the package."""

MODEL_ALIASES = {"default": DEFAULT_MODEL, "vlm_sparsify/tiny-easyvqa-llava": DEFAULT_MODEL}
"""Short names for MODEL: `default` (or its id, `vlm_sparsify/tiny-easyvqa-llava`, which is not
on the Hub) is the embedded tiny easy-VQA LLaVA."""

_EMBEDDED_PARTS = Path(DEFAULT_MODEL).parts[-3:]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(model: str) -> str:
    """MODEL as a run keeps it: a Hub id as given, the folder an alias names, a local folder
    given by a relative path as its absolute path (a resumed run, fidelity and export find it
    from any directory); a folder of images (no config.json) is refused with the usual mistake
    named: the dataset given in MODEL's place."""
    model = MODEL_ALIASES.get(model, model)
    folder = Path(model)
    if folder.is_absolute() and not folder.exists() and folder.parts[-3:] == _EMBEDDED_PARTS:
        return DEFAULT_MODEL  # another install's embedded model (a file written before the move)
    has_metadata = any((folder / name).is_file() for name in ("metadata.jsonl", "metadata.csv"))
    if has_metadata and not (folder / "config.json").is_file():
        raise ValueError(
            f"MODEL '{model}' looks like a dataset (images + metadata, no config.json); give the "
            f"model first, e.g. `python -m vlm_sparsify default {model}`"
        )
    if folder.is_dir() and not folder.is_absolute():
        return str(folder.resolve())
    return model


def portable_model(model: str) -> str:
    """MODEL as a file records it: `resolve_model`'s, with the embedded model as `default` (its
    folder is where this checkout or install happens to be; a moved one must still find it)."""
    resolved = resolve_model(model)
    return "default" if Path(resolved).resolve() == Path(DEFAULT_MODEL).resolve() else resolved


def check_device(name: str) -> None:
    """`--device`: a device torch knows and this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device '{name}' is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
            raise ValueError(
                f"--device {name}: torch ({torch.__version__}, built {build}) sees {count} CUDA "
                "GPU(s); leave --device out to use the CPU"
            )
    elif device.type != "cpu":
        try:  # torch raises any of several errors for a backend it was not built with (mps, xpu)
            torch.empty(0, device=device)
            usable = device.type != "meta"  # its tensors hold no values
        except Exception:
            usable = False
        if not usable:
            raise ValueError(
                f"--device {name}: this torch ({torch.__version__}) cannot run models on "
                f"{device.type} devices; leave --device out to use a CUDA GPU or the CPU"
            )


def pick_device(device: str | None = None) -> torch.device:
    """`device` after `check_device`; none: cuda if available, else cpu."""
    if device:
        check_device(device)
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means bfloat16 on a GPU that supports it, float32 elsewhere."""
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _dtype_kwarg() -> str:
    # transformers renamed `torch_dtype` to `dtype` in 4.56
    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def processor_class(recipe: Recipe) -> type[Any]:
    """The class that loads the recipe's processor: with `[model] image_only_processor`, the
    concrete processor class (`AutoProcessor` resolved through `config.model_type`) without its
    video slot, so that transformers does not look for a video processor (which needs
    torchvision) that image training never uses."""
    cls = recipe.resolve_processor_class()
    if not recipe.image_only_processor:
        return cls
    if cls is transformers.AutoProcessor:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        name = PROCESSOR_MAPPING_NAMES.get(recipe.model_type)
        if not name:
            raise ValueError(
                f"recipe '{recipe.name}': [model] image_only_processor needs a concrete "
                f"processor_class (transformers knows none for model_type '{recipe.model_type}')"
            )
        cls = transformers_class(name)
    from vlm_sparsify.random_models import without_video_slot

    return without_video_slot(cls)


def check_model_type(model_id: str, config: Any, recipe: Recipe) -> None:
    """The checkpoint is of the recipe's `model_type`: a text-only checkpoint whose id matches a
    VLM recipe (`google/gemma-3-1b-it`, `Gemma3ForCausalLM`) would load with a random vision
    tower."""
    if config.model_type != recipe.model_type:
        raise model_type_mismatch(model_id, config.to_dict(), recipe)


def load_model_and_processor(
    model_id: str,
    recipe: Recipe | None = None,
    *,
    dtype: str = "auto",
    device: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any, Recipe]:
    """Model (eval mode, frozen), processor and the recipe that describes them (`model_id` may
    be an alias: `default`)."""
    model_id = resolve_model(model_id)
    recipe = recipe or find_recipe(model_id=model_id)
    torch_device = pick_device(device)
    hub_kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if token:
        hub_kwargs["token"] = token
    try:
        config = transformers.AutoConfig.from_pretrained(model_id, **hub_kwargs)
        check_model_type(model_id, config, recipe)  # before the weights load
        model = recipe.resolve_model_class().from_pretrained(
            model_id, **{_dtype_kwarg(): pick_dtype(dtype, torch_device)}, **hub_kwargs
        )
        processor = processor_class(recipe).from_pretrained(model_id, **hub_kwargs)
    except OSError as err:
        local = "" if Path(model_id).exists() else " (no such local folder either)"
        reason = " ".join(str(err).split())  # transformers' own messages span lines
        raise OSError(
            f"could not load model '{model_id}'{local} with recipe '{recipe.name}': {reason}"
        ) from None
    check_image_token(model.config, processor, recipe)
    model.to(torch_device).eval().requires_grad_(False)
    return model, processor, recipe
