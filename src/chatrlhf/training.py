"""Pieces every training recipe shares: seeding, the learning-rate schedule, checkpoints, and
the C allocator's settings for the training process.

A checkpoint is a folder ``OUTPUT/checkpoints/step-NNNNNNN`` holding the model in the Hugging Face
format and ``trainer_state.pt`` (step, optimizer, scheduler, random states, and whatever else the
recipe adds). It is written to a temporary folder and renamed (``models.save_model``), so a kill
never leaves half a checkpoint; an unreadable one is reported and an older one used.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from chatrlhf import models

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
# keep_freed_memory's settings: the environment variable that sets each at start-up, and its
# glibc mallopt(3) parameter and value (at most 2**31 - 1: mallopt takes a C int).
MALLOPT = {"MALLOC_TRIM_THRESHOLD_": (-1, 2**31 - 1), "MALLOC_TOP_PAD_": (-2, 2**30),
           "MALLOC_MMAP_THRESHOLD_": (-3, 2**31 - 1)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocations instead of handing it back
    to the system: buffers up to 2 GiB come from the heap, which is never trimmed. By default
    glibc maps each buffer over 32 MiB afresh and unmaps it when freed, and trims the heap's free
    top, so every training step pays page faults on the activation buffers it freed the step
    before: a fifth of a smollm2 SFT step and 3% of a MiniLM reward step on 2 CPU cores (README,
    Speed). The process keeps its peak memory instead, as PyTorch's GPU caching allocator does.

    The ``chatrlhf`` command, the throughput benchmark and the tests call this at start; library
    users may call it once. Returns whether it applied: not on other C libraries, nor where the
    user set any of ``MALLOPT``'s variables or malloc tunables in ``GLIBC_TUNABLES`` (theirs win)."""
    if any(name in os.environ for name in MALLOPT) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc, whose mallopt takes these parameters
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in MALLOPT.values())


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, torch >= 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def use_bf16(setting: bool | str) -> bool:
    """A ``bf16`` setting (true, false or "auto") -> whether to autocast to bf16."""
    return native_bf16() if setting == "auto" else bool(setting)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at each step: linear warmup, then decay."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 if schedule == "constant" else max(0.0, 1 - progress)
    return factor


def optimizer_and_scheduler(model, lr: float, weight_decay: float, schedule: str,
                            warmup_ratio: float, total_steps: int):
    """AdamW over the trainable parameters and its LambdaLR schedule.

    The fused implementation (one kernel per parameter, as the Hugging Face Trainer's default
    ``adamw_torch_fused``) where torch has it for the parameters' device: on CPU it takes a
    quarter of the time of the per-operation one, with the same update up to rounding.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)
    warmup = int(warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup, total_steps))
    return optimizer, scheduler


# ---- checkpoints ----------------------------------------------------------------------------

# trainer_state.pt's layout: tensors, numbers, strings, lists and dicts only, so that it loads
# with torch.load(weights_only=True): a shared output folder must not be a way to run code.
STATE_FORMAT = 2
SHARDED_STATE = "sharded_state"  # accelerate's save_state folder, under DeepSpeed and FSDP


class EarlierFormatError(ValueError):
    """A checkpoint written by an earlier chatrlhf, in a format this one does not load."""


def load_state_file(file: Path) -> dict:
    """A checkpoint's training state, loaded without unpickling code."""
    import pickle

    try:
        state = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as error:
        raise EarlierFormatError(
            f"{file}: written by an earlier chatrlhf (its random states need pickle, which is no "
            f"longer loaded: {str(error).splitlines()[0]}). Start afresh with train.overwrite=true, "
            "or finish that run with the chatrlhf version that wrote it") from None
    if state.get("format") != STATE_FORMAT:
        raise EarlierFormatError(f"{file}: training state format {state.get('format', 1)}, this chatrlhf "
                                 f"reads format {STATE_FORMAT}; start afresh with train.overwrite=true")
    return state


