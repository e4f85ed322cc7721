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


def check_checkpoint(folder: Path) -> None:
    """Raise if a checkpoint folder cannot be resumed from: its training state, metadata or
    model weights do not load (a truncated or corrupted file; a bit flip inside a tensor is
    not detected, there are no checksums)."""
    torch.load(folder / STATE_FILE, weights_only=False)
    json.loads((folder / models.METADATA_FILE).read_text())
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
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
    left by a write that was killed (``.step-*``, never renamed into place) are reported."""
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
        except Exception as error:  # a truncated or corrupted file: fall back to an older one
            print(f"checkpoint {candidate} is unreadable ({error}); trying an older one", file=sys.stderr)
    return None


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float, step: int, output_dir) -> float:
    """Clip the gradients (``max_grad_norm`` > 0), stop on a non-finite norm before it reaches
    the weights, step the optimizer and the schedule, clear the gradients. Returns the norm
    before clipping (nan without clipping)."""
    grad_norm = (float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
                 if max_grad_norm else float("nan"))
    if max_grad_norm and not math.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm at step {step}; "
                                 f"the last good checkpoint is in {output_dir}/{CHECKPOINTS}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# What a run appends to in its output folder, beside checkpoints/.
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl")


def resume_path(resume: bool | str, output_dir: str | Path, log=print) -> Path | None:
    """What ``train.resume`` points at: a given checkpoint, the latest one, or None.

    A run that does not resume starts afresh: the logs and checkpoints an earlier run left in
    ``output_dir`` are removed, and said so (appending would mix two runs in one log, and a
    later ``train.resume=true`` could pick up the earlier run's checkpoint)."""
    if not resume:
        output_dir = Path(output_dir)
        earlier = [output_dir / name for name in RUN_LOGS if (output_dir / name).exists()]
        if (output_dir / CHECKPOINTS).exists():
            earlier.append(output_dir / CHECKPOINTS)
        if earlier:
            log(f"{output_dir}: starting afresh (train.resume=false); removing the earlier run's "
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


def training_state(step: int, optimizer, scheduler, **extra) -> dict:
    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng_python": random.getstate(), "rng_numpy": np.random.get_state(),
            "rng_torch": torch.get_rng_state(), **extra}


def restore_state(checkpoint: Path, optimizer, scheduler) -> dict:
    """Load optimizer, scheduler and random states from a checkpoint; returns the whole state."""
    state = torch.load(Path(checkpoint) / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng_python"])
    np.random.set_state(state["rng_numpy"])
    torch.set_rng_state(state["rng_torch"])
    return state


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, metadata: dict,
                    state: dict, keep: int) -> Path:
    """Write ``step-NNNNNNN`` atomically and prune all but the ``keep`` newest."""
    folder = Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"
    # Staging folders of a write that was killed: never renamed into place, never read.
    for stale in folder.parent.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    models.save_model(model, tokenizer, folder, metadata, state={STATE_FILE: state})
    for path in sorted(folder.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return folder
