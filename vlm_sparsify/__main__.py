"""`python -m vlm_sparsify [MODEL] [DATASET] [flags]`: train sparsify coders on a VLM.

Flags mirror `python -m sparsify` (its `TrainConfig` and `SparseCoderConfig` fields, same names)
plus this plugin's own (`RunConfig` below; the README's "Train" section tables them). MODEL and
DATASET default to the embedded offline default: the tiny easy-VQA LLaVA shipped with the
package, on easy-VQA train.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from argparse import Action
from collections.abc import Collection
from contextlib import nullcontext, redirect_stdout, suppress
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from simple_parsing import field
from simple_parsing.help_formatter import SimpleHelpFormatter
from simple_parsing.helpers import list_field
from sparsify.config import TrainConfig

from vlm_sparsify.best_checkpoint import (
    best_dir,
    clean_after_kill,
    improved_since_last_check,
    keep_best,
)
from vlm_sparsify.cli import ArgumentParser, Terminated, reported_interrupt, run_cli
from vlm_sparsify.coder_io import (
    RUN_CONFIG_FILE,
    load_for_finetune,
    save_coders,
    temp_dir,
    whole_coders,
)
from vlm_sparsify.cross_layer import (
    check_training_fits,
    free_memory_bytes,
    training_memory_bytes,
)
from vlm_sparsify.data import (
    BatchStream,
    TokenRegion,
    batch_loader,
    is_local_dataset,
    open_examples,
    parse_data_args,
    resolve_dataset,
)
from vlm_sparsify.end_to_end import check_end_to_end
from vlm_sparsify.files import read_json
from vlm_sparsify.hookpoints import select_hookpoints
from vlm_sparsify.hub import check_repo_id, push_to_hub
from vlm_sparsify.loading import (
    DEFAULT_MODEL,
    check_device,
    load_model_and_processor,
    portable_model,
    resolve_model,
)
from vlm_sparsify.recipe import (
    RUN_RECIPE_FILE,
    Recipe,
    check_train_value,
    find_recipe,
    is_recipe_file,
    run_recipe,
    run_recipe_file,
    shipped_recipes,
)
from vlm_sparsify.sharded_checkpoint import (
    load_owned_tensors,
    read_sharded_training_state,
    shard_file,
    write_sharded_checkpoint,
)
from vlm_sparsify.sharded_clt import shard_memory_bytes
from vlm_sparsify.sharding import ShardedCoders, init_distributed, rank_world
from vlm_sparsify.train_state import (
    live_parameters,
    read_state,
    read_training_state,
    write_training_state,
)
from vlm_sparsify.training import (
    CoderSet,
    NonFiniteLossError,
    Trainer,
    TrainingState,
    build_coders,
    build_optimizers,
    eval_weights,
)
from vlm_sparsify.wandb_log import WandbLog

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DecoderDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class RunConfig(TrainConfig):
    """Train sparsify coders (SAEs, PLTs, CLTs) on a vision-language model. The recipe's [train]
    table (docs/recipes.md) replaces the defaults of the flags it names; --resume takes every
    flag left out from the run's config.json."""

    if TYPE_CHECKING:  # a field of sparsify's TrainConfig (untyped), assigned below
        finetune: str | None = None

    init_seeds: list[int] = list_field(0)
    """Random seed of the coders' initialisation: one per run (for several seeds, one run
    each, with its own --run_name)."""

    log_to_wandb: bool = True
    """Log to Weights & Biases (rank 0; project WANDB_PROJECT, default vlm_sparsify); skipped
    with a note when wandb is not installed."""

    run_name: str | None = None
    """The run's name: its folder under --save_dir (default: unnamed) and its W&B name."""

    wandb_log_frequency: int = 1
    """Log to W&B every this many steps."""

    save_dir: str = "checkpoints"
    """The folder that holds the run folders."""

    model: str = field(default="default", positional=True, metavar="MODEL")
    """Model id on the Hub, a local folder, or `default`: the embedded tiny easy-VQA LLaVA."""

    dataset: str = field(default="", positional=True, metavar="DATASET")
    """`easyvqa`, a local folder of images + metadata.jsonl/csv, or a Hugging Face dataset id
    (default: the recipe's dataset)."""

    recipe: str = ""
    """Recipe name or TOML path (default: matched from the model id or its config.model_type)."""

    cross_layer: int = 0
    """0: one coder per hookpoint; N > 0: a cross-layer transcoder whose source layer decodes
    into itself and the next N-1 hookpoints (N >= number of layers: all following layers)."""

    tokens: TokenRegion = "all"
    """Which positions train the coders: all, image or text tokens."""

    split: str = ""
    """Dataset split (default: the recipe's)."""

    ctx_len: int = 2048
    """Text tokens per example (truncated from the end); image tokens never are truncated and
    come on top, within the model's own context length."""

    streaming: bool = False
    """Stream a Hugging Face dataset instead of downloading it whole."""

    data_args: str = ""
    """Extra arguments for `datasets.load_dataset`, as 'arg1=val1,arg2=val2' (saved in
    config.json: no token=..., use --hf_token or HF_TOKEN)."""

    max_examples: int | None = None
    """Maximum number of examples to train on."""

    shuffle_seed: int = 42
    """Random seed for shuffling the dataset."""

    num_workers: int = 1
    """DataLoader workers that load images and run the processor (0: in the main process)."""

    strict: bool = False
    """Stop on a missing or unreadable image instead of skipping and counting it."""

    overwrite: bool = False
    """Replace the existing run folder `save_dir/run_name` (without it, a new run there stops
    before training)."""

    resume: bool = False
    """Continue the run in `save_dir/run_name` exactly where it stopped; flags left out take the
    values saved in its config.json, and one that contradicts them is an error
    (docs/checkpoints.md)."""

    dtype: str = "auto"
    """Model dtype: auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, float16 (these
    two on a GPU only)."""

    decoder_dtype: DecoderDtype = "auto"
    """Dtype of cross-layer decoder weights: auto (bfloat16 on a GPU: half the memory of the
    7B-scale CLT, docs/memory.md; float32 on CPU), float32, bfloat16 or float16."""

    distribute_modules: bool = False
    """Shard the coders over the processes (torchrun): each holds those of a block of layers
    (for a CLT: their encoders and the decoders into them) instead of all (docs/memory.md)."""

    device: str = ""
    """Device (default: cuda when available)."""

    revision: str | None = None
    """Model revision on the Hub."""

    trust_remote_code: bool = False
    """Allow the model's own code from the Hub (off unless you ask)."""

    hf_token: str | None = field(default=None, encoding_fn=lambda _: None)
    """Hugging Face token for the model and a Hub dataset, gated or private ones too (never
    written to disk or logs; prefer the HF_TOKEN environment variable, which other users of the
    machine cannot read from the process list)."""

    push_to_hub: str = ""
    """Upload the finished run folder (coders, configs, summary; no optimizer state) to this
    Hub repository."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # the shell leaves `~` alone after `=` (--save_dir=~/runs) and in quotes
        for name in ("save_dir", "model", "dataset", "recipe", "finetune"):
            if (value := getattr(self, name)) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        self.model = resolve_model(self.model)
        self.dataset = resolve_dataset(self.dataset)
        if self.revision and Path(self.model).is_dir():  # from_pretrained would ignore it
            raise ValueError(
                f"--revision applies to models on the Hub, not to the local folder "
                f"'{self.model}'; leave it out"
            )
        if self.finetune and not Path(self.finetune).is_dir():
            # `--finetune RUN`, named as --resume names it: a run of --save_dir
            in_save_dir = Path(self.save_dir) / self.finetune
            if in_save_dir.is_dir():
                self.finetune = str(in_save_dir)
        if self.cross_layer < 0:
            raise ValueError("--cross_layer must be >= 0")
        # the trainer checks the coders (transcoders) once the recipe's defaults apply
        check_end_to_end(
            self.loss_fn,
            self.micro_acc_steps,
            local_terms=self.auxk_alpha > 0 or self.sae.multi_topk,
        )
        if self.loss_fn == "ce" and self.tokens == "image":
            raise ValueError(
                "--tokens image: --loss_fn ce is the cross-entropy of every next text token, "
                "which --tokens does not restrict (image tokens have no next-token target); "
                "use --loss_fn kl to train on image positions end to end, or leave --tokens out"
            )
        if self.distribute_modules:
            check_distributable(self)
        check_values(self)
        if self.push_to_hub:
            check_repo_id(self.push_to_hub, "--push_to_hub")
        if self.device:
            check_device(self.device)
        if len(self.init_seeds) > 1:
            raise ValueError(
                f"--init_seeds {' '.join(map(str, self.init_seeds))}: sparsify trains one set of "
                "coders per seed in one run; here train one run per seed (--init_seeds N with "
                "its own --run_name)"
            )


def check_values(args: RunConfig, recipe: str = "", from_recipe: Collection[str] = ()) -> None:
    """Flag values that cannot work, named before anything loads (checked again once the
    recipe's or a resumed run's values apply); a value among `from_recipe` (flag names without
    dashes) came from recipe `recipe`'s [train] table, which the error names instead of a flag."""

    def out_of_range(flag: str, value: Any, rule: str, note: str = "") -> ValueError:
        key = flag.removeprefix("--")
        if key in from_recipe:
            return ValueError(f"recipe '{recipe}': [train] {key} = {value!r} is out of range: "
                              f"{key} {rule}")  # fmt: skip
        return ValueError(f"{flag} {rule}, got {value}{note}")

    minimum = {
        "--batch_size": (args.batch_size, 1),
        "--grad_acc_steps": (args.grad_acc_steps, 1),
        "--micro_acc_steps": (args.micro_acc_steps, 1),
        "--save_every": (args.save_every, 1),
        "--k": (args.sae.k, 1),
        "--num_latents": (args.sae.num_latents, 0),
        "--ctx_len": (args.ctx_len, 1),
        "--num_workers": (args.num_workers, 0),
        "--layer_stride": (args.layer_stride, 1),
        "--wandb_log_frequency": (args.wandb_log_frequency, 1),
        "--dead_feature_threshold": (args.dead_feature_threshold, 1),
        "--lr_warmup_steps": (args.lr_warmup_steps, 0),
        "--k_decay_steps": (args.k_decay_steps, 0),
        "--auxk_alpha": (args.auxk_alpha, 0),
        "--cross_layer": (args.cross_layer, 0),
    }
    if not args.sae.num_latents:
        minimum["--expansion_factor"] = (args.sae.expansion_factor, 1)
    if args.max_examples is not None:  # None: the whole dataset
        minimum["--max_examples"] = (args.max_examples, 1)
    for flag, (value, least) in minimum.items():
        if value < least:
            raise out_of_range(flag, value, f"must be >= {least}")
    # the optimizers hold it in float32: 1e39 overflows to inf there, 1e-46 is 0
    if args.lr is not None and not 0 < float(torch.tensor(args.lr, dtype=torch.float32)) < math.inf:
        raise out_of_range(
            "--lr",
            args.lr,
            f"must be > 0 and within float32's range (at most "
            f"{torch.finfo(torch.float32).max:.3g})",
            " (leave it out for sparsify's default)",
        )