def check_checkpoint(folder: Path) -> None:
    """Raise if a checkpoint folder cannot be resumed from: its training state, metadata or
    model weights do not load (a truncated or corrupted file; a bit flip inside a tensor is
    not detected, there are no checksums)."""
    load_state_file(folder / STATE_FILE)
    json.loads((folder / models.METADATA_FILE).read_text())
    weights = [p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern)]
    weights += [p for pattern in ("*.safetensors", "*.bin") for p in (folder / models.ADAPTER_DIR).glob(pattern)]
    if not weights:
        raise FileNotFoundError(f"no model weights in {folder}")
    for file in weights:
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as tensors:  # checks the header against the file size
                for name in tensors.keys():
                    tensors.get_slice(name)
        else:
            torch.load(file, weights_only=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that loads; broken ones are reported and passed over, and folders
    left by a write that was killed (``.step-*``, never renamed into place) are reported. A
    checkpoint of an earlier format is an error, not passed over."""
    folder = Path(output_dir) / CHECKPOINTS
    candidates = sorted(folder.glob("step-*"), reverse=True) if folder.exists() else []
    unfinished = sorted(folder.glob(".step-*")) if folder.exists() else []
    if unfinished:
        print(f"ignoring {len(unfinished)} unfinished checkpoint folder(s) left by an interrupted "
              f"write: {', '.join(p.name for p in unfinished)} (removed at the next save)",
              file=sys.stderr)
    for candidate in candidates:
        try:
            check_checkpoint(candidate)
            return candidate
        except EarlierFormatError:
            raise
        except Exception as error:  # a truncated or corrupted file: fall back to an older one
            print(f"checkpoint {candidate} is unreadable ({error}); trying an older one", file=sys.stderr)
    return None


# What a run appends to in its output folder, beside checkpoints/.
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl")


def resume_path(resume: bool | str, output_dir: str | Path, overwrite: bool = False, log=print) -> Path | None:
    """What ``train.resume`` points at: a given checkpoint, the latest one, or None.

    A run that does not resume into a folder holding an earlier run's checkpoints or logs stops
    with a message, unless ``overwrite``: then they are removed, and said so (appending would mix
    two runs in one log, and a later resume could pick up the earlier run's checkpoint)."""
    output_dir = Path(output_dir)
    if not resume:
        earlier = [output_dir / name for name in RUN_LOGS if (output_dir / name).exists()]
        if (output_dir / CHECKPOINTS).exists():
            earlier.append(output_dir / CHECKPOINTS)
        if earlier and not overwrite:
            raise FileExistsError(
                f"{output_dir} holds an earlier run ({', '.join(p.name for p in earlier)}): continue it with "
                "train.resume=true, or start afresh with train.overwrite=true (which deletes them), or "
                "choose another train.output_dir")
        if earlier:
            log(f"{output_dir}: starting afresh (train.overwrite=true); removing the earlier run's "
                f"{', '.join(p.name for p in earlier)}")
        for path in earlier:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    if isinstance(resume, str):
        return Path(resume)
    found = latest_checkpoint(output_dir)
    if found is None:
        log(f"no checkpoint in {output_dir}/{CHECKPOINTS}; starting from the beginning")
    return found


def rng_state() -> dict:
    """Python's, numpy's and torch's random states as numbers and tensors (no pickle)."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rest": [int(position), int(has_gauss), float(cached)], "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    position, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def drop_later_steps(log_file: Path, step: int, log=print) -> None:
    """Remove the metrics.jsonl lines of steps after ``step``: a run killed between two
    checkpoints logged steps that the resumed run does again (a line cut by the kill goes too)."""
    if not log_file.exists():
        return
    kept, dropped = [], 0
    for line in log_file.read_text().splitlines():
        try:
            entry_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            entry_step = None
        if entry_step is not None and entry_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        staging = log_file.with_name(log_file.name + ".tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        staging.replace(log_file)
        log(f"{log_file}: dropped {dropped} line(s) logged after step {step}, done again now")


# ---- the engine -----------------------------------------------------------------------------

def has_accelerator() -> bool:
    """A GPU (or other accelerator) torch can use."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator else torch.cuda.is_available()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# The fast paths that ran since a recipe last looked (``took``): "padding-free encoder",
# "prompt sharing", "reply-only output layer". The recipes log them at their first step, so a
# user (and the tests) can see which path a launch config gets.
FAST_PATHS: set[str] = set()


def took(path: str) -> None:
    FAST_PATHS.add(path)


def fast_paths() -> list[str]:
    """The fast paths that ran since the last call (the plain forward when none did)."""
    ran = sorted(FAST_PATHS) or ["plain forward"]
    FAST_PATHS.clear()
    return ran


def inner(model):
    """The model inside a DDP or DeepSpeed wrapper (a peft model stays one)."""
    return getattr(model, "module", model)


def call_through(model, function):
    """``function(inner(model))`` run as ``model``'s forward, for fast paths that call the
    model's parts (its body, its head) rather than the whole model: through DDP's forward the
    gradients are synchronised, through FSDP's and DeepSpeed's the weights are gathered, as for
    an ordinary forward. ``function`` must not call the whole model itself."""
    body = inner(model)
    body.forward = lambda: function(body)
    try:
        return model()
    finally:
        del body.forward  # back to the class's forward


class Engine:
    """What every recipe's loop does the same way, on Accelerate: device placement, splitting a
    batch over the processes, gradient accumulation, autocast, clipping, stepping, metrics,
    checkpoints and the final save. A recipe keeps its own loop body (its loss)::

        engine = Engine(train.output_dir, train.grad_accum, train.max_grad_norm, train.bf16)
        model, optimizer = engine.prepare(model, optimizer)
        for step in engine.progress(start, total, "sft"):
            for micro in range(train.grad_accum):
                with engine.accumulate(model), engine.autocast():
                    loss = ...                      # this process's share of the micro-batch
                engine.backward(loss)
            grad_norm = engine.step(model, optimizer, scheduler, step)

    It runs the same under ``chatrlhf X`` (one process) and ``accelerate launch -m chatrlhf X``
    with DDP, DeepSpeed ZeRO 2/3 or FSDP 2: ``backward`` divides by ``grad_accum`` (DeepSpeed
    divides inside its engine), the gradients are reduced once per accumulation window, and
    DeepSpeed steps once per window. With ``train.grad_accum`` and ``train.max_grad_norm``
    taking precedence over a DeepSpeed config's own. On a machine without GPU the processes join
    a gloo group; an FSDP config there, which accelerate ignores without a word, is applied.
    """

    def __init__(self, output_dir: str | Path, grad_accum: int = 1, max_grad_norm: float = 1.0,
                 bf16: bool | str = False, batch_size: int = 1, log_with: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, InitProcessGroupKwargs

        os.environ.pop("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", None)  # train.grad_accum decides
        gpu, deepspeed = has_accelerator(), _env_true("ACCELERATE_USE_DEEPSPEED")
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by accelerate launch / torchrun
        self.output_dir = Path(output_dir)
        self.max_grad_norm = max_grad_norm
        self.bf16 = use_bf16(bf16)
        if not launched:  # one process may build several engines (tests, notebooks) with other settings
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        # cpu=True: processes started by `accelerate launch` (torchrun) on a machine without GPU
        # join a gloo group (configs/accelerate/cpu_2proc.yaml); it would turn DeepSpeed off.
        self.accelerator = Accelerator(
            mixed_precision="bf16" if self.bf16 else "no", cpu=not gpu and not deepspeed,
            gradient_accumulation_steps=grad_accum, log_with=log_with, project_dir=str(output_dir),
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched and not gpu else [])
        self.accelerator.step = 0  # the accumulation window's count (resumes start windows afresh)
        FAST_PATHS.clear()
        state = self.accelerator.state
        if _env_true("ACCELERATE_USE_FSDP") and state.distributed_type != DistributedType.FSDP:
            from accelerate.state import PartialState
            from accelerate.utils import FullyShardedDataParallelPlugin

            # accelerate applies FSDP on GPU-type devices only; on CPU processes it is set here
            # (in the state every later AcceleratorState() copies, too).
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()
        if state.distributed_type == DistributedType.DEEPSPEED:
            ds = state.deepspeed_plugin.deepspeed_config
            ds["gradient_accumulation_steps"] = grad_accum
            ds["gradient_clipping"] = max_grad_norm
            ds["train_micro_batch_size_per_gpu"] = batch_size
            ds["train_batch_size"] = batch_size * grad_accum * self.accelerator.num_processes
            state.deepspeed_plugin.gradient_accumulation_steps = grad_accum
        self.grad_accum = grad_accum

    # -- processes --
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def kind(self) -> str:
        """DDP, DEEPSPEED, FSDP, ... or NO (one process)."""
        return self.accelerator.distributed_type.value

    @property
    def sharded(self) -> bool:
        """Parameters (ZeRO-3, FSDP) or optimizer state (ZeRO 1-2) split over the processes."""
        return self.kind in ("DEEPSPEED", "FSDP")

    def log(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs)

    def describe(self) -> str:
        if self.num_processes == 1:
            return f"1 process on {self.device.type}"
        return f"{self.num_processes} processes ({self.kind} on {self.device.type}); each takes its share of every batch"

    def share(self, items: list) -> tuple[list, float]:
        """This process's share of a micro-batch's ``items`` and the weight of its mean loss.

        The processes' gradients are averaged: weighing each process's mean loss by its share of
        the items makes that the mean over the whole micro-batch, also when it does not split
        evenly. A process left with nothing runs the first item at weight 0 (every process must
        take part in each backward)."""
        mine = items[self.accelerator.process_index::self.num_processes]
        return (mine, len(mine) * self.num_processes / len(items)) if mine else (items[:1], 0.0)

    def mine(self, items: list) -> list:
        """This process's share of ``items`` (no weight: for work without gradients)."""
        return items[self.accelerator.process_index::self.num_processes]

    def gather(self, values: list) -> list:
        """Every process's list, concatenated in process order (each a share from ``mine``), then
        put back in the original order of the items ``mine`` split."""
        if self.num_processes == 1:
            return values
        from accelerate.utils import gather_object

        parts = gather_object([values])
        out = [None] * sum(map(len, parts))
        for rank, part in enumerate(parts):
            out[rank::self.num_processes] = part
        return out

    def each_share(self, model, items: list, function) -> list:
        """``function(model, items)`` -> one value per item, each process running its share
        through the unwrapped model, the shares gathered in the items' order. A sharded model
        needs every process in each of its forwards: there every process runs all the items."""
        if self.sharded:
            return function(model, items)
        return self.gather(function(self.unwrap(model), self.mine(items)))

    def reduce_sum(self, value: float) -> float:
        if self.num_processes == 1:
            return float(value)
        return float(self.accelerator.reduce(torch.tensor(float(value), device=self.device), "sum"))

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    # -- training --
    def prepare(self, model, *objects):
        """Wrap the model (DDP, DeepSpeed or FSDP) and optimizers for this launch."""
        plugin = self.accelerator.state.fsdp_plugin if self.kind == "FSDP" else None
        if plugin is not None and plugin.transformer_cls_names_to_wrap is None:
            # Shard each layer, not a block holding the input embeddings (BertEmbeddings is in
            # BERT's _no_split_modules): accelerate shards the embeddings on their own too, and
            # sharding them twice fails.
            embeddings = model.get_input_embeddings()
            plugin.transformer_cls_names_to_wrap = sorted({
                type(m).__name__ for m in model.modules()
                if type(m).__name__ in (getattr(model, "_no_split_modules", None) or [])
                and not any(sub is embeddings for sub in m.modules())})
        return self.accelerator.prepare(model, *objects)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def accumulate(self, *models):
        """The block of one micro-batch: gradients are reduced over the processes at the last
        micro-batch of the accumulation window only."""
        return self.accelerator.accumulate(*models)

    def autocast(self):
        """bf16 autocast on the engine's device when train.bf16 is on (weights stay float32)."""
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled by 1 / grad_accum."""
        self.accelerator.backward(loss)

    def step(self, model, optimizer, scheduler, step: int) -> float:
        """Clip (measured also without clipping: a non-finite norm stops the run before the
        optimizer step), step the optimizer and the schedule, clear the gradients. Returns the
        norm before clipping; nan under DeepSpeed, which clips inside its engine."""
        norm = self.accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm or float("inf"))
        grad_norm = float("nan") if norm is None else float(norm)
        if norm is not None and not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {step + 1}; the last good "
                                     f"checkpoint is the newest in {self.output_dir}/{CHECKPOINTS}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def progress(self, start: int, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(range(start, total), initial=start, total=total, desc=desc,
                    disable=not self.is_main, dynamic_ncols=True)

    def write_metrics(self, entry: dict, name: str = "metrics.jsonl") -> None:
        """Append one JSON line (main process), and log the numbers to the trackers."""
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / name).open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.accelerator.trackers and "step" in entry:
            self.accelerator.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=entry["step"])

    # -- checkpoints --
    def start(self, resume: bool | str, overwrite: bool = False) -> Path | None:
        """The checkpoint to resume from (or None), decided on the main process and told to the
        others; a fresh start with ``overwrite`` clears the earlier run's files first."""
        found = resume_path(resume, self.output_dir, overwrite, self.log) if self.is_main else None
        if self.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            holder = [str(found) if found else None]
            broadcast_object_list(holder)
            found = Path(holder[0]) if holder[0] else None
        return found

    def restore(self, checkpoint: Path, model, optimizer, scheduler) -> dict:
        """Optimizer, scheduler and random states from a checkpoint (the weights were loaded with
        the model); returns the whole training state. Written by DDP or one process, it resumes
        on any number of processes; sharded optimizer state needs the launch config that wrote it."""
        state = load_state_file(Path(checkpoint) / STATE_FILE)
        sharded = Path(checkpoint) / SHARDED_STATE
        if self.sharded:
            if not sharded.exists():
                raise ValueError(f"{checkpoint}: no {SHARDED_STATE}/ to resume a {self.kind} run from "
                                 "(written without sharding): resume it without DeepSpeed/FSDP")
            if state.get("processes") != self.num_processes:
                raise ValueError(f"{checkpoint}: its sharded optimizer state is split over "
                                 f"{state.get('processes')} processes, this run has {self.num_processes}")
            self.accelerator.load_state(str(sharded))
        elif "optimizer" not in state:
            raise ValueError(f"{checkpoint}: written by a {state.get('kind')} run with sharded optimizer "
                             "state; resume it with the same accelerate config")
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.accelerator.step = 0
        if self.is_main:
            drop_later_steps(self.output_dir / "metrics.jsonl", state["step"], self.log)
        return state

    def save_checkpoint(self, step: int, model, tokenizer, metadata: dict, optimizer, scheduler,
                        keep: int, **extra) -> Path:
        """``checkpoints/step-NNNNNNN``, written whole or not at all, older ones pruned. The model
        in the Hugging Face format (a LoRA model: its adapter and head only), gathered from the
        processes when it is sharded, and the training state: optimizer (sharded: accelerate's
        per-process files), scheduler, random states, and ``extra`` (tensors, numbers, lists)."""
        folder = self.output_dir / CHECKPOINTS / f"step-{step:07d}"
        staging = folder.with_name(f".{folder.name}-staging")
        state = {"format": STATE_FORMAT, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                 "kind": self.kind, "processes": self.num_processes, **extra}
        state_dict = self.full_state_dict(model)  # every process takes part
        if self.is_main:
            for stale in folder.parent.glob(".step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        self.wait()
        if self.sharded:
            self.accelerator.save_state(str(staging / SHARDED_STATE))
        else:
            state["optimizer"] = optimizer.state_dict()
        if self.is_main:
            models.save_model(self.unwrap(model), tokenizer, folder, metadata, state={STATE_FILE: state},
                              state_dict=state_dict, merged=False, staging=staging)
            for path in sorted(folder.parent.glob("step-*"))[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
        self.wait()
        return folder

    def full_state_dict(self, model) -> dict | None:
        """The model's whole weights, gathered from the processes when they are sharded (every
        process must call this); None when the model holds them whole."""
        if not self.sharded:
            return None
        if self.kind == "FSDP":  # torch's own gathering (accelerate's misses FSDP set on CPU)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            # On CPU these alias the gathered buffers, which the next reshard frees: copies.
            state_dict = {name: tensor.clone() for name, tensor in state_dict.items()}
        else:
            state_dict = self.accelerator.get_state_dict(model)
        return state_dict if self.is_main else None

    def save_final(self, model, tokenizer, metadata: dict, name: str = "model") -> Path:
        """The trained model as one plain Hugging Face folder (LoRA: merged, plus ``adapter/``),
        gathered from the processes when it is sharded; written by the main process."""
        folder = self.output_dir / name
        state_dict = self.full_state_dict(model)
        if self.is_main:
            models.save_model(self.unwrap(model), tokenizer, folder, metadata, state_dict=state_dict)
        self.wait()
        return folder

    def end(self) -> None:
        if self.accelerator.trackers:
            self.accelerator.end_training()
