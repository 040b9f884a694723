"""Recipes: TOML files that teach vlm_sparsify a VLM family without code.

A recipe says how to load the model (a transformers class name, never an arbitrary import),
where its language-model decoder layers, MLPs and vision layers are, how prompts look, which
dataset trains it by default, and how to build a tiny random model of the architecture for tests.
See `docs/recipes.md` for every field.
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import MISSING, dataclass, field, fields
from difflib import get_close_matches
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import transformers

from vlm_sparsify.files import read_json


@dataclass(frozen=True)
class PromptFormat:
    image_token: str
    """The placeholder the processor expands into image tokens (e.g. `<image>`)."""
    template: str
    """Prompt with `{question}`; used when `use_chat_template` is false."""
    use_chat_template: bool = False
    """Build prompts with the processor's chat template instead of `template`."""
    short_answer_suffix: str = ""
    """Appended to yes/no and short-answer questions (LLaVA-1.5's POPE protocol)."""
    caption_question: str = "Describe this image."
    answer_separator: str = " "
    """Put between the prompt and the answer when training on question-answer pairs."""
    image_pad_token: str = ""
    """The token repeated once per patch, when it differs from `image_token` (Qwen2-VL's
    `<|image_pad|>`, Gemma-3's `<image_soft_token>`)."""
    answer_as_suffix: bool = False
    """Give the answer to the processor as its `suffix` instead of appending it to the prompt
    (PaliGemma: the suffix is the causal part, the prompt the bidirectional prefix)."""


@dataclass(frozen=True)
class DatasetDefaults:
    path: str
    split: str = "train"
    image_column: str = "image"
    text_column: str = "text"
    """Column with the answer / caption text (empty: images with the question only)."""
    question_column: str = ""
    """Column with the question; empty means every example uses `question`."""
    question: str = "Describe this image."


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model_type: str
    model_ids: tuple[str, ...]
    model_class: str
    processor_class: str
    decoder_layers: tuple[str, ...]
    mlp: str
    vision_layers: tuple[str, ...]
    prompt: PromptFormat
    dataset: DatasetDefaults
    tiny: dict[str, Any] = field(default_factory=dict)
    image_only_processor: bool = False
    """Load the processor with its image processor and tokenizer only (no video processor)."""
    train_defaults: dict[str, Any] = field(default_factory=dict)
    """Training flags this model defaults to when not passed (the `[train]` table)."""
    source: str = ""
    """Where the recipe was read from."""

    def matches(self, model_id: str) -> bool:
        return any(fnmatchcase(model_id, pattern) for pattern in self.model_ids)

    def resolve_model_class(self) -> type[Any]:
        return transformers_class(self.model_class)

    def resolve_processor_class(self) -> type[Any]:
        return transformers_class(self.processor_class)

    def format_prompt(self, question: str, processor: Any = None) -> str:
        """The prompt for one image and one question, ready for the processor."""
        if not self.prompt.use_chat_template:
            return self.prompt.template.format(question=question)
        if processor is None or getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"recipe '{self.name}' uses the chat template, but the processor has none"
            )
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": question}],
            }
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True)


def transformers_class(name: str) -> type[Any]:
    """Resolve a class name inside `transformers` only: recipes never import arbitrary code."""
    obj = getattr(transformers, name, None)
    if not isinstance(obj, type):
        raise ValueError(
            f"'{name}' is not a class exported by transformers {transformers.__version__}; "
            "recipes may only name transformers classes (check the spelling, or upgrade "
            "transformers)"
        )
    return obj


STR_LIST = "a string or a list of strings"
"""How a recipe field holding candidate paths or globs is described in errors."""


def _fields_of(table: type) -> dict[str, Any]:
    """The keys of a table read straight into the dataclass `table`, with their types."""
    return {f.name: {"str": str, "bool": bool}[str(f.type)] for f in fields(table)}


def _required_of(table: type) -> tuple[str, ...]:
    """The fields of the dataclass `table` without a default."""
    return tuple(f.name for f in fields(table) if f.default is MISSING)


SCHEMA: dict[str, dict[str, Any]] = {
    "": {
        "name": str, "description": str, "model_type": str, "model_ids": STR_LIST,
        "model": dict, "layers": dict, "prompt": dict, "dataset": dict, "train": dict,
        "tiny": dict,
    },
    "model": {"class": str, "processor_class": str, "image_only_processor": bool},
    "layers": {"decoder": STR_LIST, "mlp": str, "vision": STR_LIST},
    "prompt": _fields_of(PromptFormat),
    "dataset": _fields_of(DatasetDefaults),
    "tiny": {
        "config_class": str, "config": dict, "text_config_key": str, "token_id_fields": dict,
        "processor_class": str, "processor": dict, "image_processor_class": str,
        "image_processor": dict, "special_tokens": list, "tokenizer": dict,
        "chat_template": str, "requires": list, "image_only_processor": bool,
        "image_token": str, "image_size": int,  # image_size: read by nothing (older recipes)
    },
}  # fmt: skip
"""Every key a recipe table may hold, with its type (`[train]` is checked against the flags)."""

