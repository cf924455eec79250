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
* ``FASTMETA_REQUIRE_CUDA_EXTENSION=1``: where torch has CUDA and a GPU is
  visible, a CUDA build that fails or is impossible (no toolkit) raises
  ``RuntimeError`` instead of falling back (``make gpu-check`` sets it).

CUDA toolkit: :func:`cuda_toolkit` picks the first of ``$CUDA_HOME``,
``$CUDA_PATH``, the real ``nvcc`` behind the one on ``PATH`` (wrapper scripts
such as ``/usr/local/bin/nvcc`` that ``exec`` the real one are followed) and
``/usr/local/cuda`` whose ``include/`` holds ``cuda_runtime_api.h`` and whose
``bin/`` holds ``nvcc``, and hands it to torch's builder (torch's own guess
from a wrapper script is ``/usr/local``, which has no CUDA headers).
:func:`build_extension` is the explicit, raising build the
``make check-cuda-build`` check uses (no GPU needed with
``TORCH_CUDA_ARCH_LIST`` set).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

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
    # the CUDA toolkit the CUDA build used, or why none qualified / why no CUDA build
    cuda_toolkit: Optional[str] = None
    cuda_note: Optional[str] = None


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


# ----------------------------------------------------------------------------- CUDA toolkit
_CUDA_HEADER = "cuda_runtime_api.h"
_TARGET_INCLUDE = os.path.join("targets", "x86_64-linux", "include")
_DEFAULT_ROOTS = ("/usr/local/cuda",)
_ELF_MAGIC = b"\x7fELF"


@dataclasses.dataclass(frozen=True)
class CudaToolkit:
    """The CUDA toolkit a CUDA build uses (``root``), or why none qualified (``tried``).

    A root qualifies when ``include/cuda_runtime_api.h`` (or
    ``targets/x86_64-linux/include/cuda_runtime_api.h``) and ``bin/nvcc`` exist.
    """

    root: Optional[str] = None
    include_dir: Optional[str] = None
    nvcc: Optional[str] = None
    source: Optional[str] = None
    tried: Tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return self.root is not None

    def describe(self) -> str:
        if self.root is not None:
            return f"{self.root} (from {self.source})"
        tried = "; ".join(self.tried) if self.tried else "no candidate"
        return f"no CUDA toolkit with include/{_CUDA_HEADER} and bin/nvcc found (tried: {tried})"


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == _ELF_MAGIC
    except OSError:
        return False


def _nvcc_from_script(script: str) -> List[str]:
    """Absolute paths of an ``nvcc`` that a wrapper script names (``exec /x/bin/nvcc "$@"``)."""
    try:
        with open(script, "r", errors="replace") as handle:
            text = handle.read(1 << 16)
    except OSError:
        return []
    found = []
    for match in re.finditer(r"(/[^\s'\"`;|&<>()$]*/nvcc)(?![\w.+-])", text):
        candidate = match.group(1)
        if candidate not in found:
            found.append(candidate)
    return found


def _nvcc_from_dryrun(nvcc: str) -> Optional[str]:
    """Ask a wrapper where the real compiler lives: ``nvcc -dryrun`` prints ``#$ _HERE_=<bin dir>``."""
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + "\n" + out.stderr, re.MULTILINE)
    if not match:
        return None
    candidate = os.path.join(match.group(1).strip(), "nvcc")
    return candidate if os.path.isfile(candidate) else None


def real_nvcc(nvcc: str, _depth: int = 0) -> Optional[str]:
    """The real ``nvcc`` binary behind ``nvcc`` (symlinks and wrapper scripts followed), or None."""
    real = os.path.realpath(nvcc)
    if not os.path.isfile(real):
        return None
    if _is_elf(real):
        return real
    if _depth < 4:
        for candidate in _nvcc_from_script(real):
            if os.path.realpath(candidate) == real or not os.path.isfile(candidate):
                continue
            resolved = real_nvcc(candidate, _depth + 1)
            if resolved is not None:
                return resolved
    if _depth == 0:
        candidate = _nvcc_from_dryrun(nvcc)
        if candidate is not None and os.path.realpath(candidate) != real:
            return real_nvcc(candidate, _depth + 1)
    return None


