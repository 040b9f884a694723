"""Where the hookpoints are: MLP module paths from the ROOT model, resolved through a recipe."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, cast

from torch import nn

from vlm_sparsify.recipe import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _layer_list(model: nn.Module, path: str) -> nn.ModuleList:
    """The layers at `path`, a ModuleList path that `_first_existing` returned."""
    return cast(nn.ModuleList, model.get_submodule(path))


def _first_existing(model: nn.Module, candidates: tuple[str, ...], what: str) -> str:
    for path in candidates:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return path
    raise ValueError(
        f"none of the {what} paths {list(candidates)} is a ModuleList in "
        f"{type(model).__name__}; fix the recipe's [layers] section"
    )


def decoder_layers_path(model: nn.Module, recipe: Recipe) -> str:
    return _first_existing(model, recipe.decoder_layers, "decoder-layer")


def num_text_layers(model: PreTrainedModel) -> int:
    """Layer count of the language model (`LlavaConfig` has no `num_hidden_layers`)."""
    return int(model.config.get_text_config().num_hidden_layers)


def mlp_hookpoints(model: PreTrainedModel, recipe: Recipe) -> list[str]:
    """Every language-model MLP, in layer order."""
    layers = decoder_layers_path(model, recipe)
    count = len(_layer_list(model, layers))
    expected = num_text_layers(model)
    if count != expected:
        raise ValueError(f"{layers} holds {count} layers but the text config says {expected}")
    first = model.get_submodule(f"{layers}.0")
    try:
        first.get_submodule(recipe.mlp)
    except AttributeError:
        children = ", ".join(name for name, _ in first.named_children())
        raise ValueError(
            f"recipe '{recipe.name}': [layers] mlp = '{recipe.mlp}' is not a module of "
            f"{layers}.0 (its modules: {children}); fix the recipe"
        ) from None
    return [f"{layers}.{i}.{recipe.mlp}" for i in range(count)]


def vision_layer_paths(model: nn.Module, recipe: Recipe) -> list[str]:
    if not recipe.vision_layers:
        return []
    layers = _first_existing(model, recipe.vision_layers, "vision-layer")
    return [f"{layers}.{i}" for i in range(len(_layer_list(model, layers)))]


def select_hookpoints(
    model: PreTrainedModel,
    recipe: Recipe,
    hookpoints: list[str] | None = None,
    layers: list[int] | None = None,
    layer_stride: int = 1,
) -> list[str]:
    """Hookpoints to train: explicit patterns, else the MLPs of `layers`, else every MLP; each
    once, in the order the forward runs them (the model's module order: a layer's `self_attn`
    before its `mlp`), whatever order the flags name them in."""
    if hookpoints and layers:
        raise ValueError("pass either --hookpoints or --layers, not both")
    if hookpoints:
        names = [name for name, _ in model.named_modules()]
        found = [n for n in names if any(fnmatchcase(n, p) for p in hookpoints)]
        example = mlp_hookpoints(model, recipe)[0]
        if not found:
            raise ValueError(
                f"no module matches --hookpoints {hookpoints}; paths start at the root model, "
                f"e.g. '{example}'"
            )
        # coders train on the language model's token positions, inside its decoder layers
        decoder = decoder_layers_path(model, recipe)
        outside = [name for name in found if not name.startswith(f"{decoder}.")]
        if outside:
            raise ValueError(
                f"--hookpoints {hookpoints} match {outside[:3]}, outside the language model's "
                f"decoder layers ({decoder}); coders train on modules of those layers, e.g. "
                f"'{example}'"
            )
        return found[::layer_stride]
    all_mlps = mlp_hookpoints(model, recipe)
    if layers:
        bad = [i for i in layers if not 0 <= i < len(all_mlps)]
        if bad:
            raise ValueError(f"--layers {bad} out of range: the model has {len(all_mlps)} layers")
        return [all_mlps[i] for i in sorted(set(layers))][::layer_stride]
    return all_mlps[::layer_stride]
