"""What fastmeta runs on: versions, device, extension build, Triton mode, dispatch."""
from __future__ import annotations

import importlib
import os
import platform
from typing import Any, Dict, Optional

import torch

from . import __version__, _extension


def _version(module: str) -> Optional[str]:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken optional package is reported as None
        return None


def triton_mode() -> str:
    """How the Triton kernels run here.

    ``"native"``: compiled for the GPU; ``"interpreter"``: ``TRITON_INTERPRET=1``
    (kernels run on CPU tensors, for tests); ``"unavailable"``: triton missing or
    no GPU, so the plain-PyTorch references are used.
    """
    if _version("triton") is None:
        return "unavailable"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "interpreter"
    return "native" if torch.cuda.is_available() else "unavailable"


def cuda_toolkit_report(ext: Optional[_extension.ExtensionStatus] = None) -> str:
    """The CUDA toolkit the extension's CUDA build uses (root and how it was found), or
    exactly why there is none: which candidates were tried and what each lacked."""
    ext = ext if ext is not None else _extension.status()
    if torch.version.cuda is None:
        return f"not needed (torch {torch.__version__} is CPU-only)"
    if ext.cuda and ext.cuda_toolkit:
        return f"{ext.cuda_toolkit} (used by the CUDA build)"
    toolkit = _extension.cuda_toolkit()
    if not toolkit.found:
        return toolkit.describe()
    if not torch.cuda.is_available():
        return f"{toolkit.describe()}; no CUDA build here (no GPU visible)"
    return toolkit.describe()


def backends(build_extension: bool = True) -> Dict[str, Any]:
    """Report what is active.

    With ``build_extension=True`` (default) the C++/CUDA extension is built or
    loaded first, so the report says whether it built.
    """
    if build_extension:
        _extension.load_extension()
    ext = _extension.status()
    toolkit = cuda_toolkit_report(ext)
    cuda = torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})" if cuda else "cpu"
    mode = triton_mode()
    return {
        "fastmeta": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "datasets": _version("datasets"),
        "device": device,
        "cuda_available": cuda,
        "extension": {
            "built": ext.built,
            "cpu": ext.cpu,
            "cuda": ext.cuda,
            "disabled": ext.disabled,
            "error": ext.error,
            "build_directory": ext.build_directory,
            "cuda_toolkit": toolkit,
        },
        "triton_mode": mode,
        "dispatch": {
            "kd_losses_on_cuda": "triton" if mode == "native" else "torch",
            "kd_losses_on_cpu": "torch",
            "multi_tensor_ops_on_cpu": "extension" if ext.cpu else "torch",
            "multi_tensor_ops_on_cuda": "extension" if ext.cuda else "torch",
        },
    }


def format_backends(report: Dict[str, Any]) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
