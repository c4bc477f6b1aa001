"""Atomic training checkpoints: ``RUN/checkpoints/step-00001000/`` folders.

A checkpoint is written into ``.tmp-step-N/`` and renamed to ``step-N/`` only when complete
(``meta.json`` is its last file; files and folders are fsynced before the rename), so a run
killed at any moment - even by ``kill -9`` in the middle of a write - leaves either the
complete folder or a ``.tmp-*`` leftover that is never taken for a checkpoint and is
removed at the next start. Old checkpoints are renamed to ``.trash-*`` before deletion, so
a half-deleted one is never seen either.

Each checkpoint holds (besides accelerate's optimizer / RNG / scaler files):
``generator_trainable.safetensors`` (LoRA + prompt), ``discriminator.safetensors``,
``d3sr.safetensors`` (the D3SR export of the current weights) and, with EMA,
``d3sr_ema.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STEP_RE = re.compile(r"^step-(\d+)$")
META = "meta.json"
EXPORT = "d3sr.safetensors"
EXPORT_EMA = "d3sr_ema.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is missing or incomplete; the message names it."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and STEP_RE.match(path.name) is not None and (path / META).is_file()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``--resume``: ``None`` (fresh), ``latest`` (newest complete one; none = fresh) or a path.

    Raises:
        CheckpointError: an explicit path that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoint_root(output_dir))
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / META).is_file() and (path / "checkpoints").is_dir():
        path = latest_checkpoint(path / "checkpoints") or path  # a run folder: its newest
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
    if not (path / META).is_file():
        raise CheckpointError(
            f"--resume {path}: incomplete checkpoint (no {META}; it was probably being written "
            "when the run stopped) - use an earlier one or --resume latest"
        )
    return path


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable {META} ({err})") from None


def remove_leftovers(root: Path) -> list[Path]:
    """Delete ``.tmp-*`` / ``.trash-*`` folders a killed run left behind."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on folders
    finally:
        os.close(fd)


def finalize(tmp: Path, meta: dict) -> Path:
    """Write ``meta.json`` last, fsync everything and rename ``.tmp-step-N`` to ``step-N``."""
    (tmp / META).write_text(json.dumps(meta, indent=2))
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if final.exists():  # a checkpoint of the same step from an earlier, resumed run
        trash = final.with_name(".trash-" + final.name)
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints."""
    removed = []
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        trash = path.with_name(".trash-" + path.name)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


def export_file(checkpoint: Path, ema: bool = False) -> Path:
    """The D3SR ``.safetensors`` inside a checkpoint folder (the EMA one with ``ema``)."""
    name = EXPORT_EMA if ema else EXPORT
    path = checkpoint / name
    if not path.is_file():
        hint = " (was the run trained with train.ema_decay > 0?)" if ema else ""
        raise CheckpointError(f"{checkpoint}: no {name}{hint}")
    return path