def check_dtype(dtype: str, device: torch.device) -> None:
    """`--dtype` (a resumed run's too): a half-precision model feeds half-precision activations
    to float32 coders, which only CUDA's bfloat16 autocast (sparsify's) reconciles."""
    if dtype in ("bfloat16", "float16") and device.type != "cuda":
        raise ValueError(
            f"--dtype {dtype} trains on a GPU only (the coders are float32 and autocast them "
            f"on CUDA); on the {device.type} leave it out for float32"
        )


def default_device() -> str:
    """This process's GPU (torchrun's LOCAL_RANK: the global rank is not a device index on a
    second node), or the CPU without one."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def resolve_decoder_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--decoder_dtype`: auto is bfloat16 on a GPU and float32 elsewhere (as `--dtype auto`)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_distributable(args: RunConfig) -> None:
    """What `--distribute_modules` (coders sharded over the processes by layer) works with."""
    # sparsify's TrainConfig already refuses it with --loss_fn kl / ce
    unsupported = {
        "--skip_connection with --cross_layer": args.sae.skip_connection and args.cross_layer > 0,
    }
    named = [flag for flag, used in unsupported.items() if used]
    if named:
        raise ValueError(f"--distribute_modules does not support {', '.join(named)}")


WIDTH_FLAGS = ("num_latents", "expansion_factor")
"""Two ways to say the coders' width: passing either overrides a recipe default of both."""


