"""Dynamic loss scaling for float16 autocast with :func:`fastmeta.meta_step`.

``meta_step`` computes all of its gradients itself (``torch.autograd.grad``; the
teacher's meta-gradient is a backward with a cotangent, not of a loss), so
``torch.amp.GradScaler``, which scales a loss the caller backwards and unscales the
``.grad`` an optimizer holds, cannot wrap it.  Instead ``meta_step(...,
loss_scale=S)`` runs every backward of the step on ``S·loss`` and divides the
gradients by S before anything uses them (``fastmeta.engine.scaled_grad``); a step
whose scaled gradients overflow raises ``FloatingPointError`` and leaves both models
and both optimizers exactly as they were.  :class:`DynamicLossScale` picks S the
way ``GradScaler`` does::

    scale = DynamicLossScale()
    for batch, quiz in loader:
        with torch.autocast("cuda", dtype=torch.float16):
            try:
                out = fastmeta.meta_step(T, S, batch, quiz, opt_t, opt_s, loss_scale=scale.value)
            except FloatingPointError:
                scale.update(found_inf=True)     # S ← S·backoff; the step was not taken
                continue
        scale.update(found_inf=False)            # S ← S·growth after growth_interval clean steps

bf16 needs none of this (its exponent range is fp32's).  Under fp16 the engine also
brings the teacher's cotangent ``−η·w·c`` (η times smaller than a loss gradient) to
an ordinary gradient's magnitude before the teacher backward, and computes the
student tangent with autocast off (``jvp_precision="fp32"``).
"""
from __future__ import annotations

import math
from typing import Any, Dict

__all__ = ["DynamicLossScale"]


class DynamicLossScale:
    """``GradScaler``'s schedule for the loss scale S, as a plain float.

    ``value`` starts at ``init_scale``; :meth:`update` multiplies it by
    ``backoff_factor`` after a step whose gradients overflowed (that step is skipped
    by the caller) and by ``growth_factor`` after ``growth_interval`` consecutive
    clean steps.  Powers of two by default, so scaling and unscaling are exact.
    ``state_dict``/``load_state_dict`` for checkpoints.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ):
        for name, value, ok in (
            ("init_scale", init_scale, init_scale > 0 and math.isfinite(init_scale)),
            ("growth_factor", growth_factor, growth_factor > 1 and math.isfinite(growth_factor)),
            ("backoff_factor", backoff_factor, 0 < backoff_factor < 1),
            ("growth_interval", growth_interval, isinstance(growth_interval, int) and growth_interval >= 1),
            ("min_scale", min_scale, 0 < min_scale <= init_scale),
        ):
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range")
        self.value = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.clean_steps = 0
        self.overflows = 0

    def update(self, found_inf: bool) -> float:
        """Record one step (overflowed or not); returns the scale for the next step."""
        if found_inf:
            self.overflows += 1
            self.clean_steps = 0
            self.value = max(self.min_scale, self.value * self.backoff_factor)
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.clean_steps = 0
                grown = self.value * self.growth_factor
                if math.isfinite(grown):
                    self.value = grown
        return self.value

    def state_dict(self) -> Dict[str, Any]:
        return {
            "value": self.value,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "min_scale": self.min_scale,
            "clean_steps": self.clean_steps,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("value", "growth_factor", "backoff_factor", "min_scale"):
            setattr(self, key, float(state[key]))
        for key in ("growth_interval", "clean_steps", "overflows"):
            setattr(self, key, int(state[key]))

    def __repr__(self) -> str:
        return f"DynamicLossScale(value={self.value:g}, clean_steps={self.clean_steps}, overflows={self.overflows})"
