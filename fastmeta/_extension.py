"""Just-in-time build of fastmeta's C++/CUDA extension (``csrc/``), with a fallback.

The extension registers its ops once with ``TORCH_LIBRARY(fastmeta, m)``; Python
calls them as ``torch.ops.fastmeta.<op>`` (see ``fastmeta.ops``).  It is compiled
on first use with :func:`torch.utils.cpp_extension.load` (ninja) and cached:

* ``csrc/*.cpp``: always (schemas, CPU kernels, Meta/fake kernels);
* ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``: only when CUDA is available.  The
  ``.cu`` files hold raw kernels and launchers and include no torch header; the
  torch-facing CUDA binding lives in ``csrc/cuda/*.cpp``.

If the build fails (no compiler, a broken toolchain, a CUDA/torch mismatch),
fastmeta warns once, naming the failure and the full log file, and every op
falls back to its plain-PyTorch twin.  Nothing crashes.  When a CUDA build
fails, a CPU-only build is tried before giving up.

Environment variables:

* ``FASTMETA_DISABLE_EXTENSION=1``: never build; always use the PyTorch twins.
* ``FASTMETA_EXTENSION_DIR``: the build cache (default
  ``$XDG_CACHE_HOME/fastmeta`` or ``~/.cache/fastmeta``).
* ``FASTMETA_CSRC_DIR``: the sources to build (default: the ``csrc`` shipped in
  the wheel as ``fastmeta/csrc``, else ``csrc/`` of a source checkout).
* ``FASTMETA_EXTENSION_VERBOSE=1``: show the compiler's output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import List, Optional

import torch

_LOCK = threading.Lock()


@dataclasses.dataclass
class ExtensionStatus:
    """What the last :func:`load_extension` call achieved."""

    attempted: bool = False
    built: bool = False
    cpu: bool = False
    cuda: bool = False
    disabled: bool = False
    error: Optional[str] = None
    log_file: Optional[str] = None
    build_directory: Optional[str] = None
    sources: List[str] = dataclasses.field(default_factory=list)


_STATUS = ExtensionStatus()


class ExtensionBuildWarning(RuntimeWarning):
    """Warned (once per process) when the C++/CUDA extension could not be built."""


def sources_directory() -> Optional[Path]:
    """The ``csrc`` directory to build: env override, installed wheel, or source checkout."""
    override = os.environ.get("FASTMETA_CSRC_DIR")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir() and any(candidate.glob("*.cpp")):
            return candidate
    return None


def cache_directory() -> Path:
    override = os.environ.get("FASTMETA_EXTENSION_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmeta"


def _cuda_build_possible() -> bool:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _build(root: Path, with_cuda: bool, verbose: bool) -> Path:
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in root.glob("*.cpp"))
    if with_cuda:
        cuda_dir = root / "cuda"
        sources += sorted(str(p) for p in cuda_dir.glob("*.cu"))
        sources += sorted(str(p) for p in cuda_dir.glob("*.cpp"))
    flavour = "cuda" if with_cuda else "cpu"
    # One build directory per (sources location, torch, python, flavour): torch's
    # loader itself rebuilds when a source file changes.
    key = hashlib.sha1(
        f"{root.resolve()}|{torch.__version__}|{sys.version_info[:2]}|{flavour}".encode()
    ).hexdigest()[:12]
    build_dir = cache_directory() / f"fastmeta_C_{flavour}_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _STATUS.build_directory = str(build_dir)
    _STATUS.sources = sources
    cflags = ["-O3", "-std=c++17", "-fopenmp"]
    load(
        name=f"fastmeta_C_{flavour}",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(root), str(root / "cuda")],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    return build_dir


def _record_failure(exc: BaseException, flavour: str) -> str:
    """Write the whole failure (compiler output included) to a log; return its path."""
    directory = Path(_STATUS.build_directory or cache_directory())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        log = directory / f"build_failure_{flavour}.log"
        log.write_text(
            f"fastmeta extension build ({flavour}) failed\n"
            f"sources: {_STATUS.sources}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )
        return str(log)
    except OSError:
        return "<no log: the cache directory is not writable>"


def _summary(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    first = (errors or lines or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def load_extension(*, verbose: Optional[bool] = None) -> bool:
    """Build (first call) or load (cached) the extension; True when its ops are registered.

    Never raises: a failed build warns once (:class:`ExtensionBuildWarning`) and
    returns False, and callers use the plain-PyTorch twins.
    """
    if _STATUS.attempted:
        return _STATUS.built
    with _LOCK:
        if _STATUS.attempted:
            return _STATUS.built
        _STATUS.attempted = True
        if os.environ.get("FASTMETA_DISABLE_EXTENSION", "0") not in ("", "0"):
            _STATUS.disabled = True
            _STATUS.error = "disabled by FASTMETA_DISABLE_EXTENSION"
            return False
        if verbose is None:
            verbose = os.environ.get("FASTMETA_EXTENSION_VERBOSE", "0") not in ("", "0")
        root = sources_directory()
        if root is None:
            _STATUS.error = "no csrc/ sources found"
            warnings.warn(
                "fastmeta: the C++/CUDA extension's sources (csrc/) were not found; "
                "using the plain-PyTorch implementations.",
                ExtensionBuildWarning,
                stacklevel=2,
            )
            return False
        attempts = [True, False] if _cuda_build_possible() else [False]
        failures = []
        for with_cuda in attempts:
            flavour = "cuda" if with_cuda else "cpu"
            try:
                _build(root, with_cuda, verbose)
            except Exception as exc:  # noqa: BLE001 - any build failure means fallback
                failures.append(f"{flavour} build: {_summary(exc)} (log: {_record_failure(exc, flavour)})")
                _STATUS.log_file = failures[-1].rsplit("(log: ", 1)[-1].rstrip(")")
                continue
            _STATUS.built = True
            _STATUS.cpu = True
            _STATUS.cuda = with_cuda
            break
        if failures:
            _STATUS.error = "; ".join(failures)
            fallback = (
                "the CUDA ops use the plain-PyTorch implementations"
                if _STATUS.built
                else "using the plain-PyTorch implementations instead"
            )
            warnings.warn(
                f"fastmeta: building the C++/CUDA extension failed ({_STATUS.error}); {fallback}.",
                ExtensionBuildWarning,
                stacklevel=2,
            )
        return _STATUS.built


def extension_available(device) -> bool:
    """True when ``torch.ops.fastmeta`` has kernels for ``device`` (a device, str or tensor).

    Builds the extension on first call.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        return False
    if not load_extension():
        return False
    return _STATUS.cpu if device_type == "cpu" else _STATUS.cuda


def status() -> ExtensionStatus:
    """A copy of the extension's build status (does not trigger a build)."""
    return dataclasses.replace(_STATUS, sources=list(_STATUS.sources))
