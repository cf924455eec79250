"""Backend selection and argument checks shared by every op of :mod:`fastmeta.ops`.

Every op takes ``backend="auto" | "extension" | "torch"``: ``"auto"`` runs the C++/CUDA
extension op (``torch.ops.fastmeta.<name>``) when it is built for the tensors' device and
the inputs are eligible (one device, contiguous, float16/bfloat16/float32/float64,
matching dtypes within each pair), else the plain-PyTorch twin; ``"extension"`` raises
``RuntimeError`` naming the op and the reason when the extension cannot run these inputs;
``"torch"`` always runs the twin.  This module imports nothing of fastmeta above
``fastmeta._extension`` (the bottom layer: ``python -c "import fastmeta.ops"`` imports no
engine, algorithm or API module).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "extension", "torch")


def extension_ops_available(device: torch.device | str = "cpu") -> bool:
    """True if ``torch.ops.fastmeta`` ops can run on ``device`` (builds on first call)."""
    try:
        from fastmeta import _extension  # imported lazily: building is the first call's business
    except ImportError:
        return False
    try:
        if not _extension.extension_available(torch.device(device)):
            return False
    except Exception:  # a broken build must never crash a caller
        return False
    try:
        torch.ops.fastmeta.dot  # noqa: B018  (registered by the built library?)
    except (AttributeError, RuntimeError):
        return False
    return True


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def as_list(name: str, tensors) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list/tuple of tensors, got a single Tensor")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
    return out


def check_pairs(name_a: str, a: Sequence[torch.Tensor], name_b: str, b: Sequence[torch.Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(
                f"{name_a}[{i}] and {name_b}[{i}] must have the same shape, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.device != y.device:
            raise ValueError(f"{name_a}[{i}] is on {x.device} but {name_b}[{i}] is on {y.device}")
        if not x.is_floating_point() or not y.is_floating_point():
            raise TypeError(f"{name_a}[{i}] and {name_b}[{i}] must be floating point, got {x.dtype} and {y.dtype}")


def optional_list(name: str, tensors, params: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """``None`` -> all None; else a list aligned with ``params`` whose entries may be None."""
    if tensors is None:
        return [None] * len(params)
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list/tuple of tensors (or None), got a single Tensor")
    out = list(tensors)
    if len(out) != len(params):
        raise ValueError(f"{name} must have the length of params ({len(params)}), got {len(out)}")
    for i, (t, p) in enumerate(zip(out, params)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor or None, got {type(t).__name__}")
        check_pairs("params", [p], name, [t])  # same shape, device, floating point
    return out


def finite(name: str, value) -> float:
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def ineligibility(lists: Sequence[Sequence[torch.Tensor]], same_dtype: bool = True) -> Optional[str]:
    """Why the extension cannot run these inputs (None if it can)."""
    first = [l for l in lists if len(l)]
    if not first:
        return None
    device = first[0][0].device
    for l in lists:
        for t in l:
            if t.device != device:
                return f"tensors on several devices ({device}, {t.device})"
            if t.dtype not in SUPPORTED_DTYPES:
                return f"unsupported dtype {t.dtype}"
            if not t.is_contiguous():
                return "a non-contiguous tensor"
    if same_dtype:
        for l in lists[1:]:
            for a, b in zip(lists[0], l):
                if a.dtype != b.dtype:
                    return f"mixed dtypes within a pair ({a.dtype}, {b.dtype})"
    return None


def device_of(lists: Sequence[Sequence[torch.Tensor]]) -> torch.device:
    for l in lists:
        if len(l):
            return l[0].device
    return torch.device("cpu")


def use_extension(backend: str, op: str, lists, same_dtype: bool = True) -> bool:
    """Whether ``op`` runs on the extension for ``lists`` (``backend="extension"``: raise naming why not)."""
    check_backend(backend)
    if backend == "torch":
        return False
    reason = ineligibility(lists, same_dtype)
    device = device_of(lists)
    if reason is None and not extension_ops_available(device):
        reason = f"the fastmeta extension is not available for device {device}"
    if reason is None:
        return True
    if backend == "extension":
        raise RuntimeError(f"fastmeta.ops.{op}(backend='extension') cannot run: {reason}")
    return False


def check_accumulate_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype (accumulation dtype) must be torch.float32 or torch.float64, got {dtype}")


def groups(keys: Sequence[tuple]) -> List[List[int]]:
    """Indices grouped by key, groups in order of first appearance (one op call each)."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return list(out.values())


def scatter(results: List[Optional[torch.Tensor]], indices: Sequence[int], values) -> None:
    for i, value in zip(indices, values):
        results[i] = value