def _inspect_root(root: str) -> Tuple[Optional[str], Optional[str], str]:
    """``(include_dir, nvcc, "")`` when ``root`` is a usable toolkit, else ``(None, None, what is missing)``."""
    if not os.path.isdir(root):
        return None, None, "no such directory"
    include_dir = None
    for sub in ("include", _TARGET_INCLUDE):
        if os.path.isfile(os.path.join(root, sub, _CUDA_HEADER)):
            include_dir = os.path.join(root, sub)
            break
    nvcc = os.path.join(root, "bin", "nvcc")
    missing = []
    if include_dir is None:
        missing.append(f"no include/{_CUDA_HEADER}")
    if not os.path.isfile(nvcc):
        missing.append("no bin/nvcc")
    if missing:
        return None, None, " and ".join(missing)
    return include_dir, nvcc, ""


def _toolkit_candidates() -> List[Tuple[str, Optional[str], str]]:
    """``(source, root or None, note)`` in order of precedence."""
    candidates: List[Tuple[str, Optional[str], str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            candidates.append((f"${var}", value, ""))
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        real = real_nvcc(nvcc)
        if real is None:
            candidates.append((f"nvcc on PATH ({nvcc})", None, "could not find the real nvcc behind it"))
        else:
            via = nvcc if os.path.realpath(nvcc) == real else f"{nvcc} -> {real}"
            candidates.append((f"nvcc on PATH ({via})", os.path.dirname(os.path.dirname(real)), ""))
    for root in _DEFAULT_ROOTS:
        candidates.append((root, root, ""))
    return candidates


def cuda_toolkit() -> CudaToolkit:
    """The CUDA toolkit to build with: the first candidate whose ``include/`` holds
    ``cuda_runtime_api.h`` (and ``bin/`` holds ``nvcc``), in the order ``$CUDA_HOME``,
    ``$CUDA_PATH``, the real nvcc behind ``nvcc`` on PATH, ``/usr/local/cuda``.

    Returns a :class:`CudaToolkit` whose ``root`` is None when none qualified;
    ``tried`` then says, for each candidate, what was missing.
    """
    tried: List[str] = []
    seen = set()
    for source, root, note in _toolkit_candidates():
        if root is None:
            tried.append(f"{source}: {note}")
            continue
        key = os.path.realpath(root)
        if key in seen:
            continue
        seen.add(key)
        include_dir, nvcc, missing = _inspect_root(root)
        if include_dir is not None:
            return CudaToolkit(root=root, include_dir=include_dir, nvcc=nvcc, source=source, tried=tuple(tried))
        tried.append(f"{root} ({source}): {missing}")
    return CudaToolkit(tried=tuple(tried))


def _use_toolkit(toolkit: CudaToolkit) -> None:
    """Point torch's builder at ``toolkit``: ``torch.utils.cpp_extension`` reads CUDA_HOME
    once, at import, into a module constant (its guess from a wrapper script is wrong)."""
    os.environ["CUDA_HOME"] = toolkit.root  # before a first import of cpp_extension: no guess, no warning
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = toolkit.root


def _require_cuda_extension() -> bool:
    return os.environ.get("FASTMETA_REQUIRE_CUDA_EXTENSION", "0") not in ("", "0")


def _cuda_plan() -> Tuple[bool, Optional[CudaToolkit], str]:
    """``(attempt a CUDA build?, toolkit, note)`` for :func:`load_extension`."""
    if torch.version.cuda is None:
        return False, None, f"not attempted: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, None, "not attempted: torch.cuda.is_available() is False (no GPU visible)"
    toolkit = cuda_toolkit()
    if not toolkit.found:
        return False, toolkit, toolkit.describe()
    return True, toolkit, f"toolkit {toolkit.describe()}"


def clear_stale_build_lock(build_dir: Path, max_age_s: Optional[float] = None) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age_s`` (``FASTMETA_BUILD_LOCK_TIMEOUT_S``,
    default 900 s); True if removed.

    torch's loader takes that lock file for the build and waits, forever, while it exists: a build
    that was killed (Ctrl-C, a stopped job) leaves it behind and every later ``import fastmeta``
    hangs silently.  A build takes seconds to a few minutes (CUDA included), so a lock this old has
    no live owner; it is removed with a warning that says so."""
    lock = Path(build_dir) / "lock"
    if max_age_s is None:
        max_age_s = float(os.environ.get("FASTMETA_BUILD_LOCK_TIMEOUT_S", "900"))
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    warnings.warn(
        f"fastmeta: removing a stale extension build lock {lock} ({age:.0f} s old, limit {max_age_s:.0f} s: "
        "FASTMETA_BUILD_LOCK_TIMEOUT_S); an earlier build was interrupted",
        RuntimeWarning,
        stacklevel=2,
    )
    try:
        lock.unlink()
    except FileNotFoundError:
        pass
    return True


def _build(root: Path, with_cuda: bool, verbose: bool, toolkit: Optional[CudaToolkit] = None) -> Path:
    sources = sorted(str(p) for p in root.glob("*.cpp"))
    include_paths = [str(root), str(root / "cuda")]
    if with_cuda:
        toolkit = toolkit or cuda_toolkit()
        if not toolkit.found:
            raise RuntimeError(toolkit.describe())
        _use_toolkit(toolkit)
        if os.path.realpath(toolkit.include_dir) != os.path.realpath(os.path.join(toolkit.root, "include")):
            include_paths.append(toolkit.include_dir)
        cuda_dir = root / "cuda"
        sources += sorted(str(p) for p in cuda_dir.glob("*.cu"))
        sources += sorted(str(p) for p in cuda_dir.glob("*.cpp"))
    flavour = "cuda" if with_cuda else "cpu"
    # One build directory per (sources location, torch, python, flavour, toolkit, archs):
    # torch's loader itself rebuilds when a source file changes.
    extra = f"|{toolkit.root}|{os.environ.get('TORCH_CUDA_ARCH_LIST', '')}" if with_cuda else ""
    key = hashlib.sha1(
        f"{root.resolve()}|{torch.__version__}|{sys.version_info[:2]}|{flavour}{extra}".encode()
    ).hexdigest()[:12]
    build_dir = cache_directory() / f"fastmeta_C_{flavour}_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_build_lock(build_dir)
    _STATUS.build_directory = str(build_dir)
    _STATUS.sources = sources
    # -fno-math-errno/-fno-trapping-math: sqrt without its errno branch and selects of FP values
    # (no FP traps are enabled anyway), so that elementwise loops such as the pilot ops' vectorise.
    # No contraction of a*b+c into one FMA (-ffp-contract=off, nvcc -fmad=false): csrc/pilot_math.h
    # promises the twins' expressions in their order, each rounded; an FMA rounds once, and where
    # a sum cancels (the L2 gradient g = grad + wd*theta) the two differ by many ulps after the
    # D = .../denom^2 of Adam's Jacobian (first seen on an H200: bf16 adam_l2, 2-4 elements > 1 ulp).
    cflags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    from torch.utils.cpp_extension import load  # after _use_toolkit: it reads CUDA_HOME on import

    load(
        name=f"fastmeta_C_{flavour}",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-std=c++17", "-fmad=false"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=include_paths,
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


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _raise_required_failure() -> None:
    if _REQUIRED_FAILURE is not None:
        raise RuntimeError(_REQUIRED_FAILURE)


_REQUIRED_FAILURE: Optional[str] = None


def load_extension(*, verbose: Optional[bool] = None) -> bool:
    """Build (first call) or load (cached) the extension; True when its ops are registered.

    Does not raise: a failed build warns once (:class:`ExtensionBuildWarning`) and
    returns False (or builds CPU-only), and callers use the plain-PyTorch twins.
    Exception: with ``FASTMETA_REQUIRE_CUDA_EXTENSION=1``, where torch has CUDA and a
    GPU is visible, a CUDA build that fails or is impossible raises ``RuntimeError``
    (on this and every later call).
    """
    global _REQUIRED_FAILURE
    if _STATUS.attempted:
        _raise_required_failure()
        return _STATUS.built
    with _LOCK:
        if _STATUS.attempted:
            _raise_required_failure()
            return _STATUS.built
        _STATUS.attempted = True
        required = _require_cuda_extension() and torch.version.cuda is not None and torch.cuda.is_available()
        if _env_flag("FASTMETA_DISABLE_EXTENSION"):
            _STATUS.disabled = True
            _STATUS.error = "disabled by FASTMETA_DISABLE_EXTENSION"
            if required:
                _REQUIRED_FAILURE = (
                    "fastmeta: FASTMETA_REQUIRE_CUDA_EXTENSION=1 but FASTMETA_DISABLE_EXTENSION is set"
                )
                raise RuntimeError(_REQUIRED_FAILURE)
            return False
        if verbose is None:
            verbose = _env_flag("FASTMETA_EXTENSION_VERBOSE")
        root = sources_directory()
        if root is None:
            _STATUS.error = "no csrc/ sources found"
            if required:
                _REQUIRED_FAILURE = "fastmeta: FASTMETA_REQUIRE_CUDA_EXTENSION=1 but no csrc/ sources were found"
                raise RuntimeError(_REQUIRED_FAILURE)
            warnings.warn(
                "fastmeta: the C++/CUDA extension's sources (csrc/) were not found; "
                "using the plain-PyTorch implementations.",
                ExtensionBuildWarning,
                stacklevel=2,
            )
            return False
        want_cuda, toolkit, note = _cuda_plan()
        _STATUS.cuda_toolkit = toolkit.root if toolkit is not None else None
        _STATUS.cuda_note = note
        failures = []
        if toolkit is not None and not toolkit.found:
            # torch has CUDA and a GPU is visible, but no toolkit to compile with
            failures.append(f"cuda build impossible: {note}")
        attempts = [True, False] if want_cuda else [False]
        for with_cuda in attempts:
            if required and failures:
                break  # no CPU-only fallback
            flavour = "cuda" if with_cuda else "cpu"
            try:
                _build(root, with_cuda, verbose, toolkit if with_cuda else None)
            except Exception as exc:  # noqa: BLE001 - any build failure means fallback
                _STATUS.log_file = _record_failure(exc, flavour)
                failures.append(f"{flavour} build: {_summary(exc)} (log: {_STATUS.log_file})")
                continue
            _STATUS.built = True
            _STATUS.cpu = True
            _STATUS.cuda = with_cuda
            break
        if failures:
            _STATUS.error = "; ".join(failures)
            if required and not _STATUS.cuda:
                _REQUIRED_FAILURE = (
                    "fastmeta: FASTMETA_REQUIRE_CUDA_EXTENSION=1 and the CUDA extension was not built "
                    f"({_STATUS.error})"
                )
                raise RuntimeError(_REQUIRED_FAILURE)
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


def build_extension(*, with_cuda: bool, verbose: Optional[bool] = None) -> ExtensionStatus:
    """Build and load the extension now, raising ``RuntimeError`` on any failure (no fallback).

    The same toolkit detection (:func:`cuda_toolkit`) and build (``_build``) as
    :func:`load_extension`; ``make check-cuda-build`` calls it with
    ``with_cuda=True`` on a machine without a GPU (then ``TORCH_CUDA_ARCH_LIST``
    must name the architectures, e.g. ``9.0``).  Later :func:`load_extension`
    calls in this process return its result.
    """
    with _LOCK:
        flavour = "cuda" if with_cuda else "cpu"
        if _STATUS.built and (_STATUS.cuda or not with_cuda):
            return status()
        if _STATUS.built:
            raise RuntimeError(
                "fastmeta: a CPU-only build of the extension is already loaded in this process; "
                "build the CUDA flavour in a fresh process"
            )
        if verbose is None:
            verbose = _env_flag("FASTMETA_EXTENSION_VERBOSE")
        root = sources_directory()
        if root is None:
            raise RuntimeError("fastmeta: the C++/CUDA extension's sources (csrc/) were not found")
        toolkit = None
        if with_cuda:
            if torch.version.cuda is None:
                raise RuntimeError(f"fastmeta: torch {torch.__version__} is a CPU-only build; no CUDA build possible")
            toolkit = cuda_toolkit()
            _STATUS.cuda_toolkit = toolkit.root
            _STATUS.cuda_note = toolkit.describe()
            if not toolkit.found:
                raise RuntimeError(f"fastmeta: CUDA build impossible: {toolkit.describe()}")
            if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                raise RuntimeError(
                    "fastmeta: no GPU is visible; set TORCH_CUDA_ARCH_LIST (e.g. 9.0 for H100/H200) "
                    "to build the CUDA extension for it"
                )
        _STATUS.attempted = True
        try:
            _build(root, with_cuda, bool(verbose), toolkit)
        except Exception as exc:
            _STATUS.log_file = _record_failure(exc, flavour)
            _STATUS.error = f"{flavour} build: {_summary(exc)} (log: {_STATUS.log_file})"
            raise RuntimeError(f"fastmeta: {_STATUS.error}") from exc
        _STATUS.built = True
        _STATUS.cpu = True
        _STATUS.cuda = with_cuda
        _STATUS.error = None
        return status()


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
