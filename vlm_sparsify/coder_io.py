"""Atomic save / load of coder sets in sparsify's and EleutherAI/clt-training's layouts.

A run folder holds one `<hookpoint>/` folder per source with `cfg.json` and `sae.safetensors`:
- SAE / PLT: exactly what `sparsify.SparseCoder.save_to_disk` writes (stock `load_from_disk`
  reads it);
- CLT: clt-training's untied layout (`encoder.weight`, `encoder.bias`, `W_decs.{i}`, `b_decs.{i}`,
  optional `W_skips.{i}`); `cfg.json` = SparseCoderConfig + `d_in`, `n_targets`, `n_sources`,
  `coalesce_topk: "none"`, `transcode: true`, and ours: `cross_layer`, `hookpoints`,
  `source_index`.
See docs/checkpoints.md.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from natsort import natsorted
from safetensors import SafetensorError
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig
from torch import Tensor

from vlm_sparsify.coder_set import CoderSet
from vlm_sparsify.cross_layer import (
    CLTSource,
    CrossLayerTranscoder,
    n_sources_per_target,
    n_targets_per_source,
)
from vlm_sparsify.files import open_safetensors, read_json, unreadable
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.sharded_clt import ShardedCLT
from vlm_sparsify.sharding import ShardedCoders

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"

Coders = PerLayerCoders | CrossLayerTranscoder
"""A whole coder set in one process, as `load_coders` returns it: the two implementations of
`coder_set.InferenceCoderSet` (the sharded ones, `ShardedCLT` / `ShardedPerLayer`, implement
only the training half, `coder_set.CoderSet`, and are saved by `sharded_checkpoint`)."""


def whole_coders(coders: CoderSet) -> Coders:
    """`coders` as the whole coder set it is; a sharded one (or another kind) is a TypeError."""
    if not isinstance(coders, PerLayerCoders | CrossLayerTranscoder):
        raise TypeError(f"expected a whole coder set in one process, got {type(coders).__name__}")
    return coders


# clt-training stores these as aliases of index 0 (`W_dec` is `W_decs.0`): never needed
_CLT_TRAINING_ALIASES = ("W_dec", "b_dec", "W_skip")


class CheckpointError(ValueError):
    """A run folder that does not hold the coders asked for."""


def save_coders(
    coders: Coders,
    run_dir: str | Path,
    config: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `coders` to `run_dir` atomically: into a temporary sibling, then renamed over.

    `config` (the run's configuration) goes to `config.json`; `write_extra(folder)` may add more
    files (optimizer state, step) to the same folder so that a whole checkpoint is one rename.
    The previous contents of `run_dir` are replaced as a whole.
    """
    run_dir = Path(run_dir)
    with atomic_dir(run_dir) as tmp:
        if isinstance(coders, CrossLayerTranscoder):
            _write_clt(coders, tmp)
        else:
            for hookpoint, coder in coders.items():
                coder.save_to_disk(tmp / hookpoint)
        if config is not None:
            (tmp / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        if write_extra is not None:
            write_extra(tmp)
    return run_dir


def temp_dir(dst: Path, pid: int | None = None) -> Path:
    """Where `atomic_dir` writes `dst`: `.<name>.tmp-<pid>` beside it (default pid: this
    process's), the name `clean_stale_folders` recognises once that process is gone."""
    return dst.parent / f".{dst.name}.tmp-{os.getpid() if pid is None else pid}"


@contextmanager
def atomic_dir(dst: Path, pid: int | None = None) -> Iterator[Path]:
    """A new, empty temporary folder for `dst`'s contents: moved over `dst` (`replace_dir`)
    when the block ends, removed when it raises (`dst` untouched).

    Folders of an earlier write to `dst` that was killed are cleaned first
    (`clean_stale_folders`); `pid` names the temporary folder after another process (the
    rank 0 of a sharded save, which every rank writes into).
    """
    for note in clean_stale_folders(dst):
        print(note)
    tmp = temp_dir(dst, pid)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usual_permissions(path: Path) -> None:
    """Give `path` (a file, or every file under a folder) the permissions a new file gets from
    the umask: safetensors writes its files readable by their owner only (0600)."""
    mask = os.umask(0)
    os.umask(mask)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        os.chmod(file, 0o666 & ~mask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush `path` to disk: a file, or a folder with every file and folder under it."""
    for entry in path.rglob("*") if path.is_dir() else ():
        _fsync(entry)
    _fsync(path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst` (its files with the usual permissions); an existing `dst` is
    moved aside first and removed after.

    `src` is on disk (fsync of every file and folder) before the old `dst` is moved aside, and
    the renames are before this returns (fsync of the parent folder): a power cut leaves the
    old checkpoint or the whole new one, never a new one with empty files. A crash between the
    two renames leaves the old folder at `.<name>.old-<pid>` beside it.
    """
    usual_permissions(src)
    fsync_tree(src)
    if not dst.exists():
        os.replace(src, dst)
        _fsync(dst.parent)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    _fsync(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_folders(run_dir: Path) -> list[str]:
    """Folders that a killed `atomic_dir` write (`save_coders`, a sharded save, `--save_best`,
    export) left beside `run_dir` (`.RUN.tmp-<pid>`, `.RUN.old-<pid>` of a process no longer
    alive): removed, but an `.old` one is put back as RUN when RUN is missing (the kill came
    between the two renames). Returns what was done.

    A folder named with this process's own pid is stale too: this process has no write under
    way when it cleans, so an earlier process had that pid (a container's PID 1, restarted)."""
    done = []
    for folder in sorted(run_dir.parent.glob(f".{run_dir.name}.*-*")):
        kind, _, pid = folder.name.removeprefix(f".{run_dir.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if kind == "old" and not run_dir.exists():
            os.replace(folder, run_dir)
            done.append(f"restored {run_dir} from {folder.name} (a checkpoint write was killed)")
        else:
            shutil.rmtree(folder)
            done.append(f"removed {folder} (left by process {pid}, killed while saving)")
    return done


def clean_stale_children(folder: Path) -> list[str]:
    """`clean_stale_folders` of every folder inside `folder` that a killed write left a
    `.<name>.tmp-<pid>` / `.<name>.old-<pid>` beside: RUN-best, whose per-layer hookpoints are
    replaced one by one (`best_checkpoint.keep_best`)."""
    if not folder.is_dir():
        return []
    names = {f.name[1:].rpartition(".")[0] for f in folder.glob(".*.*-*") if f.is_dir()}
    return [note for name in sorted(names) if name for note in clean_stale_folders(folder / name)]


def clt_source_cfg(clt: CrossLayerTranscoder | ShardedCLT, p: int) -> dict[str, Any]:
    """cfg.json of CLT source p: clt-training's fields plus what `load_coders` needs."""
    return {
        **clt.cfg.to_dict(),
        "d_in": clt.d_in,
        "num_latents": clt.num_latents,
        "transcode": True,
        "n_targets": clt.n_targets(p),
        "n_sources": n_sources_per_target(len(clt.hookpoints), clt.cross_layer)[p],
        "coalesce_topk": "none",
        "post_encoder_scale": clt.has_post_encoder_scale(p),
        "cross_layer": clt.cross_layer,
        "hookpoints": clt.hookpoints,
        "source_index": p,
    }


def _write_clt(clt: CrossLayerTranscoder, folder: Path) -> None:
    for p, (hookpoint, source) in enumerate(clt.items()):
        # .contiguous() copies only views; each parameter has its own storage
        tensors = {k: v.detach().cpu().contiguous() for k, v in source.state_dict().items()}
        write_clt_source(folder / hookpoint, tensors, clt_source_cfg(clt, p))


def write_clt_source(out: Path, tensors: dict[str, Tensor], cfg: dict[str, Any]) -> None:
    """One source's folder: `sae.safetensors` (clt-training's keys) and `cfg.json`."""
    out.mkdir(parents=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CFG_FILE).write_text(json.dumps(cfg))


def load_coders(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    hookpoints: list[str] | None = None,
    d_in: int | None = None,
    decoder_dtype: torch.dtype | None = None,
) -> Coders:
    """Load the coders of a run folder (ours, stock sparsify's, or clt-training's untied CLT).

    `dtype` casts every tensor (default: as stored); `decoder_dtype` overrides it for CLT
    decoders. `hookpoints` / `d_in`, when given, must match the checkpoint.
    """
    run_dir = Path(run_dir)
    order, cfgs = _read_cfgs(run_dir, hookpoints, d_in)
    if any(cfg.get("n_targets", 0) > 0 for cfg in cfgs.values()):
        return _load_clt(run_dir, order, cfgs, device, dtype, decoder_dtype or dtype)
    return _load_per_layer(run_dir, order, device, dtype)


def _first_source(coders: Coders) -> SparseCoder | CLTSource:
    return coders.source(0) if isinstance(coders, CrossLayerTranscoder) else coders.coder(0)


def source_weights(coders: Coders, p: int) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """(W_enc, b_enc, W_decs, b_decs) of source p, decoders [L, d] per target p, p+1, ..."""
    if isinstance(coders, CrossLayerTranscoder):
        source = coders.source(p)
        if source.post_encs is not None:
            raise ValueError(
                f"source {coders.hookpoints[p]} has clt-training post-encoder offsets, which "
                "circuit-tracer's CLT cannot represent; export a CLT trained without them"
            )
        return source.encoder.weight, source.encoder.bias, list(source.W_decs), list(source.b_decs)
    coder = coders.coder(p)
    if not coder.cfg.transcode:
        raise ValueError(
            "this run holds SAEs (transcode=False), which read and rebuild the MLP output; "
            "the circuit-tracer export and CLT-free steering take transcoders (PLT or CLT)"
        )
    return coder.encoder.weight, coder.encoder.bias, [coder.W_dec], [coder.b_dec]


def per_layer_kind(transcode: bool) -> str:
    return "per-layer transcoders" if transcode else "sparse autoencoders"


def coder_shape(coders: Coders | ShardedCoders) -> dict[str, Any]:
    """What a fine-tune must share with its checkpoint besides hookpoints and d_in."""
    clt = isinstance(coders, CrossLayerTranscoder | ShardedCLT)
    if isinstance(coders, ShardedCoders):
        cfg, d_in = coders.cfg, coders.d_in
        num_latents = (
            getattr(coders, "num_latents", 0) or cfg.num_latents or d_in * cfg.expansion_factor
        )
    else:
        cfg, num_latents = coders.cfg, int(_first_source(coders).encoder.weight.shape[0])
    return {
        "kind": "a cross-layer transcoder" if clt else per_layer_kind(cfg.transcode),
        "cross_layer": getattr(coders, "cross_layer", 0),
        "num_latents": int(num_latents),
        "skip_connection": bool(cfg.skip_connection),
    }


def saved_shape(run_dir: str | Path, hookpoints: list[str], d_in: int) -> dict[str, Any]:
    """`coder_shape` of the run in `run_dir` from its cfg.json files alone (no weights read),
    after `load_coders`' checks that it holds these hookpoints of this d_in."""
    run_dir = Path(run_dir)
    order, cfgs = _read_cfgs(run_dir, hookpoints, d_in)
    saved = _coder_config(cfgs[order[0]])
    clt = any(cfg.get("n_targets", 0) > 0 for cfg in cfgs.values())
    return {
        "kind": "a cross-layer transcoder" if clt else per_layer_kind(saved.transcode),
        "cross_layer": _check_clt_cfg(run_dir, order, cfgs) if clt else 0,
        "num_latents": saved.num_latents or d_in * saved.expansion_factor,
        "skip_connection": saved.skip_connection,
    }


def check_finetune_shape(run_dir: str | Path, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """One CheckpointError naming every `coder_shape` field in which RUN differs from this run."""
    differing = [
        f"{key} {theirs[key]!r} (this run: {ours[key]!r})"
        for key in ours
        if ours[key] != theirs[key]
    ]
    if differing:
        raise CheckpointError(
            f"cannot fine-tune from {run_dir}: it holds {'; '.join(differing)}; pass the flags "
            "it was trained with (--cross_layer, --transcode, --num_latents, --skip_connection)"
        )


def load_for_finetune(coders: Coders, run_dir: str | Path, device: str | torch.device) -> None:
    """`--finetune RUN`: copy RUN's coders into `coders` by hookpoint name (RUN must hold the
    same hookpoints, in the same order); any difference is one CheckpointError naming it."""
    d_in = int(_first_source(coders).encoder.weight.shape[1])
    saved = load_coders(run_dir, device=device, hookpoints=coders.hookpoints, d_in=d_in)
    check_finetune_shape(run_dir, coder_shape(coders), coder_shape(saved))
    try:
        coders.load_state_dict(saved.state_dict())
    except RuntimeError as err:  # torch's text, joined into one line
        raise CheckpointError(
            f"cannot fine-tune from {run_dir}: {' '.join(str(err).split())}"
        ) from None


def check_run_dir(run_dir: Path) -> None:
    """A clear error when the RUN folder does not exist."""
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"no checkpoint folder {run_dir}; pass the RUN folder that holds <hookpoint>/cfg.json"
        )


def run_hookpoints(
    run_dir: Path, hookpoints: list[str] | None = None, d_in: int | None = None
) -> list[str]:
    """The hookpoints of a run folder, in order, after `load_coders`' checks of its cfg.json
    files (no weights are read): a folder that is not a run (the save_dir above one) is refused,
    and so is one of other `hookpoints` or `d_in` when given."""
    return _read_cfgs(run_dir, hookpoints, d_in)[0]


def _read_cfgs(
    run_dir: Path, hookpoints: list[str] | None, d_in: int | None
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The run's hookpoints in order and their cfg.json, checked against what was asked for."""
    check_run_dir(run_dir)
    # hidden folders are a killed atomic write's (`.<hookpoint>.tmp-<pid>` in RUN-best), no coders
    entries = [f for f in run_dir.iterdir() if not f.name.startswith(".")]
    folders = [f for f in entries if f.is_dir() and (f / CFG_FILE).exists()]
    for old in sorted(run_dir.glob(".*.old-*")):
        name = old.name[1:].rpartition(".")[0]
        if (old / CFG_FILE).exists() and not (run_dir / name).exists():
            raise CheckpointError(
                f"{run_dir / name} is missing: {old} holds its coders (a write replacing them "
                f"was killed); rename it to {name}, or resume the run, which puts it back"
            )
    # a coder folder that lost its cfg.json would otherwise drop out of the set unnoticed
    if orphans := sorted(f for f in entries if (f / WEIGHTS_FILE).exists() and f not in folders):
        raise CheckpointError(
            f"missing {orphans[0] / CFG_FILE} beside its {WEIGHTS_FILE}; the checkpoint is "
            "incomplete: re-save it or point to an earlier one"
        )
    if not folders and (run_dir / CFG_FILE).is_file():
        raise CheckpointError(
            f"{run_dir} is one coder's folder: pass the run folder above it ({run_dir.parent}), "
            "which holds every <hookpoint>/cfg.json"
        )
    if not folders:
        raise CheckpointError(
            f"{run_dir} holds no <hookpoint>/{CFG_FILE}; pass a run folder written by "
            "vlm_sparsify, sparsify or clt-training (not the save_dir above it)"
        )
    cfgs = {f.name: read_json(f / CFG_FILE) for f in folders}
    for name, cfg in cfgs.items():
        _check_cfg(run_dir / name / CFG_FILE, cfg)
    for name in cfgs:
        if not (run_dir / name / WEIGHTS_FILE).exists():
            raise CheckpointError(
                f"missing {run_dir / name / WEIGHTS_FILE}; the checkpoint is incomplete: "
                "re-save it or point to an earlier one"
            )
    order = _hookpoint_order(run_dir, cfgs)
    per_layer = not any(cfg.get("n_targets", 0) > 0 for cfg in cfgs.values())
    if hookpoints is not None and per_layer and sorted(hookpoints) == sorted(order):
        # independent coders, whose folders carry no order: the caller's (its forward order)
        order = list(hookpoints)
    if hookpoints is not None and list(hookpoints) != order:
        raise CheckpointError(
            f"{run_dir} holds coders for {order} but {list(hookpoints)} were requested; "
            "pass the checkpoint's hookpoints (or --layers) or train coders for these"
        )
    widths = {name: cfg["d_in"] for name, cfg in cfgs.items()}
    if d_in is not None and set(widths.values()) != {d_in}:
        shown = widths[order[0]] if len(set(widths.values())) == 1 else widths
        raise CheckpointError(
            f"{run_dir} has d_in {shown} but the model's MLP width is {d_in}; "
            "these coders were trained on another model"
        )
    return order, cfgs


def _check_cfg(path: Path, cfg: Any) -> None:
    """One cfg.json's own consistency: a JSON object with d_in, and k within the latents."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("d_in"), int):
        raise CheckpointError(f"{path} is not a coder's cfg.json (no integer 'd_in')")
    k, latents = cfg.get("k"), cfg.get("num_latents") or 0
    if not latents and isinstance(cfg.get("expansion_factor"), int):
        latents = cfg["d_in"] * cfg["expansion_factor"]
    if isinstance(k, int) and isinstance(latents, int) and latents and not 0 < k <= latents:
        raise CheckpointError(
            f"{path}: k {k} must be between 1 and the coder's {latents} latents; the file is "
            "damaged or was edited: re-save the checkpoint"
        )


def read_clt_tensors(
    run_dir: str | Path,
    hookpoints: list[str],
    d_in: int,
    cross_layer: int,
    wanted: dict[int, list[str]],
    device: str | torch.device = "cpu",
) -> dict[int, dict[str, Tensor]]:
    """Only the `wanted` tensors (source index -> clt-training keys) of a CLT run, after
    `load_coders`' checks: what each process of a sharded run reads of a checkpoint."""
    run_dir = Path(run_dir)
    order, cfgs = _read_cfgs(run_dir, hookpoints, d_in)
    if not any(cfg.get("n_targets", 0) > 0 for cfg in cfgs.values()):
        raise CheckpointError(f"{run_dir} holds per-layer coders, not a cross-layer transcoder")
    saved = _check_clt_cfg(run_dir, order, cfgs)
    if saved != cross_layer:
        raise CheckpointError(
            f"{run_dir} is a CLT with cross_layer {saved}, not {cross_layer}; pass --cross_layer {saved}"
        )
    out = {}
    for p, keys in wanted.items():
        path = run_dir / order[p] / WEIGHTS_FILE
        with open_safetensors(path, device) as f:
            offsets = [k for k in f.keys() if k.startswith("post_enc")]  # noqa: SIM118
            if any(f.get_tensor(k).any() for k in offsets):
                raise CheckpointError(
                    f"{path} has clt-training's per-target activation offsets, which a sharded "
                    "CLT does not hold; fine-tune it without --distribute_modules"
                )
            missing = sorted(set(keys) - set(f.keys()))
            if missing:
                raise CheckpointError(f"{path}: missing tensors {missing}; re-save the checkpoint")
            out[p] = {key: f.get_tensor(key) for key in keys}
    return out


def _hookpoint_order(run_dir: Path, cfgs: dict[str, dict[str, Any]]) -> list[str]:
    """Our CLT cfg.json lists the hookpoints; otherwise natural sort of the folder names."""
    listed = next((cfg["hookpoints"] for cfg in cfgs.values() if "hookpoints" in cfg), None)
    if listed is None:
        return natsorted(cfgs)
    if set(listed) != set(cfgs):
        raise CheckpointError(
            f"{run_dir}: cfg.json lists hookpoints {listed} but the folders are "
            f"{natsorted(cfgs)}; the run folder is incomplete or mixes two runs"
        )
    return list(listed)


def _load_per_layer(
    run_dir: Path, order: list[str], device: str | torch.device, dtype: torch.dtype | None
) -> PerLayerCoders:
    coders = {}
    for name in order:
        try:
            coder = SparseCoder.load_from_disk(run_dir / name, device=device)
        except SafetensorError as err:
            raise unreadable(run_dir / name / WEIGHTS_FILE, "safetensors file", err) from None
        except (RuntimeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{run_dir / name / WEIGHTS_FILE} does not match its {CFG_FILE}: "
                f"{' '.join(str(err).split())}; re-save the checkpoint"
            ) from err
        coders[name] = coder if dtype is None else coder.to(dtype)
    return PerLayerCoders.from_coders(coders)


def _check_clt_cfg(run_dir: Path, order: list[str], cfgs: dict[str, dict[str, Any]]) -> int:
    """Validate clt-training options we do not implement; return cross_layer."""
    for name, cfg in cfgs.items():
        unsupported = {
            "coalesce_topk": cfg.get("coalesce_topk", "none") != "none",
            "per_source_tied": cfg.get("per_source_tied", False),
            "normalize_io": cfg.get("normalize_io", False),
            "activation": cfg.get("activation", "topk") not in ("topk", "groupmax"),
        }
        if bad := [key for key, is_bad in unsupported.items() if is_bad]:
            raise CheckpointError(
                f"{run_dir / name / CFG_FILE}: {', '.join(f'{k}={cfg.get(k)!r}' for k in bad)} "
                "is not supported; only clt-training's untied CLT (coalesce_topk 'none', "
                "no per-source tying, no normalize_io, topk/groupmax) loads here"
            )
    n_targets = [cfgs[name].get("n_targets", 0) for name in order]  # 0: a per-layer coder
    cross_layer = next((cfg["cross_layer"] for cfg in cfgs.values() if "cross_layer" in cfg), None)
    cross_layer = cross_layer or max(n_targets)
    expected = n_targets_per_source(len(order), cross_layer)
    if n_targets != expected:
        raise CheckpointError(
            f"{run_dir}: n_targets per source {dict(zip(order, n_targets, strict=True))} "
            f"do not fit cross_layer={cross_layer} over {len(order)} hookpoints (expected "
            f"{expected}); a hookpoint folder is missing or extra"
        )
    return cross_layer


def _coder_config(cfg: dict[str, Any]) -> SparseCoderConfig:
    """The SparseCoderConfig fields of a cfg.json (ours, stock sparsify's or clt-training's)."""
    known = {f.name for f in dataclasses.fields(SparseCoderConfig)}
    return SparseCoderConfig.from_dict({k: v for k, v in cfg.items() if k in known})


def _load_clt(
    run_dir: Path,
    order: list[str],
    cfgs: dict[str, dict[str, Any]],
    device: str | torch.device,
    dtype: torch.dtype | None,
    decoder_dtype: torch.dtype | None,
) -> CrossLayerTranscoder:
    cross_layer = _check_clt_cfg(run_dir, order, cfgs)
    first = cfgs[order[0]]
    cfg = dataclasses.replace(_coder_config(first), transcode=True)
    if len({c["d_in"] for c in cfgs.values()}) != 1:
        raise CheckpointError(f"{run_dir}: sources differ in d_in; a CLT needs one width")
    with torch.device("meta"):
        clt = CrossLayerTranscoder(order, first["d_in"], cfg, cross_layer)
    for name, source in clt.items():
        path = run_dir / name / WEIGHTS_FILE
        with open_safetensors(path, device) as f:
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        _prepare_clt_state(path, source, state, cfgs[name])
        for key, tensor in state.items():
            target = decoder_dtype if key.startswith("W_decs.") else dtype
            if target is not None:
                state[key] = tensor.to(target)
        source.load_state_dict(state, assign=True)
    return clt


def _prepare_clt_state(
    path: Path, source: CLTSource, state: dict[str, Tensor], cfg: dict[str, Any]
) -> None:
    """Drop clt-training's aliases and all-zero post-encoder offsets; check keys and shapes."""
    for key in _CLT_TRAINING_ALIASES:
        state.pop(key, None)
    offsets = [k for k in state if k.startswith("post_encs.")]
    scales = [k for k in state if k.startswith("post_enc_scales.")]
    if scales or any(state[k].any() for k in offsets):
        source.add_post_encoder(scales=bool(scales))
    else:
        for key in offsets:
            del state[key]
    expected = {k: v.shape for k, v in source.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path}: missing tensors {missing}, unexpected {extra} for n_targets="
            f"{cfg['n_targets']}; the file and {CFG_FILE} disagree: re-save the checkpoint"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {list(state[key].shape)}, expected {list(shape)} "
                f"from {CFG_FILE} (d_in={cfg['d_in']}, num_latents={source.encoder.out_features})"
            )
