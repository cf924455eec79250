"""Integrations of :func:`fastmeta.meta_step` with other training frameworks.

* :mod:`fastmeta.integrations.hf`: ``MetaDistilTrainer``, a ``transformers.Trainer``
  subclass (imported lazily: ``transformers`` is only needed when you use it).
"""
from __future__ import annotations

__all__ = ["MetaDistilTrainer"]


def __getattr__(name: str):
    if name == "MetaDistilTrainer":
        from fastmeta.integrations.hf import MetaDistilTrainer

        return MetaDistilTrainer
    raise AttributeError(f"module 'fastmeta.integrations' has no attribute {name!r}")
