"""Walks over a module's parameters, buffers and submodules: each done once per call of a public entry point.

A ``meta_step`` reads the models' parameters in a dozen places (device check, the
engine's parameter dicts, the pilot, both updates, the buffers it preserves...).
Each ``named_parameters()`` walks every submodule: 0.35-0.7 ms for a BERT-base-shaped
model on the CPUs we measure on, about 24 walks per MetaDistil step (counted with
``bench.profile_step``'s models, 2026-11-28), paid on the host while a GPU at small
batch waits.  Inside :func:`walked_once`, the first walk of a module is kept and every
later one reads it back; outside, each call walks as before.

What is kept is the structure (which parameter and buffer objects a module has, under
which names); values, ``.grad`` and ``requires_grad`` are read afresh at each use
(:func:`named_parameters` callers filter ``requires_grad`` themselves).  A public entry
point does not add or remove parameters, buffers or submodules while it runs, so
within one call the kept walk is what a new walk would return.  Bottom layer: torch only.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import torch

_KEPT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastmeta_walks", default=None)


@contextlib.contextmanager
def walked_once() -> Iterator[None]:
    """Inside this block each module is walked at most once per kind (nested blocks share the outer one)."""
    if _KEPT.get() is not None:
        yield
        return
    token = _KEPT.set({})
    try:
        yield
    finally:
        _KEPT.reset(token)


def _walk(module: torch.nn.Module, kind: str, walk=None) -> list:
    """``walk(module)`` (default: ``list(module.<kind>())``), kept per module and kind inside :func:`walked_once`."""
    walk = walk or (lambda m: list(getattr(m, kind)()))
    kept = _KEPT.get()
    if kept is None:
        return walk(module)
    key = (id(module), kind)
    entry = kept.get(key)
    if entry is None:  # the entry keeps the module alive, so its id is not reused while the block lasts
        entry = kept[key] = (module, walk(module))
    return entry[1]


def named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``list(module.named_parameters())`` (tied weights once), walked once inside :func:`walked_once`."""
    return _walk(module, "named_parameters")


def named_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``list(module.named_buffers())``, walked once inside :func:`walked_once`."""
    return _walk(module, "named_buffers")


def submodules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``list(module.modules())`` (the module first), walked once inside :func:`walked_once`."""
    return _walk(module, "modules")


def tied_names(module: torch.nn.Module) -> list[tuple[str, ...]]:
    """The names of each tensor that ``module`` registers under more than one name, one tuple per tensor
    (``named_parameters()`` / ``named_buffers()`` order, parameters first): a language model's output
    projection tied to its input embedding, a parameter also registered as a buffer; empty when nothing
    is tied.  Kept inside :func:`walked_once` like the walks (it is one: ``remove_duplicate=False``)."""
    return _walk(module, "tied_names", _tied_names)


def _tied_names(module: torch.nn.Module) -> list[tuple[str, ...]]:
    names: dict[int, list[str]] = {}
    for walk in (module.named_parameters, module.named_buffers):
        for name, tensor in walk(remove_duplicate=False):
            if tensor is not None:
                names.setdefault(id(tensor), []).append(name)
    return [tuple(group) for group in names.values() if len(group) > 1]


def walking_once(fn):
    """Decorator: ``fn`` runs inside :func:`walked_once` (the public entry points)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with walked_once():
            return fn(*args, **kwargs)

    return wrapper
