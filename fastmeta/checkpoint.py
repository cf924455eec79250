"""Atomic, resumable training checkpoints.

A checkpoint is ONE file written by :func:`save_checkpoint`: the state is serialised
with ``torch.save`` to a temporary file in the same directory, flushed and fsync'ed,
then moved over the target with ``os.replace`` (atomic on POSIX and Windows), so a
run killed at any moment (SIGKILL included) leaves either the previous complete
checkpoint or the new complete one, never a torn file.  Stale ``*.tmp`` files of a
killed write are ignored by :func:`load_checkpoint` and removed by the next save.

What the trainer (``fastmeta.train``) puts in it: both models' ``state_dict``, both
optimizers' and schedulers' state (and the teacher warm-up optimizer's), the RNG
states of every process (:func:`capture_rng_state`: python ``random``, numpy, torch
CPU and every CUDA device), the data order (the samplers' ``epoch``/``position``;
the permutation of epoch e is a pure function of the seed and e), the step counters,
the best score so far, the evaluation history and the run's configuration.  Resuming
from it on the same hardware and software reproduces the uninterrupted run bit for
bit on CPU (tested with a SIGKILL in ``tests/test_checkpoint_resume.py``).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "find_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """Every random number generator a training step may draw from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds CUDA RNG states but CUDA is not available")
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    payload = {"format_version": FORMAT_VERSION, **state}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (clear error if missing or foreign)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r} (nothing to resume)")
    # weights_only=False: the state holds RNG tuples, numpy arrays and the config dict
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} is not a fastmeta checkpoint (format {FORMAT_VERSION})")
    return state


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint file of a run directory, or None."""
    path = Path(output_dir) / CHECKPOINT_NAME
    return path if path.is_file() else None
