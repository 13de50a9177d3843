"""Resumable checkpoints beside the adapter folder: OUT.checkpoints/step-00000010/state.pt.

Why beside OUT and not inside it: OUT is replaced atomically once the adapter is written, and an earlier
adapter there must survive a run that fails; writing checkpoints into it would leave a half-built folder.
Each checkpoint is written atomically too (a temporary folder renamed into place), so a crash while one is
written leaves the previous one whole. A checkpoint holds what a resume needs to continue bit for bit
(nanoGPT's habit: the file carries the config, and the run is rebuilt from it): the trainable weights,
AdamW's and the schedule's state, the RNG states, the loop's counters and curves.

A fresh run that would write checkpoints refuses to start over an interrupted run's checkpoints (it says to
pass --resume latest or remove them), so no checkpoint is lost by a mistyped command; after a run has written
its adapter, its checkpoints are of no further use and are removed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from adapters import atomic_directory
from training.config import MACHINE_LOCAL_FIELDS, RESUME_LATEST, TrainConfig
from training.errors import ConfigError

SUFFIX = ".checkpoints"
STATE_FILE = "state.pt"
STEP_FOLDER = "step-{:08d}"
STEP_PATTERN = re.compile(r"step-(\d+)")
KEEP_LAST = 2  # the newest two: one to fall back on should the newest be damaged on disk
FORMAT_VERSION = 1
# Fields a resumed run may change: none of them alters the weights' trajectory.
RESUME_FREE_FIELDS = ("resume", "out", "checkpoint_every", "eval_batch_size")
# What a field added since a checkpoint was written ran with; machine-local fields (device) are never compared.
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                  if f.default is not dataclasses.MISSING and f.name not in MACHINE_LOCAL_FIELDS}


def checkpoint_root(out: Path) -> Path:
    """OUT.checkpoints, beside the adapter folder OUT."""
    out = Path(out).absolute()
    return out.with_name(out.name + SUFFIX)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_PATTERN.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as root/step-NNNNNNNN/state.pt atomically, then drop all but the newest KEEP_LAST."""
    dest = root / STEP_FOLDER.format(step)
    with atomic_directory(dest) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp / STATE_FILE)
    for old in list_checkpoints(root)[:-KEEP_LAST]:
        shutil.rmtree(old)
    return dest


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """A checkpoint's state (tensors and plain values only: loaded with weights_only, so no code runs)."""
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:  # missing, truncated or not a torch file
        raise ConfigError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: not a checkpoint of this version")
    return state


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint `config.resume` names, or None for a fresh run (refused over an interrupted run's
    checkpoints when this run would write its own there)."""
    root = checkpoint_root(config.out)
    if not config.resume:
        existing = list_checkpoints(root)
        if config.checkpoint_every and existing:
            raise ConfigError(
                f"{root} holds checkpoints of an interrupted run (newest: {existing[-1].name}); "
                f"pass --resume {RESUME_LATEST} to continue it, or remove that folder to start afresh")
        return None
    if config.resume == RESUME_LATEST:
        existing = list_checkpoints(root)
        if not existing:
            raise ConfigError(f"--resume {RESUME_LATEST}: no checkpoint in {root}")
        return existing[-1]
    folder = Path(config.resume).expanduser()
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"--resume {folder}: not a checkpoint folder (no {STATE_FILE})")
    return folder


def check_same_run(saved: dict[str, Any], config: TrainConfig, where: Path) -> None:
    """Refuse to resume with settings that would change the run (data, seed, lr, steps, ...)."""
    now = config.to_manifest()
    saved = {**FIELD_DEFAULTS, **saved}  # a field added since the checkpoint was written: it ran with the default
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE_FIELDS and saved.get(k) != now.get(k))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in changed)
        raise ConfigError(f"cannot resume from {where}: the run's settings differ ({details})")


def remove_checkpoints(out: Path) -> None:
    """Drop OUT.checkpoints once the adapter they led to is written."""
    shutil.rmtree(checkpoint_root(out), ignore_errors=True)