REQUIRED = {
    "": ("name", "model_type", "model", "layers", "prompt", "dataset"),
    "model": ("class",),
    "layers": ("decoder",),
    "prompt": _required_of(PromptFormat),
    "dataset": _required_of(DatasetDefaults),
}
"""Keys a recipe must have, by table."""

_TYPE_NAMES = {
    str: "a string", bool: "true or false", int: "an integer", dict: "a table", list: "a list"
}  # fmt: skip


class RecipeError(ValueError):
    """A recipe file that cannot be used: names the table and key."""


def _fits_type(value: Any, kind: Any) -> bool:
    if kind == STR_LIST:
        return isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
    return isinstance(value, kind)


def check_table(recipe: str, table: str, data: dict[str, Any]) -> None:
    """Refuse a key the recipe format does not know, a value of the wrong type or a missing
    required key in one table (`""`: the top level), naming the table and the key."""
    where = f"[{table}]" if table else "the top level"
    schema = SCHEMA[table]
    for key, value in data.items():
        if key not in schema:
            close = get_close_matches(key, schema, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            kind = "table" if isinstance(value, dict) else "key"
            raise RecipeError(
                f"recipe {recipe}: unknown {kind} '{key}' at {where}{hint}; known: "
                f"{', '.join(schema)} (docs/recipes.md)"
            )
        kind = schema[key]
        if not _fits_type(value, kind):
            raise RecipeError(
                f"recipe {recipe}: {where} {key} = {value!r} must be "
                f"{kind if isinstance(kind, str) else _TYPE_NAMES[kind]}"
            )
    for key in REQUIRED.get(table, ()):
        if key not in data:
            raise RecipeError(f"recipe {recipe} lacks the key '{key}' at {where}")


def check_train_value(recipe: str, key: str, value: Any, target: object) -> None:
    """A recipe's [train] value has the type of the flag it sets, the field `key` of the config
    dataclass `target` (k = "four" is refused here, not in training)."""
    hint = get_type_hints(type(target)).get(key)
    if hint is not None and not _fits_hint(value, hint):
        raise RecipeError(
            f"recipe '{recipe}': [train] {key} = {value!r} is not a valid --{key} "
            f"(expected {getattr(hint, '__name__', hint)})"
        )


def _fits_hint(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return any(_fits_hint(value, option) for option in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_fits_hint(v, get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _as_tuple(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def check_template(recipe: str, prompt: PromptFormat) -> None:
    """The prompt template uses no placeholder but `{question}`, and (without the chat
    template) holds `{question}` and the image token."""
    try:
        prompt.template.format(question="")
    except (KeyError, IndexError, ValueError) as err:
        raise RecipeError(
            f"recipe {recipe}: [prompt] template {prompt.template!r} has a placeholder other "
            f"than {{question}} ({type(err).__name__}: {err}); write a literal brace as {{{{ or }}}}"
        ) from None
    if prompt.use_chat_template:
        return
    for needed in ("{question}", prompt.image_token):
        if needed not in prompt.template:
            raise RecipeError(
                f"recipe {recipe}: [prompt] template {prompt.template!r} lacks {needed!r}"
            )


def parse_recipe(data: dict[str, Any], source: str = "") -> Recipe:
    """Build a `Recipe` from parsed TOML; an unknown table or key, a value of the wrong type
    or a missing key is a `RecipeError` naming the table and key."""
    label = repr(source or data.get("name"))
    check_table(label, "", data)
    for table in ("model", "layers", "prompt", "dataset", "tiny"):
        check_table(label, table, data.get(table, {}))
    layers = data["layers"]
    decoder = _as_tuple(layers["decoder"])
    if not decoder:
        raise RecipeError(f"recipe {label}: [layers] decoder lists no path")
    prompt = PromptFormat(**data["prompt"])
    check_template(label, prompt)
    return Recipe(
        name=data["name"],
        description=data.get("description", ""),
        model_type=data["model_type"],
        model_ids=_as_tuple(data.get("model_ids", [])),
        model_class=data["model"]["class"],
        processor_class=data["model"].get("processor_class", "AutoProcessor"),
        image_only_processor=data["model"].get("image_only_processor", False),
        decoder_layers=decoder,
        mlp=layers.get("mlp", "mlp"),
        vision_layers=_as_tuple(layers.get("vision", [])),
        prompt=prompt,
        dataset=DatasetDefaults(**data["dataset"]),
        tiny=data.get("tiny", {}),
        train_defaults=data.get("train", {}),
        source=source,
    )


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    with path.open("rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"recipe file {path} is not valid TOML: {err}") from None
    return parse_recipe(data, source=str(path))


RUN_RECIPE_FILE = "recipe.toml"
"""A run trained with `--recipe PATH` keeps a copy of that file under this name."""


def is_recipe_file(recipe: str) -> bool:
    """`--recipe` names a TOML file (not a shipped recipe): the test `find_recipe` applies."""
    return recipe.endswith(".toml") or Path(recipe).is_file()


def run_recipe_file(run_dir: str | Path, recipe: str | None) -> Path | None:
    """The TOML file a run's recipe is read from: when its config.json's `recipe` is a path,
    the run's own copy (RUN/recipe.toml: the file it trained with, found from any directory),
    else (a run saved before copies were kept) that path; None for a shipped recipe."""
    if not recipe or not is_recipe_file(recipe):
        return None
    copy = Path(run_dir) / RUN_RECIPE_FILE
    return copy if copy.is_file() else Path(recipe)


def run_recipe(run_dir: str | Path, recipe: str | None, model_id: str | None) -> Recipe:
    """The recipe a run trained with (`recipe`: its config.json's value)."""
    file = run_recipe_file(run_dir, recipe)
    return find_recipe(str(file) if file else recipe or None, model_id=model_id)


def shipped_recipes() -> dict[str, Recipe]:
    """Every recipe shipped with the package, by name."""
    recipes = {}
    for entry in sorted(resources.files("vlm_sparsify.recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            recipe = parse_recipe(tomllib.loads(entry.read_text()), source=entry.name)
            recipes[recipe.name] = recipe
    return recipes


def _local_config(model_id: str) -> dict[str, Any] | None:
    """`config.json` of a local model folder (no network, no remote code)."""
    config = Path(model_id) / "config.json"
    if config.is_file():
        return read_json(config, keys=())
    return None


def _check_model_path(model_id: str) -> None:
    """A model no recipe matches that is a folder without config.json, or no folder and no Hub
    id either (`./my-model`, `/data/llava`): a wrong path, not a model that needs a recipe."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(model_id).is_dir():
        raise FileNotFoundError(
            f"'{model_id}' has no config.json: not a model folder (save_pretrained writes one)"
        )
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"no model folder '{model_id}', and it is not a Hub id either: check the path"
        ) from None


def model_type_mismatch(
    model_id: str, config: dict[str, Any], recipe: Recipe, why: str = ""
) -> ValueError:
    """The error for a checkpoint whose `config.model_type` is not the recipe's (`config`: its
    config.json as a dict): says what the model is, e.g. a text-only model with no vision
    tower, instead of loading it with the wrong class."""
    model_type = config.get("model_type")
    architectures = ", ".join(config.get("architectures") or []) or "?"
    text_only = str(model_type).endswith("_text") or architectures.endswith("ForCausalLM")
    what = (
        "a text-only model (no vision tower): vlm_sparsify trains on vision-language models"
        if text_only
        else "pass --recipe NAME or PATH with a recipe of that model_type (docs/recipes.md)"
    )
    return ValueError(
        f"model '{model_id}' is {architectures} (config.model_type '{model_type}'), but recipe "
        f"'{recipe.name}'{why} is for model_type '{recipe.model_type}': {what}"
    )


def find_recipe(
    recipe: str | None = None,
    model_id: str | None = None,
    model_type: str | None = None,
) -> Recipe:
    """Find a recipe by name or TOML path, else by model id, else by `config.model_type`."""
    known = shipped_recipes()
    if recipe:
        if is_recipe_file(recipe):
            if not Path(recipe).is_file():
                raise FileNotFoundError(f"recipe file {recipe} does not exist")
            return load_recipe_file(recipe)
        if recipe in known:
            return known[recipe]
        raise ValueError(
            f"unknown recipe '{recipe}'; known: {', '.join(known)}; or pass --recipe PATH to a "
            "TOML file (see docs/recipes.md)"
        )
    if model_id:
        matched = [c for c in known.values() if c.matches(model_id)]
        config = _local_config(model_id)
        if config is None:  # a Hub id: its glob decides (nothing is fetched to look)
            if matched:
                return matched[0]
        else:  # a local folder: its config.model_type decides, the glob only among those
            model_type = model_type or config.get("model_type")
            if same := [c for c in matched if c.model_type == model_type]:
                return same[0]
            if matched and not any(c.model_type == model_type for c in known.values()):
                raise model_type_mismatch(
                    model_id, config, matched[0], " (its model_ids match the path)"
                )
    if model_type:
        candidates = [c for c in known.values() if c.model_type == model_type]
        if len(candidates) > 1:
            others = ", ".join(c.name for c in candidates[1:])
            warnings.warn(
                f"model '{model_id}' is matched only by config.model_type '{model_type}': using "
                f"recipe '{candidates[0].name}' (also '{model_type}': {others}); pass --recipe "
                "NAME to choose, e.g. --recipe tiny_llava for a model retrained with "
                "`python -m vlm_sparsify.tiny --out DIR`",
                stacklevel=2,
            )
        if candidates:
            return candidates[0]
    if model_id and not model_type:
        _check_model_path(model_id)
    described = f"model_type '{model_type}'" if model_type else "no local config.json"
    raise ValueError(
        f"no recipe matches model '{model_id}' ({described}); known: "
        f"{', '.join(known)}; pass --recipe NAME or --recipe PATH to a TOML file "
        "(see docs/recipes.md)"
    )
