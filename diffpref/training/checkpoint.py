"""Crash-safe checkpoints through accelerate.

A checkpoint is written by every rank into ``checkpoint-N.tmp``; only when all ranks are done does
the main process rename it to ``checkpoint-N`` and then atomically rewrite the ``latest`` pointer.
A crash at any point therefore leaves ``latest`` naming a complete checkpoint (or none).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "latest"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    pointer = checkpoints_root(output_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoints_root(output_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_resume(resume_from: str | None, output_dir: str | os.PathLike) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)  # nothing yet: a fresh start, as users of 'latest' expect
    path = Path(resume_from)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"resume_from={resume_from}: no trainer_state.json there; pass a checkpoint-N folder or 'latest'")
    return path


def assert_finite(parameters) -> None:
    for p in parameters:
        if not torch.isfinite(p).all():
            raise FloatingPointError("refusing to save a checkpoint: trainable weights contain NaN/inf")


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, trainer_state: dict,
                    total_limit: int = 0) -> Path:
    root = checkpoints_root(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: it writes each rank's RNG state
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / LATEST)
        _prune(root, keep=total_limit, protect=final)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int, protect: Path) -> None:
    if keep <= 0:
        return
    done = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")),
                  key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())
