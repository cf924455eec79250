"""fastmeta: fast, exact meta-gradients for learning-to-teach knowledge distillation.

The public names below are loaded lazily so that ``import fastmeta`` stays cheap
(no transformers, no Triton, no C++ build until something needs them).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _mount_source_tree(subpackage: str, directory: str) -> None:
    """Make ``fastmeta.<subpackage>`` importable when running from a source checkout.

    In a wheel, ``kernels/`` is installed as ``fastmeta/kernels`` (a package-dir
    mapping in pyproject.toml).  In a checkout (``PYTHONPATH=.`` or
    ``python -m pytest`` from the repo root) it lives next to ``fastmeta/``; this
    registers it under the same name so both layouts import identically.
    """
    name = f"{__name__}.{subpackage}"
    here = Path(__file__).resolve().parent
    if name in sys.modules or (here / subpackage / "__init__.py").is_file():
        return
    source = here.parent / directory / "__init__.py"
    if not source.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        name, source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()[subpackage] = module


_mount_source_tree("kernels", "kernels")

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "backends": "fastmeta.backends",
    "kd_loss": "fastmeta.losses",
    "kd_teacher_cotangent": "fastmeta.losses",
    "kd_influence": "fastmeta.losses",
    "kd_teacher_cotangent_and_influence": "fastmeta.losses",
    "hvp": "fastmeta.hessian",
    "mixed_hvp": "fastmeta.hessian",
    "meta_grad": "fastmeta.engine",
    "influence": "fastmeta.engine",
    "meta_step": "fastmeta.step",
    "StepOutput": "fastmeta.step",
    "DynamicLossScale": "fastmeta.amp",
    "TrainConfig": "fastmeta.train",
    "TrainResult": "fastmeta.train",
    "MetaDistilTrainer": "fastmeta.integrations.hf",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastmeta' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
