"""A run's ``OUTPUT/checkpoint.pt``: what it holds, writing it, and restoring a run from it (``--resume``).

The file (written atomically by :mod:`fastmeta.checkpoint`) holds the run's
fingerprint (the options it must be resumed with, and the number of processes), its
configuration, the ``state_dict`` of both models, the three optimizers, their
schedulers and the three samplers, every process's RNG state, the fp16 loss scale,
and the :class:`_RunState`.  Resuming restores all of them: the run continues
bit-identically.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from fastmeta import checkpoint as ckpt
from fastmeta.train.progress import _log

# the options a checkpoint must have been written with to be resumed (with the number of processes)
_FINGERPRINT_KEYS = ("task", "data_dir", "train_file", "teacher", "student", "algorithm", "hypergrad", "quiz_split",
                     "quiz_from", "batch_size", "seed", "max_seq_length", "optimizer", "max_train_examples")


@dataclass
class _RunState:
    """What a run has done so far: the ``state`` entry of its checkpoints."""

    phase: str  # "teacher_warmup" or "distill"
    step: int = 0
    warmup_step: int = 0
    skipped_steps: int = 0
    best_metric: Optional[float] = None
    best_metrics: dict = field(default_factory=dict)
    best_step: Optional[int] = None
    time_to_best_s: Optional[float] = None
    train_time_to_best_s: Optional[float] = None
    history: list = field(default_factory=list)
    teacher_metrics: Optional[dict] = None
    train_time_s: float = 0.0
    warmup_time_s: float = 0.0
    elapsed_before_s: float = 0.0  # wall seconds of the runs this one resumes
    phase_timings: dict = field(default_factory=dict)
    examples_seen: int = 0
    consecutive_skips: int = 0
    tangent_precision: Optional[str] = None

    def to_dict(self) -> dict:
        """The fields as a (shallow) dict, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load(self, saved: Mapping[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for name, value in saved.items():
            if name in names:
                setattr(self, name, value)


class _Checkpoints:
    """Saving and resuming one run: ``objects`` maps checkpoint entries to what has a ``state_dict``."""

    def __init__(self, cfg, dist, path: Path, objects: Mapping[str, Any], loss_scale, state: _RunState):
        self.cfg, self.dist, self.path = cfg, dist, path
        self.objects, self.loss_scale, self.state = objects, loss_scale, state

    def fingerprint(self) -> dict:
        return {k: getattr(self.cfg, k) for k in _FINGERPRINT_KEYS} | {"world_size": self.dist.world_size}

    def save(self, elapsed_s: float) -> None:
        """Write the checkpoint (RNG states gathered to the main process, which writes); all processes wait."""
        rngs = self.dist.gather_object(ckpt.capture_rng_state())
        if self.dist.is_main:
            ckpt.save_checkpoint(self.path, {
                "fingerprint": self.fingerprint(), "config": dataclasses.asdict(self.cfg),
                **{name: obj.state_dict() for name, obj in self.objects.items()},
                "rng": rngs,
                "loss_scale": None if self.loss_scale is None else self.loss_scale.state_dict(),
                "state": {**self.state.to_dict(), "elapsed_before_s": elapsed_s},
            })
        self.dist.barrier()

    def resume(self, verbose: bool) -> Optional[dict]:
        """Restore from ``--resume`` (``auto``: OUTPUT/checkpoint.pt if any).  Returns ``resumed_from`` or None."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        auto = cfg.resume in ("auto", "true", "1")
        path = self.path if auto else Path(cfg.resume)
        if path.is_dir():
            path = path / ckpt.CHECKPOINT_NAME
        if not path.is_file():
            if not auto:
                raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint at {str(path)!r}")
            _log(verbose, f"[fastmeta.train] --resume: no checkpoint at {path}, starting from scratch")
            return None
        saved = ckpt.load_checkpoint(path, map_location="cpu")
        fingerprint = self.fingerprint()
        if saved["fingerprint"] != fingerprint:
            diff = {k: (saved["fingerprint"].get(k), v) for k, v in fingerprint.items()
                    if saved["fingerprint"].get(k) != v}
            raise ValueError(f"--resume: the checkpoint was written by a different run configuration: {diff}")
        for name, obj in self.objects.items():
            obj.load_state_dict(saved[name])
        state = self.state
        state.load(saved["state"])
        if self.loss_scale is not None and saved.get("loss_scale") is not None:
            self.loss_scale.load_state_dict(saved["loss_scale"])
        ckpt.restore_rng_state(saved["rng"][self.dist.rank])
        _log(verbose, f"[fastmeta.train] resumed from {path} at phase={state.phase} "
                      f"step={state.step} warmup_step={state.warmup_step}")
        return {"path": str(path), "phase": state.phase, "step": state.step, "warmup_step": state.warmup_step}
