"""Recipes: TOML files that teach vlm_sparsify a VLM family without code.

A recipe says how to load the model (a transformers class name, never an arbitrary import),
where its language-model decoder layers, MLPs and vision layers are, how prompts look, which
dataset trains it by default, and how to build a tiny random model of the architecture for tests.
See `docs/recipes.md` for every field.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any

import transformers


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
    train_defaults: dict[str, Any] = field(default_factory=dict)
    """Training flags this model defaults to when not passed (the `[train]` table)."""
    source: str = ""
    """Where the recipe was read from."""

    def matches(self, model_id: str) -> bool:
        return any(fnmatchcase(model_id, pattern) for pattern in self.model_ids)

    def resolve_model_class(self) -> type:
        return transformers_class(self.model_class)

    def resolve_processor_class(self) -> type:
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


def transformers_class(name: str) -> type:
    """Resolve a class name inside `transformers` only: recipes never import arbitrary code."""
    obj = getattr(transformers, name, None)
    if not isinstance(obj, type):
        raise ValueError(
            f"'{name}' is not a class exported by transformers {transformers.__version__}; "
            "recipes may only name transformers classes (check the spelling, or upgrade "
            "transformers)"
        )
    return obj


def _as_tuple(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def parse_recipe(data: dict[str, Any], source: str = "") -> Recipe:
    """Build a `Recipe` from parsed TOML, with errors that name the missing key."""
    try:
        prompt = data["prompt"]
        layers = data["layers"]
        return Recipe(
            name=data["name"],
            description=data.get("description", ""),
            model_type=data["model_type"],
            model_ids=_as_tuple(data.get("model_ids", [])),
            model_class=data["model"]["class"],
            processor_class=data["model"].get("processor_class", "AutoProcessor"),
            decoder_layers=_as_tuple(layers["decoder"]),
            mlp=layers.get("mlp", "mlp"),
            vision_layers=_as_tuple(layers.get("vision", [])),
            prompt=PromptFormat(**prompt),
            dataset=DatasetDefaults(**data["dataset"]),
            tiny=data.get("tiny", {}),
            train_defaults=data.get("train", {}),
            source=source,
        )
    except KeyError as err:
        raise ValueError(f"recipe {source or data.get('name')!r} lacks the key {err}") from None
    except TypeError as err:
        raise ValueError(f"recipe {source or data.get('name')!r}: {err}") from None


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


def _model_type_of(model_id: str) -> str | None:
    """`config.model_type` of a local model folder (no network, no remote code)."""
    config = Path(model_id) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


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
        for candidate in known.values():
            if candidate.matches(model_id):
                return candidate
        model_type = model_type or _model_type_of(model_id)
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
    described = f"model_type '{model_type}'" if model_type else "no local config.json"
    raise ValueError(
        f"no recipe matches model '{model_id}' ({described}); known: "
        f"{', '.join(known)}; pass --recipe NAME or --recipe PATH to a TOML file "
        "(see docs/recipes.md)"
    )