def apply_recipe_defaults(
    args: RunConfig, defaults: dict[str, Any], given: set[str], recipe: str = ""
) -> None:
    """The recipe's [train] defaults, for flags the user did not pass (`given`: flag names)."""
    applied: set[str] = set()
    for key, value in defaults.items():
        target = args.sae if hasattr(args.sae, key) else args
        if not hasattr(target, key):
            raise ValueError(
                f"recipe '{recipe}': the [train] table sets '{key}', which is not a flag"
            )
        check_train_value(recipe, key, value, target)
        if key in given or (key in WIDTH_FLAGS and given & set(WIDTH_FLAGS)):
            continue
        setattr(target, key, value)
        applied.add(key)
    check_values(args, recipe, applied)


RESUME_MAY_CHANGE = (
    "max_examples", "save_every", "save_best", "save_dir", "run_name", "log_to_wandb",
    "wandb_log_frequency", "num_workers", "strict", "device", "push_to_hub",
    "trust_remote_code",
)  # fmt: skip
"""Flags a resumed run may pass with another value than its config.json (docs/checkpoints.md)."""

NEVER_FROM_DISK = ("trust_remote_code",)
"""Flags a resumed run never takes from config.json: only the command line enables them."""

POSITIONALS = ("model", "dataset")

HOOKPOINT_FLAGS = ("hookpoints", "layers", "layer_stride")
"""Compared by the hookpoints they select, not one by one."""


def resume_hookpoints(args: RunConfig, saved: dict[str, Any], given: set[str]) -> list[str] | None:
    """A resumed run's saved hookpoints (and the flags that chose them) when no flag selects
    them; None: select them from the flags given, then compare."""
    if given & set(HOOKPOINT_FLAGS):
        return None
    args.layers, args.layer_stride = saved.get("layers", []), saved.get("layer_stride", 1)
    return list(saved["hookpoints"])


def _shown(value: Any) -> str:
    """A flag's value as typed on the command line ('' as such: the default it stands for)."""
    if value == "":
        return "'' (the default)"
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _as_saved(value: Any) -> Any:
    """A value as config.json holds it."""
    return json.loads(json.dumps(value, default=str))


