"""Shared fixtures: tiny random models of shipped recipes, and images made on the fly."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sparsify import SparseCoderConfig

from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.hookpoints import mlp_hookpoints
from vlm_sparsify.random_models import build_tiny
from vlm_sparsify.recipe import Recipe, find_recipe
from vlm_sparsify.training import build_coders

warnings.filterwarnings("ignore", message=".*torchvision.*")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def llava_recipe():
    return find_recipe("llava")


@pytest.fixture(scope="session")
def tiny_llava(llava_recipe):
    """(model, processor) of a random tiny LLaVA-1.5 architecture."""
    return build_tiny(llava_recipe)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_llava) -> Path:
    """The tiny LLaVA saved with save_pretrained, so from_pretrained can load it offline."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    model, processor = tiny_llava
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def random_clt(model, recipe: Recipe, num_latents: int = 64, k: int = 8) -> CrossLayerTranscoder:
    """A CLT (cross_layer 2) on `model`'s MLPs with seeded random weights, its encoders strong
    enough that features fire and edits change answers."""
    hookpoints = mlp_hookpoints(model, recipe)
    cfg = SparseCoderConfig(num_latents=num_latents, k=k, transcode=True)
    coders = build_coders(hookpoints, model.config.text_config.hidden_size, cfg, cross_layer=2,
                          device=torch.device("cpu"))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in coders.named_parameters():
            scale = 0.5 if "encoder" in name else 0.3
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    assert isinstance(coders, CrossLayerTranscoder)
    return coders


@pytest.fixture(scope="session")
def sharded_first_step(tmp_path_factory, tiny_llava_dir):
    """`first_step(cross_layer)`: the save_dir of a two-process `--distribute_modules` run of one
    step (8 examples) with `sharded_flags(cross_layer)`, its run folder `sharded` (and
    `sharded-best`), launched once per session: torchrun's start is most of a run's time. The
    CLI tests compare it with one process's step; the resume test goes on from (a copy of) it.
    Read it, never write into it."""
    from tests.test_sharded_clt import sharded_flags, torchrun

    made: dict[str, Path] = {}

    def first_step(cross_layer: str) -> Path:
        if cross_layer not in made:
            save_dir = tmp_path_factory.mktemp(f"sharded_first_step_{cross_layer}")
            port = {"2": 29541, "0": 29545}[cross_layer]
            extra = (*sharded_flags(cross_layer), "--distribute_modules", "true")
            torchrun(tiny_llava_dir, save_dir, "sharded", *extra, "--max_examples", "8", port=port)
            made[cross_layer] = save_dir
        return made[cross_layer]

    return first_step


def gloo_worker(rank: int, init_file: str, out: str) -> None:
    """One of two gloo processes: the sharded CLT's step and the sharded per-layer coders' steps
    of the gradient tests (`gloo_step` / `gloo_steps` of test_sharded_clt / _per_layer)."""
    import torch.distributed as dist

    from tests import test_sharded_clt, test_sharded_per_layer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        test_sharded_clt.gloo_step(rank, out)
        test_sharded_per_layer.gloo_steps(rank, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def gloo_steps(tmp_path_factory) -> Path:
    """The folder of `gloo_worker`'s results, from one launch of two processes for the session
    (starting them is most of the time); each gradient test asserts on its own files."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("gloo_steps")
    mp.spawn(gloo_worker, args=(str(folder / "init"), str(folder)), nprocs=2)
    return folder


def make_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (32, 40), seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    image.save(path)
    return path
