"""Argument checks shared by fastmeta's public entry points (the bottom layer: imports only torch).

The public functions (``fastmeta.meta_step``, ``fastmeta.engine.meta_gradient``,
``fastmeta.kd_loss`` and its siblings, ``fastmeta.mixed_hvp``) check their arguments
with these helpers ONCE; the functions they call trust the checked values.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["check_flag", "check_number", "check_choice"]


def check_flag(name: str, value: Any) -> bool:
    """``value`` must be exactly True or False (``"false"``, 0, None are a ``TypeError`` naming ``name``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value: Any, choices) -> None:
    """``value`` must be one of the strings ``choices`` (``ValueError`` naming ``name`` and the choices)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_number(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """A real number in ``[low, high]`` (``(low, high]`` with ``low_open``), as a float.

    Python/numpy numbers and one-element real tensors are numbers; a bool, a string or
    None is a ``TypeError`` naming ``name`` (``"0.5"`` is not silently converted).
    """
    is_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    if not is_tensor and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    below = number <= low if low_open else number < low
    if math.isnan(number) or below or number > high or (high == math.inf and math.isinf(number)):
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != math.inf else ')'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return number