def apply_saved_settings(args: RunConfig, run_dir: Path, given: set[str]) -> dict[str, Any]:
    """`--resume`: flags not given take the run's saved values; a given flag that contradicts
    its saved value is an error (but those of RESUME_MAY_CHANGE). NEVER_FROM_DISK flags keep
    their command-line value (a config.json cannot turn on remote code). Returns the saved
    config."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume: {path} does not exist; run without --resume to start anew"
        )
    saved = read_json(path, keys=("hookpoints",))
    flat = {**{k: v for k, v in saved.items() if k != "sae"}, **saved.get("sae", {})}
    conflicts = []
    for key, value in flat.items():
        target = args.sae if hasattr(args.sae, key) else args
        skipped = ("resume", "overwrite", *HOOKPOINT_FLAGS, *NEVER_FROM_DISK)
        if key in skipped or not hasattr(target, key):
            continue
        current = getattr(target, key)
        if key == "model":
            value = resolve_model(value)  # `default`: the embedded model, wherever it is here
        elif key == "dataset":
            value = resolve_dataset(value)  # a folder saved as given by older runs
        if key not in given:
            setattr(target, key, value)
        elif key not in RESUME_MAY_CHANGE and _as_saved(current) != value:
            flag = key.upper() if key in POSITIONALS else f"--{key}"
            conflicts.append(f"{flag} {_shown(current)} (saved: {_shown(value)})")
    if conflicts:
        raise ValueError(
            f"--resume: {path} was saved with other settings: {'; '.join(conflicts)}; leave those "
            "flags out to continue with the saved values, or start a new --run_name"
        )
    return saved


def run_config_dict(args: RunConfig) -> dict[str, Any]:
    """The run's settings as config.json holds them: no token, and the embedded model as
    `default` (its folder's path is this machine's)."""
    config = asdict(args)
    config.pop("hf_token", None)
    config["model"] = portable_model(config["model"])
    return config


def print_summary(rows: list[dict[str, Any]]) -> None:
    width = max(len(r["hookpoint"]) for r in rows)
    print(f"{'hookpoint':<{width}}  targets     FVU     L0  dead %  never %")
    for r in rows:
        print(
            f"{r['hookpoint']:<{width}}  {r['n_targets']:>7}  {r['fvu']:6.3f}  "
            f"{r['l0']:5.1f}  {r['dead_pct']:6.1f}  {r['never_fired_pct']:7.1f}"
        )


def train(args: RunConfig, given: set[str]) -> Trainer:
    """Train as `args` say (`given`: the names of the flags passed on the command line)."""
    rank, world = rank_world()
    token = args.hf_token or os.environ.get("HF_TOKEN")
    run_dir = Path(args.save_dir) / (args.run_name or "unnamed")
    if rank == 0:
        for note in clean_after_kill(run_dir):
            print(note)
    check_run_folder(args, run_dir)
    if rank == 0:
        check_save_dir(run_dir)
    saved, recipe, recipe_file = resolve_recipe(args, run_dir, given)
    if "decoder_dtype" in given and not args.cross_layer:
        raise ValueError(
            f"--decoder_dtype {args.decoder_dtype} sets a cross-layer transcoder's decoders; "
            "per-layer coders (no --cross_layer) are sparsify's, in float32: leave it out"
        )
    if "transcode" in given and not args.sae.transcode and args.cross_layer:
        raise ValueError(
            f"--transcode false: --cross_layer {args.cross_layer} trains a cross-layer "
            "transcoder, which reads each MLP's input and predicts its output; leave "
            "--transcode out, or train per-layer SAEs without --cross_layer"
        )
    # read now: every checkpoint keeps the recipe it trained with (RUN/recipe.toml)
    recipe_bytes = recipe_file.read_bytes() if recipe_file is not None else None
    dataset = args.dataset or recipe.dataset.path
    open_dataset = partial(
        open_examples,
        dataset,
        recipe,
        split=args.split or None,
        streaming=args.streaming,
        shuffle_seed=args.shuffle_seed,
        token=token,
        **parse_data_args(args.data_args),
    )
    # a local dataset opens before the model, whose loading takes minutes at 7B, so a mistyped
    # folder is named at once; a Hub dataset, which may download for long, after it
    examples = open_dataset() if is_local_dataset(dataset) else None
    device = args.device or default_device()
    check_dtype(args.dtype, torch.device(device))
    model, processor, recipe = load_model_and_processor(
        args.model,
        recipe,
        dtype=args.dtype,
        device=device,
        revision=args.revision,
        token=token,
        trust_remote_code=args.trust_remote_code,
    )
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    if vocab and (unknown := [t for t in args.exclude_tokens if not 0 <= t < vocab]):
        raise ValueError(
            f"--exclude_tokens {unknown} are not token ids of the model (0 to {vocab - 1})"
        )
    args.hookpoints = choose_hookpoints(args, model, recipe, saved, given, run_dir)
    coders = build_run_coders(args, model.config.get_text_config().hidden_size, device)
    if examples is None:
        examples = open_dataset()
    # the run's length in batches, which adam's and muon's learning-rate decay is fitted to
    seen = read_state(run_dir, args.batch_size) if args.resume else TrainingState().to_dict()
    left = _num_batches(examples, args, seen["examples_seen"])
    total = None if left is None else seen["batches_seen"] + left
    trainer = build_trainer(args, model, coders, total, run_dir, device)
    trainer.state.n_examples = check_same_examples(trainer, examples, dataset, run_dir)
    trainer.checkpoint = CheckpointWriter(args, run_dir, recipe_bytes, rank)
    wandb_log = None
    if args.log_to_wandb and rank == 0:
        wandb_log = WandbLog.start(run_dir.name, run_config_dict(args), args.wandb_log_frequency)
        trainer.on_step = wandb_log
    stream = BatchStream(
        examples,
        processor,
        recipe,
        batch_size=args.batch_size,
        ctx_len=args.ctx_len,
        max_positions=getattr(model.config.get_text_config(), "max_position_embeddings", None),
        tokens=args.tokens,
        exclude_tokens=tuple(args.exclude_tokens),
        strict=args.strict,
        start_example=trainer.state.examples_seen,
        max_examples=args.max_examples,
        rank=rank,
        world_size=world,
    )
    # batches short of an optimizer step would be trained and dropped again (Trainer.fit)
    to_step = args.grad_acc_steps - trainer.state.global_step % args.grad_acc_steps
    if args.resume and left is not None and left < to_step:
        state = trainer.state
        gives = (
            f"all that --max_examples {args.max_examples} gives"
            if left == 0
            else f"and the {left} more that --max_examples {args.max_examples} gives are too few "
            f"for an optimizer step (--grad_acc_steps {args.grad_acc_steps})"
        )
        print(
            f"--resume: {run_dir} has trained on {state.examples_seen} examples "
            f"({state.batches_seen} batches) already, {gives}: nothing to do (nothing was "
            "written); pass a larger --max_examples to train further",
            file=sys.stderr,
        )
        return trainer
    loader = batch_loader(stream, args.num_workers, pin_memory=torch.device(device).type == "cuda")
    print(describe_run(args, coders, recipe.name, world))
    try:
        trainer.fit(loader, total)
    except KeyboardInterrupt as err:
        if rank == 0:  # the progress bar has ended its line
            how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
            print(f"{how} at step {trainer.state.global_step}: {saved_note(trainer, run_dir)}",
                  file=sys.stderr)  # fmt: skip
        raise reported_interrupt(err) from None
    if wandb_log is not None:
        wandb_log.finish()
    if rank == 0:
        report(trainer, args, run_dir, token)
    return trainer


def resolve_recipe(
    args: RunConfig, run_dir: Path, given: set[str]
) -> tuple[dict[str, Any] | None, Recipe, Path | None]:
    """The run's saved config (`--resume`; None: a new run), its recipe and the recipe's file
    (None: a shipped recipe). A new run takes the recipe's [train] defaults into `args`, a
    resumed one its saved settings."""
    if not args.resume:
        recipe = find_recipe(args.recipe or None, model_id=args.model)
        recipe_file = Path(args.recipe) if args.recipe and is_recipe_file(args.recipe) else None
        # a resumed run's config.json holds the defaults it started with; errors name the
        # file the user wrote (its `name` may be a shipped recipe's it was copied from)
        label = str(recipe_file) if recipe_file is not None else recipe.name
        apply_recipe_defaults(args, recipe.train_defaults, given, label)
        return None, recipe, recipe_file
    saved = apply_saved_settings(args, run_dir, given)
    # the run's own copy of a --recipe PATH, wherever it is resumed from
    recipe = run_recipe(run_dir, args.recipe, args.model)
    return saved, recipe, run_recipe_file(run_dir, args.recipe)


def choose_hookpoints(
    args: RunConfig,
    model: PreTrainedModel,
    recipe: Recipe,
    saved: dict[str, Any] | None,
    given: set[str],
    run_dir: Path,
) -> list[str]:
    """The hookpoints the flags select (a resumed run's saved ones when no flag selects them);
    a resumed run refuses others than it trained."""
    hookpoints = resume_hookpoints(args, saved, given) if saved else None
    if hookpoints is None:
        hookpoints = select_hookpoints(
            model, recipe, args.hookpoints or None, args.layers or None, args.layer_stride
        )
    if saved and hookpoints != saved["hookpoints"]:
        raise ValueError(
            f"--resume: {', '.join(f'--{k}' for k in HOOKPOINT_FLAGS if k in given)} select "
            f"{hookpoints} but {run_dir} trained {saved['hookpoints']}; leave them out to "
            "continue with the saved hookpoints"
        )
    return hookpoints


def build_run_coders(args: RunConfig, d_in: int, device: str) -> CoderSet:
    """The coders of `args.hookpoints` (this process's, with --distribute_modules), after
    checking that k fits the width and a CLT fits the device's free memory."""
    rank, world = rank_world()
    decoder_dtype = resolve_decoder_dtype(args.decoder_dtype, torch.device(device))
    free = free_memory_bytes(torch.device(device))
    num_latents = args.sae.num_latents or d_in * args.sae.expansion_factor
    if args.sae.k > num_latents:
        raise ValueError(
            f"--k {args.sae.k} exceeds the coders' {num_latents} latents (--num_latents, or "
            f"--expansion_factor x the model's width {d_in})"
        )
    if args.sae.multi_topk:
        # stock sparsify takes each token's top 4k pre-activations: more than exist is a crash
        first_k = min(num_latents, 10 * d_in) if args.k_decay_steps else args.sae.k
        if 4 * first_k > num_latents:
            decay = (
                f" (--k_decay_steps: k starts at min({num_latents} latents, 10 x the model's "
                f"width {d_in}))"
                if args.k_decay_steps
                else ""
            )
            raise ValueError(
                f"--multi_topk decodes the top 4 x k = {4 * first_k} latents of each token"
                f"{decay}, but the coders have {num_latents}: a smaller --k, more latents or no "
                "--multi_topk"
            )
    if args.cross_layer and free is not None and args.optimizer != "muon":
        size = (len(args.hookpoints), num_latents, d_in, args.cross_layer)
        needed = (
            shard_memory_bytes(
                *size, world, rank, args.optimizer, decoder_dtype_bytes=decoder_dtype.itemsize
            )
            if args.distribute_modules  # this process's layers
            else training_memory_bytes(
                *size, args.optimizer, decoder_dtype_bytes=decoder_dtype.itemsize
            )
        )
        # before allocating any of it
        check_training_fits(needed, free, args.optimizer, decoder_dtype.itemsize)
    return build_coders(
        args.hookpoints,
        d_in,
        args.sae,
        args.cross_layer,
        torch.device(device),
        init_seed=args.init_seeds[0],
        decoder_dtype=decoder_dtype,
        distribute=args.distribute_modules,
    )


def build_trainer(
    args: RunConfig,
    model: PreTrainedModel,
    coders: CoderSet,
    total: int | None,
    run_dir: Path,
    device: str,
) -> Trainer:
    """The trainer with its optimizers: fresh, at the state `--resume` saved in `run_dir`, or
    from the coders of `--finetune`."""
    optimizers, schedulers = build_optimizers(args, coders, total or 10**6)
    trainer = Trainer(model, coders, args, optimizers, schedulers)
    if args.resume and isinstance(coders, ShardedCoders):
        read_sharded_training_state(run_dir, trainer)
        trainer.saved_step = trainer.state.global_step
        print(f"Resuming {run_dir} at step {trainer.state.global_step}")
    elif args.resume:
        if shard_file(run_dir, 0).is_file():
            raise ValueError(
                f"{run_dir} was trained with --distribute_modules; resume it with "
                "--distribute_modules and the same number of processes"
            )
        read_training_state(run_dir, trainer)
        trainer.saved_step = trainer.state.global_step
        print(f"Resuming {run_dir} at step {trainer.state.global_step}")
    elif args.finetune and isinstance(coders, ShardedCoders):
        load_owned_tensors(coders, args.finetune)
    elif args.finetune:
        load_for_finetune(whole_coders(coders), args.finetune, device)
    return trainer


@dataclass
class CheckpointWriter:
    """`Trainer.checkpoint`: writes the run folder (coders, config.json, training state and the
    run's recipe file) and, with --save_best, copies each improved hookpoint to its best folder."""

    args: RunConfig
    run_dir: Path
    recipe_bytes: bytes | None
    """The run's recipe file (None: a shipped recipe), kept in every checkpoint."""
    rank: int

    def __call__(self, trainer: Trainer) -> None:
        # compared first: the best losses are part of the state the checkpoint saves
        improved = improved_since_last_check(trainer) if self.args.save_best else []
        self.write(trainer)
        if trainer.saved_step is None and not self.args.resume and self.rank == 0:
            # this run's first checkpoint replaced RUN: a RUN-best was the replaced run's
            shutil.rmtree(best_dir(self.run_dir), ignore_errors=True)
        if improved and self.rank == 0:  # copied from the checkpoint just written
            keep_best(self.run_dir, trainer.coders.hookpoints, improved)
        if dist.is_initialized():
            dist.barrier()

    def write(self, trainer: Trainer) -> None:
        if isinstance(trainer.coders, ShardedCoders):
            write_sharded_checkpoint(
                trainer, self.run_dir, run_config_dict(self.args), self.write_recipe
            )
            return
        if self.rank != 0:
            return
        # the live training weights, read before eval_weights swaps in the averaged ones
        params = live_parameters(trainer)
        state = partial(self.write_state, trainer, params, trainer.summary())
        with eval_weights(trainer.optimizers):
            save_coders(
                whole_coders(trainer.coders),
                self.run_dir,
                config=run_config_dict(self.args),
                write_extra=state,
            )

    def write_state(
        self,
        trainer: Trainer,
        params: dict[str, torch.Tensor],
        summary: list[dict[str, Any]],
        folder: Path,
    ) -> None:
        """Rank 0's files beside the coders: the training state and the run's recipe."""
        write_training_state(folder, trainer, params, summary)
        self.write_recipe(folder)

    def write_recipe(self, folder: Path) -> None:
        if self.recipe_bytes is not None:
            (folder / RUN_RECIPE_FILE).write_bytes(self.recipe_bytes)


def describe_run(args: RunConfig, coders: CoderSet, recipe_name: str, world: int) -> str:
    """What trains, on what, spread how: the line printed before training."""
    kind = (
        f"cross-layer transcoder (cross_layer {args.cross_layer})"
        if args.cross_layer
        else ("per-layer transcoders" if args.sae.transcode else "sparse autoencoders")
    )
    if isinstance(coders, ShardedCoders):
        spread = f"sharded over {world} process(es): {coders.plan()}"
    else:
        n_params = sum(p.numel() for p in coders.parameters())
        spread = f"{n_params:_} coder parameters, {world} process(es)"
    return (
        f"Training {kind} on {len(args.hookpoints)} hookpoints of {args.model} ({recipe_name} "
        f"recipe), {spread}"
    )


def report(trainer: Trainer, args: RunConfig, run_dir: Path, token: str | None) -> None:
    """Rank 0's end of a run: the summary table, the end-to-end loss, skipped images, where
    the run is, and its upload (--push_to_hub)."""
    print_summary(trainer.summary())
    if trainer.state.loss_history:
        recent = trainer.state.loss_history[-20:]
        print(
            f"end-to-end {args.loss_fn} (last {len(recent)} steps): {sum(recent) / len(recent):.4f}"
        )
    if trainer.state.skipped:
        shown = ", ".join(trainer.state.skipped[:5])
        print(
            f"Skipped {len(trainer.state.skipped)} examples with missing or unreadable "
            f"images (first: {shown}); pass --strict to stop on them instead"
        )
    if trainer.dropped_batches:
        state = trainer.state
        print(
            f"The run ended mid-accumulation: its last {trainer.dropped_batches} batch(es), "
            f"fewer than --grad_acc_steps {args.grad_acc_steps}, made no optimizer step and are "
            f"left out (their gradient was not applied): the checkpoint "
            f"is that of step {state.global_step} ({state.batches_seen} batches, "
            f"{state.tokens_seen} tokens); --resume with a larger --max_examples trains them"
        )
    print(f"Saved to {run_dir}")
    if args.push_to_hub:
        print(f"Uploaded {run_dir} to {push_to_hub(run_dir, args.push_to_hub, token)}")


def check_run_folder(args: RunConfig, run_dir: Path) -> None:
    """A new run does not replace an existing run folder unless told to (--overwrite)."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run and --overwrite replaces it: pass one")
    save_dir = Path(args.save_dir).resolve()
    if run_dir.resolve() in (save_dir, *save_dir.parents):  # `--run_name .` or `..`
        raise ValueError(
            f"--run_name '{args.run_name}' makes the run folder {run_dir}, which is the "
            f"--save_dir {args.save_dir} or a folder above it: a checkpoint replaces its run "
            "folder whole, with every other run in it; pass the name of a folder inside "
            "--save_dir"
        )
    if run_dir.exists() and not run_dir.is_dir():  # a checkpoint would move it aside
        raise ValueError(
            f"{run_dir} is a file, not a run folder; pass another --run_name or --save_dir"
        )
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    finetunes_itself = args.finetune and Path(args.finetune).resolve() == run_dir.resolve()
    if exists and not (args.resume or args.overwrite or finetunes_itself):
        raise ValueError(
            f"{run_dir} already holds a run: pass --resume to continue it, --overwrite true to "
            "replace it, or another --run_name"
        )
    best = best_dir(run_dir)
    if best.is_dir() and not (args.resume or args.overwrite or finetunes_itself):
        raise ValueError(
            f"{best} holds the best coders of an earlier run named {run_dir.name}: pass "
            "--overwrite true to replace it with this run's, or another --run_name"
        )


def check_save_dir(run_dir: Path) -> None:
    """The run folder can be written where --save_dir puts it, checked before the model loads:
    found at the first checkpoint, that would come after --save_every steps of training."""
    probe = temp_dir(run_dir)  # what a checkpoint is first written into
    missing = [
        folder for folder in (run_dir.parent, *run_dir.parent.parents) if not folder.exists()
    ]
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        file_in_path = isinstance(err, FileExistsError | NotADirectoryError)
        reason = "a file stands in its path" if file_in_path else err.strerror or str(err)
        raise OSError(
            f"cannot write the run folder {run_dir} ({reason}); pass a --save_dir this "
            "process can write"
        ) from None
    finally:
        # the first checkpoint makes them again: a run that fails before it leaves none behind
        for folder in missing:  # deepest first; rmdir removes empty folders only
            with suppress(OSError):
                folder.rmdir()


def saved_note(trainer: Trainer, run_dir: Path) -> str:
    """Where an interrupted run's work is, and how to continue it."""
    if trainer.saved_step is None:
        return "nothing was saved yet"
    return (
        f"the checkpoint of step {trainer.saved_step} is in {run_dir}; continue it with "
        f"`python -m vlm_sparsify --save_dir {run_dir.parent} --run_name {run_dir.name} --resume`"
    )


def check_same_examples(trainer: Trainer, examples: Any, dataset: str, run_dir: Path) -> int | None:
    """The dataset's size (None: a Hugging Face dataset, read as a stream), which a resumed
    run must find unchanged: the examples are shuffled, so one more or less reorders them all
    and the run would go on with examples it trained on and skip others, silently."""
    try:
        n = len(examples)
    except TypeError:
        return None
    saved = trainer.state.n_examples
    if saved is not None and n != saved:
        raise ValueError(
            f"--resume: DATASET {dataset} holds {n} examples, but {saved} when "
            f"{run_dir} trained on it: their shuffled order changed, so the run would not go on "
            "with the examples it has not seen; restore the dataset, or start a new run from "
            f"this one's coders: --finetune {run_dir} --run_name NEW"
        )
    return n


def _num_batches(examples: Any, args: RunConfig, start_example: int = 0) -> int | None:
    """The batches left from raw example `start_example` on (its batch's rest counts as one;
    None: a stream without --max_examples)."""
    try:
        n = len(examples)
    except TypeError:
        if args.max_examples is None:
            return None
        n = args.max_examples
    n = min(n, args.max_examples or n)
    if n <= start_example:
        return 0
    return -(-n // args.batch_size) - start_example // args.batch_size


@cache
def recipe_flags() -> frozenset[str]:
    """Flags whose default a shipped recipe's [train] table replaces (parsed on first --help)."""
    return frozenset(key for r in shipped_recipes().values() for key in r.train_defaults)


class HelpFormatter(SimpleHelpFormatter):
    """simple-parsing's help, saying which defaults the recipe replaces; a help text that gives
    its own default keeps it alone."""

    def _get_help_string(self, action: Action) -> str | None:
        text = action.help or ""
        if "(default:" in text:
            return text
        if action.dest.rsplit(".", 1)[-1] in recipe_flags():
            return f"{text} (default: the recipe's [train] value, else %(default)s)"
        return super()._get_help_string(action)

    def _format_args(self, action: Action, default_metavar: str) -> str:
        if not action.option_strings and action.nargs == "?":  # MODEL, DATASET
            return f"[{action.metavar}]"
        return super()._format_args(action, default_metavar)


SPARSIFY_FLAGS_NOT_TAKEN = {
    "--text_column": "give the recipe's [dataset] text_column in a recipe file, --recipe PATH "
    "(docs/recipes.md)",
    "--load_in_8bit": "no quantised models: --dtype",
    "--data_preprocessing_num_proc": "nothing is pre-tokenised, the processor runs in "
    "--num_workers DataLoader workers",
}
"""`python -m sparsify` flags refused here (an error, not ignored), with what to use instead."""


def parse_run_config(argv: list[str]) -> tuple[RunConfig, set[str]]:
    """The run's settings and the names of those given on the command line (a positional counts
    when it is not its default)."""
    parser = ArgumentParser(
        prog="python -m vlm_sparsify",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
        not_taken=SPARSIFY_FLAGS_NOT_TAKEN,
    )
    parser.add_arguments(RunConfig, dest="config")
    args: RunConfig = parser.parse_args(argv).config

    def given(option: str) -> bool:
        if option.startswith("--"):
            return any(a == option or a.startswith(f"{option}=") for a in argv)
        return any(a.startswith(option) and not a.startswith("--") for a in argv)

    names = {
        action.dest.rsplit(".", 1)[-1]
        for action in parser._actions
        if any(map(given, action.option_strings))
    }
    names |= {"model"} if args.model != DEFAULT_MODEL else set()
    names |= {"dataset"} if args.dataset else set()
    return args, names


def without_token(argv: list[str]) -> list[str]:
    """`argv` with the value of `--hf_token` replaced by `***`."""
    hidden = ["--hf_token=***" if a.startswith("--hf_token=") else a for a in argv]
    for i, a in enumerate(hidden[:-1]):
        if a == "--hf_token":
            hidden[i + 1] = "***"
    return hidden


def run(argv: list[str] | None = None) -> Trainer | None:
    argv = sys.argv[1:] if argv is None else argv
    init_distributed(timeout=timedelta(hours=2))
    args, given = parse_run_config(argv)
    # W&B saves the command line with the run's metadata (and uploads it): never the token
    sys.argv[1:] = without_token(sys.argv[1:])
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    try:
        with nullcontext() if rank_zero else redirect_stdout(None):
            return train(args, given)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    """Console entry point: bad input (or a NaN loss) ends with one clear line, Ctrl-C with
    where the last checkpoint is; no traceback."""
    run_cli(run, NonFiniteLossError)


if __name__ == "__main__":
    main()
