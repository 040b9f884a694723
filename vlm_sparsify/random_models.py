"""Tiny random models of a recipe's architecture, with an offline processor, for tests.

The model is the real transformers class built from the recipe's `[tiny]` config; the processor is
the real processor class assembled from a word-level tokenizer (the `tokenizers` library) and the
recipe's image processor class, so `save_pretrained` / `from_pretrained` round-trip offline.
"""

from __future__ import annotations

import copy
from difflib import get_close_matches
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlm_sparsify.recipe import Recipe, transformers_class

BASE_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
WORDS = [
    "user",
    "assistant",
    "system",
    "describe",
    "this",
    "image",
    "the",
    "a",
    "an",
    "is",
    "are",
    "there",
    "in",
    "of",
    "on",
    "what",
    "which",
    "color",
    "colour",
    "shape",
    "does",
    "not",
    "contain",
    "yes",
    "no",
    "answer",
    "question",
    "using",
    "single",
    "word",
    "or",
    "phrase",
    "circle",
    "rectangle",
    "triangle",
    "square",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "gray",
    "grey",
    "brown",
    "teal",
    "purple",
    "orange",
    "pink",
    "cat",
    "dog",
    "person",
    "car",
    "tree",
    "sky",
    "one",
    "two",
    "three",
    "picture",
    "photo",
    "of",
    "with",
    "and",
    "it",
    "left",
    "right",
    "top",
    "bottom",
    "small",
    "large",
    "big",
    ".",
    ",",
    "?",
    "!",
    ":",
    "'",
    "\n",
]


def build_tokenizer(recipe: Recipe, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer holding the recipe's special tokens (image token included)."""
    tiny = recipe.tiny
    specials = list(BASE_SPECIALS)
    for token in [
        tiny.get("image_token", recipe.prompt.image_token),
        *tiny.get("special_tokens", []),
    ]:
        if token not in specials:
            specials.append(token)
    words = [w for w in dict.fromkeys((*WORDS, *extra_words)) if w and w not in specials]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w+|[^\w]"), behavior="isolated"),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=specials[len(BASE_SPECIALS) :],
        **tiny.get("tokenizer", {}),
    )
    if "chat_template" in tiny:
        tokenizer.chat_template = tiny["chat_template"]
    return tokenizer


def build_tiny_processor(recipe: Recipe) -> Any:
    tiny = recipe.tiny
    tokenizer = build_tokenizer(recipe)
    image_processor_class = transformers_class(tiny["image_processor_class"])
    check_image_processor_keys(recipe, image_processor_class, tiny.get("image_processor", {}))
    image_processor = image_processor_class(**tiny.get("image_processor", {}))
    processor_kwargs = dict(tiny.get("processor", {}))
    if "chat_template" in tiny:
        processor_kwargs["chat_template"] = tiny["chat_template"]
    processor_class = transformers_class(tiny.get("processor_class", recipe.processor_class))
    if tiny.get("image_only_processor"):
        processor_class = without_video_slot(processor_class)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, **processor_kwargs)


def without_video_slot(processor_class: type[Any]) -> type[Any]:
    """`processor_class` with only its image processor and tokenizer as sub-processors.

    transformers 5.x checks every sub-processor slot against its base class, and without
    torchvision the video base class cannot be looked up, so `Qwen2VLProcessor(...,
    video_processor=None)` raises. `ProcessorMixin` takes its slots from `get_attributes`: this
    subclass leaves the video slots out of it and keeps the class's own `__init__`, so its other
    keywords (LLaVA-OneVision's `num_image_tokens`, `vision_feature_select_strategy`) are still
    saved to and read from `processor_config.json` (`save_pretrained` and `from_pretrained` take
    them from `__init__`'s signature), and everything else (token expansion, `__call__` on images
    and text) is the class's own code.
    """
    attributes = [a for a in processor_class.get_attributes() if "video" not in a]

    def get_attributes(cls: type) -> list[str]:
        return list(attributes)

    return type(
        processor_class.__name__,
        (processor_class,),
        {"get_attributes": classmethod(get_attributes)},
    )


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token (`convert_tokens_to_ids` of a string, not of a list)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise ValueError(f"{token!r} is not one token: its ids are {found}")
    return found


def _token_ids(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Config fields that must name token ids of the tokenizer we just built."""
    return {
        field: token_id(tokenizer, token)
        for field, token in recipe.tiny.get("token_id_fields", {}).items()
    }


def build_tiny_model(recipe: Recipe, processor: Any | None = None, seed: int = 0) -> Any:
    """A random, float32, eval-mode model of the recipe's architecture."""
    tiny = recipe.tiny
    if not tiny:
        raise ValueError(f"recipe '{recipe.name}' has no [tiny] section to build a test model")
    processor = processor or build_tiny_processor(recipe)
    config_kwargs = copy.deepcopy(tiny["config"])
    config_kwargs.update(_token_ids(recipe, processor.tokenizer))
    text_key = tiny.get("text_config_key", "text_config")
    text_config = config_kwargs.get(text_key, config_kwargs)
    text_config["vocab_size"] = max(text_config.get("vocab_size", 0), len(processor.tokenizer))
    config = transformers_class(tiny["config_class"])(**config_kwargs)
    check_config_keys(recipe, config, tiny["config"], "tiny.config")
    torch.manual_seed(seed)
    model = recipe.resolve_model_class()(config)
    fill_zero_weights(model, seed)
    return model.eval().requires_grad_(False)


def fill_zero_weights(model: Any, seed: int = 0) -> None:
    """Give every weight matrix that initialises to zero small random values: Gemma 3's image
    projection starts at zero, so its image tokens would all be the same vector and nothing of
    the image would reach the language model (InternVL's position embeddings too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def check_config_keys(recipe: Recipe, config: Any, values: dict[str, Any], table: str) -> None:
    """Every key of a `[tiny.config...]` table is a field of the config class it reaches:
    transformers keeps an unknown keyword as an attribute nobody reads, so a typo
    (`num_hiden_layers`) would build a model of the default size silently."""
    cls = type(config)
    fields = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for key, value in values.items():
        if key not in fields:
            close = get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(
                f"recipe '{recipe.name}': [{table}] {key} is not a field of {cls.__name__}{hint}"
            )
        sub = getattr(config, key, None)
        if isinstance(value, dict) and hasattr(sub, "to_dict"):
            check_config_keys(recipe, sub, value, f"{table}.{key}")


def check_image_processor_keys(recipe: Recipe, cls: type, values: dict[str, Any]) -> None:
    """Every key of `[tiny.image_processor]` is a keyword the image processor class reads (its
    `valid_kwargs`, where transformers declares them): it keeps an unknown keyword as an
    attribute nobody reads, so a typo (`sizee`) would build a processor of the default size."""
    declared = getattr(cls, "valid_kwargs", None)
    known = set(getattr(declared, "__required_keys__", ())) | set(
        getattr(declared, "__optional_keys__", ())
    )
    for key in values:
        if known and key not in known:
            close = get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(
                f"recipe '{recipe.name}': [tiny.image_processor] {key} is not a keyword of "
                f"{cls.__name__}{hint}"
            )


def build_tiny(recipe: Recipe, seed: int = 0) -> tuple[Any, Any]:
    processor = build_tiny_processor(recipe)
    return build_tiny_model(recipe, processor, seed), processor
