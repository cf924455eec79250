"""``make gpu-check`` (``python3 -m bench.gpu_check``): all a short GPU loan should measure, in one command.

Meant for a machine lent for a few minutes, from a fresh checkout, with that machine's own
``python3`` (torch with CUDA, triton, transformers, pytest; no venv, no network, no
``../shared`` beside the checkout, no MiniLM wheel).  fastmeta need not be installed: every
step runs with the checkout first on ``PYTHONPATH`` (``fastmeta/__init__.py`` mounts
``kernels/`` as ``fastmeta.kernels`` in a checkout).  Steps, in order of value:

1. ``info``       versions, GPU, driver, nvcc/ninja, how fastmeta imports (always runs);
2. ``extension``  build the C++/CUDA extension with CUDA required
                  (``FASTMETA_REQUIRE_CUDA_EXTENSION=1``) and check one op against its twin;
                  if it fails, later steps run with ``FASTMETA_DISABLE_EXTENSION=1`` (no
                  process rebuilds it again);
3. ``tests``      the CUDA cases of the device-parametrized test files (``pytest -k cuda``,
                  which also selects ``@pytest.mark.cuda`` tests) under a time cap;
4. ``meta_step``  ``bench.meta_step --device cuda``: BERT-base shape (random init) -> 6 layers,
                  seq 128, batch 4 and 32, fp32 and bf16, every algorithm x hypergradient, the floor
                  (necessary passes + necessary optimizer updates) and the peers' MetaDistil steps
                  (higher, TorchOpt: ``bench/peers.py``); kd, metadistil/exact, metadistil/autograd
                  and the peers of every setting first;
5. ``profile``    ``bench.profile_step --device cuda --profile --memory --sync-ab``: MetaDistil exact steps at
                  batch 4 (BERT-base -> 6 layers, fp32, the setting furthest from its floor; 2 warm-up
                  + 5 timed steps, 5 more for the per-phase peaks, 5 under torch.profiler): every
                  phase against its floor pass timed alone, the peak inside every phase, and the ops
                  by CPU and by GPU self time, and the two update phases taken apart
                  (``bench.updates``: optimizer steps, pilot op vs its twin, undo snapshot,
                  ``Transaction.apply``, each alone with its bandwidth), whole steps with and without
                  meta_step's CUDA syncs around each phase (5 + 5, alternating) (``profile_step_cuda.json``);
6. ``kernels``    ``bench.kernels`` with short timing (torch.compile cases last);
7. ``hvp``        ``bench.hvp --device cuda`` (BERT-base -> 6 layers, batch 32);
8. ``growth``     ``bench.growth --device cuda`` (low priority: last): step time and step memory of
                  kd, metadistil exact/autograd/finite_diff and the peers over batch 4/16/32 x seq
                  128/256 (BERT-base shape -> 6 layers, fp32), small cells first.

The peers are optional: the GPU machine's own ``python3`` may lack them (their rows then say
``skipped (not installed ...)``).  ``GPU_CHECK_PEERS_PATH`` (default ``build/gpu_check_peers`` when that
folder exists) is put on every step's ``PYTHONPATH``; ``python3 -m bench.gpu_check --vendor-peers``
fills that folder here with the installed ``higher``, ``torchopt`` (its compiled ``_C`` left out:
TorchOpt falls back to its Python ops), ``optree`` and ``graphviz`` (TorchOpt imports both; ``optree`` is compiled: it imports
only under the same Python minor version), to carry to the GPU machine with the checkout.

It watches its own clock: ``GPU_CHECK_BUDGET_S`` (default 540) is the whole run; a step
that cannot start with its minimum time left is reported ``skipped (time)``; each step has a
cap, and the benchmarks and pytest get an internal deadline inside it so that they stop
starting new work, write what they measured and exit (``partial``) instead of being killed.

Results: ``bench/results/{meta_step,profile_step,kernels,hvp,growth}_cuda.*`` (each benchmark's own files) and
``bench/results/gpu_check_cuda.{json,md}`` (versions, GPU, every step's status and time, key
figures).  With ``GPU_CHECK_OUT=<dir>``: ``gpu_check_results.tar.gz`` there (every result,
log, junit XML and build log of the run) plus at most ``GPU_CHECK_OUT_MAX_FILES`` (8) files
copied loose: the summary JSON/markdown, the full log and the main result files.  stdout ends
with a compact summary (step table, key figures, tails of failed steps' logs).

``GPU_CHECK_DRY_RUN=1``: the same steps on CPU at tiny sizes (tiny BERT, 1 repeat, a handful
of tests, the extension build skipped unless ``GPU_CHECK_DRY_RUN_EXTENSION=1``), results in a
temporary folder (or ``GPU_CHECK_OUT``), never in ``bench/results``.  CI runs it
(tests/test_gpu_check.py).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
SCHEMA_VERSION = 1
STEP_NAMES = ("info", "extension", "tests", "meta_step", "profile", "kernels", "hvp", "growth")

# The test files whose CUDA cases run here: parametrized over conftest.DEVICES, or with CUDA
# cases of their own.  Files holding @pytest.mark.cuda tests are added when found.
TEST_FILES = (
    "tests/test_engine.py",
    "tests/test_meta_step.py",
    "tests/test_algorithms.py",
    "tests/test_functional.py",
    "tests/test_mixed_precision.py",
    "tests/test_hessian.py",
    "tests/test_ops.py",
    "tests/test_ops_pilot.py",
    "tests/test_kd_loss.py",
    "tests/test_kd_second_order.py",
    "tests/test_bench_smoke.py",  # the benchmarks' CUDA plumbing (per-phase peaks)
    "tests/test_bench_profile_step.py",  # profile_step --device cuda (the profile step's tool)
    "tests/test_bench_updates.py",  # bench.updates on CUDA: fused op = twin, rows on copies
)
# Relative running times of the CUDA cases (the CPU runs' seconds on an idle machine; the Triton
# files weighted up for kernel compilation on first use), to balance the shards.
TEST_WEIGHTS = {
    "tests/test_meta_step.py": 6.0, "tests/test_algorithms.py": 11.0, "tests/test_engine.py": 8.0,
    "tests/test_mixed_precision.py": 6.0, "tests/test_functional.py": 3.0, "tests/test_hessian.py": 10.0,
    "tests/test_ops.py": 5.0, "tests/test_ops_pilot.py": 2.0, "tests/test_kd_loss.py": 20.0,
    "tests/test_kd_second_order.py": 15.0, "tests/test_bench_smoke.py": 1.0,
    "tests/test_bench_profile_step.py": 1.0, "tests/test_bench_updates.py": 0.5,
}
META_STEP_PRIORITY = ("kd", "metadistil/exact", "metadistil/autograd", "peer/higher", "peer/torchopt")
LOOSE_FILES = ("gpu_check_results.tar.gz", "gpu_check_{s}.json", "gpu_check.log", "gpu_check_{s}.md",
               "meta_step_{s}.json", "meta_step_{s}.png", "kernels_{s}.json", "hvp_{s}.json",
               "meta_step_{s}.md", "kernels_{s}.md", "hvp_{s}.md", "growth_{s}.json", "growth_{s}.png")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "no")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# =========================================================================== steps
@dataclasses.dataclass
class Step:
    name: str
    cap_s: float           # at most this long (the subprocess is killed at cap + grace)
    min_s: float           # not started with less than this left in the budget
    estimate_s: float      # expected seconds on the H200 lent so far (documentation; printed in the summary)
    command: Callable[["Context", float], list]  # (ctx, internal deadline) -> argv, or argvs run side by side
    env: Callable[["Context"], dict[str, str]] = lambda ctx: {}
    internal_deadline: bool = True  # the command stops starting new work at the deadline itself
    margin_s: float = 15.0  # internal deadline = start + cap - margin (time to finish one item)


@dataclasses.dataclass
class Context:
    dry_run: bool
    device: str
    suffix: str
    results_dir: Path
    work: Path
    out: Path | None
    python: str
    budget_s: float
    t0: float
    deadline: float
    disable_extension: bool = False
    log_lines: list[str] = dataclasses.field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        line = f"[gpu-check {time.time() - self.t0:6.1f} s] {msg}"
        self.log_lines.append(line)
        print(line, flush=True)


def _info_cmd(ctx: Context, deadline: float) -> list[str]:
    return [ctx.python, "-m", "bench.gpu_check", "--info", str(ctx.work / "info.json")]


def _extension_cmd(ctx: Context, deadline: float) -> list[str]:
    return [ctx.python, "-m", "bench.gpu_check", "--extension", str(ctx.work / "extension.json"),
            "--device", ctx.device]


def _extension_env(ctx: Context) -> dict[str, str]:
    env = {"FASTMETA_EXTENSION_VERBOSE": "1"}
    if ctx.device == "cuda":
        env["FASTMETA_REQUIRE_CUDA_EXTENSION"] = "1"
    return env


def test_files() -> list[str]:
    files = [f for f in TEST_FILES if (REPO / f).is_file()]
    for path in sorted((REPO / "tests").glob("test_*.py")):
        rel = f"tests/{path.name}"
        if rel not in files and re.search(r"mark\.cuda\b", path.read_text(errors="replace")):
            files.append(rel)
    return files


def test_shards(files: list[str], count: int) -> list[list[str]]:
    """``files`` in ``count`` groups of similar running time (most of these tests are bound by Python
    overhead, not by the GPU: a few pytest processes side by side finish in a fraction of the time)."""
    if count <= 1:
        return [list(files)]
    shards: list[list[str]] = [[] for _ in range(count)]
    load = [0.0] * count
    for f in sorted(files, key=lambda f: -TEST_WEIGHTS.get(f, 10.0)):
        k = load.index(min(load))
        shards[k].append(f)
        load[k] += TEST_WEIGHTS.get(f, 10.0)
    for shard in shards:  # within a shard, the order of TEST_FILES (kernels and the engine first)
        shard.sort(key=lambda f: files.index(f))
    return [s for s in shards if s]


def _tests_cmd(ctx: Context, deadline: float) -> list[list[str]]:
    if ctx.dry_run:  # the plumbing only: a few quick CPU cases, in two pytest processes as on the GPU
        files = ["tests/test_meta_step.py", "tests/test_functional.py"]
        keyword = "cpu and (test_step_output_and_updates or test_forward_jvp_matches_double_vjp_with_dropout)"
    else:
        files, keyword = test_files(), "cuda"
    shards = test_shards(files, int(os.environ.get("GPU_CHECK_TEST_SHARDS", "2" if ctx.dry_run else "3")))
    commands = []
    for k, shard in enumerate(shards):
        junit = ctx.work / (f"pytest_{ctx.suffix}.xml" if len(shards) == 1 else f"pytest_{ctx.suffix}_{k}.xml")
        commands.append([ctx.python, "-m", "pytest", *shard, "-k", keyword,
                         "-o", "addopts=",  # pyproject's addopts name pytest-benchmark's flag: it may be missing
                         "-p", "no:cacheprovider", "-p", "bench._pytest_deadline", "--continue-on-collection-errors",
                         "-v", "-rfE", "--durations=10", "--junitxml", str(junit)])
    return commands


def _tests_env(ctx: Context) -> dict[str, str]:
    # CUBLAS_WORKSPACE_CONFIG lets a test call torch.use_deterministic_algorithms(True) on CUDA (it must be
    # set before CUDA starts); a few CPU threads per pytest process (several run side by side)
    return {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "4"}


def _meta_step_cmd(ctx: Context, deadline: float) -> list[str]:
    cmd = [ctx.python, "-m", "bench.meta_step", "--device", ctx.device, "--out-dir", str(ctx.results_dir),
           "--priority", *META_STEP_PRIORITY, "--deadline", f"{deadline:.1f}"]
    if ctx.dry_run:
        cmd += ["--model", "tiny", "--batch-sizes", "2", "--seq-len", "8", "--dtypes", "fp32", "bf16",
                "--warmup", "0", "--repeats", "1", "--rounds", "1", "--isolation", "inprocess"]
    else:  # bert-base -> 6 layers, seq 128, bs 4 and 32, fp32 and bf16 (the CUDA defaults), in one process
        cmd += ["--warmup", "2", "--repeats", "5"]
    return cmd


def _profile_cmd(ctx: Context, deadline: float) -> list[str]:
    cmd = [ctx.python, "-m", "bench.profile_step", "--device", ctx.device, "--profile", "--memory", "--sync-ab",
           "--walks-ab",
           "--json", str(ctx.results_dir / f"profile_step_{ctx.suffix}.json")]
    if ctx.dry_run:
        return cmd + ["--model", "tiny", "--batch-size", "2", "--seq-len", "8", "--steps", "1", "--warmup", "0",
                      "--floor-repeats", "1", "--row-limit", "10"]
    # MetaDistil exact at bs 4, BERT-base -> 6 layers, fp32: the setting furthest from its floor
    return cmd + ["--batch-size", "4", "--steps", "5", "--warmup", "2", "--floor-repeats", "5", "--row-limit", "30"]


# The launch configurations (BLOCK_VxWARPS) the kernels step times for the bf16 KD kernels.  In the third H200
# run the bf16 forward reached 60% of the copy bandwidth at both sizes, fp32 94%: at the default 4096x8 a bf16
# loop iteration moves half the bytes of an fp32 one for the same reductions.  Which of these brings bf16 to
# fp32's fraction decides a per-dtype default.  tests/test_kernel_compile.py compiles each to an sm_90 cubin.
KERNEL_SWEEP = "4096x8,8192x16,16384x32,2048x4"


def _kernels_cmd(ctx: Context, deadline: float) -> list[str]:
    cmd = [ctx.python, "-m", "bench.kernels", "--device", ctx.device, "--out-dir", str(ctx.results_dir),
           "--deadline", f"{deadline:.1f}"]
    if ctx.dry_run:
        return cmd + ["--sizes", "tiny", "--impls", "fastmeta,eager", "--warmup", "0", "--repeats", "1",
                      "--sweep", "16x4", "--sweep-dtypes", "fp32"]
    return cmd + ["--warmup", "2", "--repeats", "5", "--sweep", KERNEL_SWEEP, "--sweep-dtypes", "bf16"]


def _hvp_cmd(ctx: Context, deadline: float) -> list[str]:
    cmd = [ctx.python, "-m", "bench.hvp", "--device", ctx.device, "--out", str(ctx.results_dir),
           "--deadline", f"{deadline:.1f}", "--isolation", "inprocess"]
    if ctx.dry_run:
        return cmd + ["--teacher", "tiny", "--batch", "2", "--seq", "8", "--repeats", "1", "--warmup", "0"]
    return cmd + ["--teacher", "bert-base", "--batch", "32", "--seq", "128", "--repeats", "5", "--warmup", "1"]


def _growth_cmd(ctx: Context, deadline: float) -> list[str]:
    cmd = [ctx.python, "-m", "bench.growth", "--device", ctx.device, "--out-dir", str(ctx.results_dir),
           "--deadline", f"{deadline:.1f}"]
    if ctx.dry_run:
        return cmd + ["--model", "tiny", "--batch-sizes", "2", "4", "--seq-lens", "8", "16", "--warmup", "0",
                      "--repeats", "1", "--isolation", "inprocess"]
    # BERT-base shape -> 6 layers, fp32, bs 4/16/32 x seq 128/256, every method and the peers (the CUDA defaults)
    return cmd + ["--warmup", "1", "--repeats", "3"]


def make_steps(dry_run: bool) -> list[Step]:
    """The steps with their caps.  The estimates are the seconds each step took on the H200 of the third run
    (2026-11-28; ``profile``: a guess, it had not run, plus ~10 s for bench.updates' rows), growth the time
    left to it in the default budget."""
    scale = 0.5 if dry_run else 1.0
    return [
        Step("info", cap_s=60, min_s=0, estimate_s=10, command=_info_cmd, internal_deadline=False),
        Step("extension", cap_s=200 * scale, min_s=30 * scale, estimate_s=50, command=_extension_cmd,
             env=_extension_env, internal_deadline=False),
        Step("tests", cap_s=150 * scale, min_s=40 * scale, estimate_s=70, command=_tests_cmd, env=_tests_env,
             margin_s=20 * scale),
        Step("meta_step", cap_s=220 * scale, min_s=30 * scale, estimate_s=200, command=_meta_step_cmd,
             margin_s=15 * scale),
        # exact steps timed by phase, under torch.profiler and with per-phase peaks, and each floor pass alone:
        # where the gap to the floor is
        Step("profile", cap_s=90 * scale, min_s=40 * scale, estimate_s=55, command=_profile_cmd,
             internal_deadline=False),
        # the --sweep rows (4 bf16 launch configurations x 2 sizes, each compiled first) add ~15 s, which
        # come out of growth's share (last, cut by its deadline): the estimates already fill the budget
        Step("kernels", cap_s=100 * scale, min_s=20 * scale, estimate_s=45, command=_kernels_cmd,
             margin_s=15 * scale),
        Step("hvp", cap_s=80 * scale, min_s=20 * scale, estimate_s=40, command=_hvp_cmd, margin_s=10 * scale),
        # low priority: last, and cut short by its deadline (small cells first) when the budget is short
        Step("growth", cap_s=120 * scale, min_s=30 * scale, estimate_s=70, command=_growth_cmd,
             margin_s=15 * scale),
    ]


PEERS_DIR = REPO / "build" / "gpu_check_peers"
PEER_PACKAGES = ("higher", "torchopt", "optree", "graphviz")  # torchopt imports optree and graphviz


def peers_dir() -> Path | None:
    """Where vendored peer libraries are (``GPU_CHECK_PEERS_PATH``, else build/gpu_check_peers if present)."""
    value = os.environ.get("GPU_CHECK_PEERS_PATH")
    if value:
        return Path(value).resolve()
    if not PEERS_DIR.is_dir():
        return None
    # vendored packages include compiled modules (optree) built for one Python minor: a folder made
    # for another Python (its PYTHON_VERSION file) would shadow working installs with broken ones
    marker = PEERS_DIR / "PYTHON_VERSION"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if marker.is_file() and marker.read_text().strip() != here:
        return None
    return PEERS_DIR


def vendor_peers(target: Path = PEERS_DIR) -> list[str]:
    """Copy the installed peer packages (higher, torchopt without its compiled ``_C``, optree) to ``target``."""
    import importlib

    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in PEER_PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: not importable here ({type(exc).__name__}: {exc}); not copied")
            continue
        src = Path(module.__file__).parent
        dst = target / name
        if dst.exists():
            shutil.rmtree(dst)
        ignore = shutil.ignore_patterns("__pycache__", "_C.*.so", "_C*.pyd") if name == "torchopt" \
            else shutil.ignore_patterns("__pycache__")
        shutil.copytree(src, dst, ignore=ignore)
        copied.append(f"{name} {getattr(module, '__version__', '?')}")
    (target / "PYTHON_VERSION").write_text(f"{sys.version_info.major}.{sys.version_info.minor}\n")
    print(f"vendored into {target}: {', '.join(copied) or 'nothing'} "
          f"(carry it with the checkout; python {sys.version_info.major}.{sys.version_info.minor} here)")
    return copied


def base_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"})
    env.pop("GPU_CHECK_TESTS_DEADLINE", None)
    peers_path = peers_dir()
    if peers_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(peers_path)])  # after the checkout
    if ctx.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run even where a GPU is present
    if ctx.disable_extension:
        env["FASTMETA_DISABLE_EXTENSION"] = "1"
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a step's process and whatever it started (it leads its own process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def run_step(ctx: Context, step: Step, index: int) -> dict[str, Any]:
    record: dict[str, Any] = {"name": step.name, "cap_s": step.cap_s, "estimate_s": step.estimate_s,
                              "min_s": step.min_s}
    remaining = ctx.remaining()
    if step.min_s > 0 and remaining < step.min_s:
        record.update(status="skipped (time)", seconds=0.0,
                      detail=f"{remaining:.0f} s left of the {ctx.budget_s:.0f} s budget, the step needs >= {step.min_s:.0f} s")
        ctx.log(f"{step.name}: SKIPPED (time): {record['detail']}")
        return record
    cap = min(step.cap_s, remaining) if step.min_s > 0 else step.cap_s
    start = time.time()
    internal = start + max(cap - step.margin_s, 1.0)
    commands = step.command(ctx, internal)
    if commands and isinstance(commands[0], str):
        commands = [commands]  # one process; the tests step may run several (shards) side by side
    env = base_env(ctx)
    env.update(step.env(ctx))
    if step.name == "tests":
        env["GPU_CHECK_TESTS_DEADLINE"] = f"{internal:.1f}"
    log_path = ctx.work / "logs" / f"{index}_{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    grace = 20.0 if step.internal_deadline else 0.0
    for argv in commands:
        ctx.log(f"{step.name}: start (cap {cap:.0f} s, estimate {step.estimate_s:.0f} s): "
                + " ".join(argv[1:]))
    status, codes = "ok", []
    running = []
    for k, argv in enumerate(commands):
        path = log_path if len(commands) == 1 else log_path.with_name(f"{index}_{step.name}.{k}.log")
        fh = open(path, "w")
        fh.write(f"$ {' '.join(argv)}\n# cwd {REPO}; {_now()}\n\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        running.append((proc, fh, path))
    stop_at = start + cap + grace
    for proc, fh, path in running:
        try:
            codes.append(proc.wait(timeout=max(stop_at - time.time(), 0.1)))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = "timeout"
            codes.append(None)
            fh.write(f"\n# gpu-check: killed after {cap + grace:.0f} s (cap)\n")
        fh.close()
    seconds = time.time() - start
    if len(running) > 1:  # one log for the step: the shards' logs one after the other
        with open(log_path, "w") as out:
            for _, _, path in running:
                out.write(f"##### {path.name}\n" + path.read_text(errors="replace") + "\n")
                path.unlink()
    text = log_path.read_text(errors="replace")
    rc = next((c for c in codes if c not in (0, None)), 0 if status == "ok" else None)
    if status != "timeout":
        if rc != 0:
            status = "failed"
        elif "SKIPPED (time)" in text or "gpu-check time cap" in text:
            status = "partial"
    record.update(status=status, seconds=round(seconds, 1), returncode=rc, log=str(log_path.relative_to(ctx.work)),
                  command=commands[0][1:] if len(commands) == 1 else [c[1:] for c in commands])
    try:
        record["summary"] = SUMMARISERS[step.name](ctx, text)
    except Exception as exc:  # noqa: BLE001 - a summary must never break the run
        record["summary"] = {"summary_error": f"{type(exc).__name__}: {exc}"}
    if step.name == "tests" and status in ("ok", "partial"):
        s = record["summary"]
        if s.get("failed") or s.get("errors"):
            status = record["status"] = "failed"
        elif s.get("skipped_time_cap"):
            status = record["status"] = "partial"
    if status in ("failed", "timeout"):
        record["log_tail"] = "\n".join(text.strip().splitlines()[-25:])[-1500:]
    ctx.log(f"{step.name}: {status.upper()} in {seconds:.0f} s" + (f" (exit code {rc})" if rc not in (0, None) else ""))
    return record


# =========================================================================== per-step summaries
def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summ_info(ctx: Context, text: str) -> dict[str, Any]:
    return _load_json(ctx.work / "info.json") or {}


def _summ_extension(ctx: Context, text: str) -> dict[str, Any]:
    data = _load_json(ctx.work / "extension.json") or {}
    return {k: data.get(k) for k in ("built", "cpu", "cuda", "disabled", "error", "op_check", "kd_loss_check",
                                     "build_seconds", "exception", "cuda_toolkit", "cuda_note", "log_file")}


def parse_junit(path: Path) -> dict[str, Any] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skipped_time_cap": 0,
           "failures": [], "by_file": {}, "slowest": []}
    cases = []
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        module = (case.get("classname") or "").split(".")[-1] or "?"
        per = out["by_file"].setdefault(module, {"passed": 0, "failed": 0, "skipped": 0})
        kind = None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kind = child.tag
                message = (child.get("message") or child.text or "").strip().splitlines()
                break
        if kind is None:
            out["passed"] += 1
            per["passed"] += 1
        elif kind == "skipped":
            out["skipped"] += 1
            per["skipped"] += 1
            if message and "gpu-check time cap" in message[0]:
                out["skipped_time_cap"] += 1
        else:
            out["failed" if kind == "failure" else "errors"] += 1
            per["failed"] += 1
            out["failures"].append(f"{name}: {(message[0] if message else kind)[:160]}")
        cases.append((float(case.get("time") or 0.0), name))
    out["slowest"] = [f"{t:.1f} s {n}" for t, n in sorted(cases, reverse=True)[:10]]
    out["junit_seconds"] = float(root.find("testsuite").get("time", 0.0)) if root.find("testsuite") is not None \
        else float(root.get("time", 0.0))
    return out


def _merge_junit(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(parts[0])
    for part in parts[1:]:
        for key in ("tests", "passed", "failed", "errors", "skipped", "skipped_time_cap"):
            out[key] += part[key]
        out["failures"] = out["failures"] + part["failures"]
        out["by_file"] = {**out["by_file"], **part["by_file"]}
        out["slowest"] = sorted(out["slowest"] + part["slowest"], key=lambda s: -float(s.split()[0]))[:10]
        out["junit_seconds"] = max(out["junit_seconds"], part["junit_seconds"])
    out["shards"] = len(parts)
    return out


def _summ_tests(ctx: Context, text: str) -> dict[str, Any]:
    # the -v lines of the log count what ran even in a shard killed before it wrote its junit XML
    counts = {k: len(re.findall(rf"^\S+::\S+ {k}\b", text, flags=re.M)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    parts = [parse_junit(p) for p in sorted(ctx.work.glob(f"pytest_{ctx.suffix}*.xml"))]
    parts = [p for p in parts if p is not None]
    if parts:
        out = _merge_junit(parts)
        out["log_counts"] = counts
        return out
    return {"tests": sum(counts.values()), "passed": counts["PASSED"], "failed": counts["FAILED"],
            "errors": counts["ERROR"], "skipped": counts["SKIPPED"], "skipped_time_cap": 0,
            "failures": re.findall(r"^(\S+::\S+) FAILED", text, flags=re.M)[:20], "from": "log (no junit XML)"}


def _summ_meta_step(ctx: Context, text: str) -> dict[str, Any]:
    from bench.meta_step import row_name

    data = _load_json(ctx.results_dir / f"meta_step_{ctx.suffix}.json")
    if data is None:
        return {}
    out: dict[str, Any] = {"settings": {}, "incomplete": data.get("incomplete"), "peers": data.get("peers")}
    counts = {"ok": 0, "failed": 0, "skipped": 0, "not_installed": 0}
    for s in data["settings"]:
        rows = {}
        for r in s["steps"]:
            name = row_name(r)  # variants keep their own names: "metadistil/exact+double_vjp"
            if "skipped" in r:
                if r["skipped"] == "time":
                    counts["skipped"] += 1
                else:
                    counts["not_installed"] += 1
                    rows[name] = {"skipped": r["skipped"][:160]}
                continue
            if "error" in r:
                counts["failed"] += 1
                rows[name] = {"error": r["error"].strip().splitlines()[-1][:160]}
                continue
            counts["ok"] += 1
            rows[name] = {"median_s": r["median_s"], "x_kd": r.get("time_vs_kd"),
                          "x_autograd": r.get("time_vs_autograd"), "x_floor": r.get("time_vs_floor"),
                          "peak_bytes": r["memory"]["peak_bytes"], "peak_x_kd": r.get("peak_vs_kd"),
                          "step_memory_bytes": r["memory"].get("step_memory_bytes")}
        mf = s.get("memory_floor") or {}
        out["settings"][s["label"]] = {"floor_s": s["floor"].get("floor_s"), "steps": rows,
                                       "peak_bound_x_kd": mf.get("bound_vs_kd"),
                                       "kd_plus_state_x_kd": mf.get("kd_plus_state_vs_kd"),
                                       "teacher_backward_x_kd": mf.get("teacher_backward_vs_kd"),
                                       "goals": data.get("goals", {}).get(s["label"], {})}
    out["counts"] = counts
    return out


def _summ_profile(ctx: Context, text: str) -> dict[str, Any]:
    data = _load_json(ctx.results_dir / f"profile_step_{ctx.suffix}.json")
    if data is None:
        return {}
    phases = data.get("phases", {})
    gaps = sorted(data.get("gaps", []), key=lambda row: -row[4])[:4]  # (phase, step s, floor pass, floor s, gap s)
    cfg = data.get("config", {})
    return {"label": f"{cfg.get('algorithm')}/{cfg.get('hypergrad')} {cfg.get('model')} bs{cfg.get('batch_size')}",
            "total_s": phases.get("total"), "floor_s": data.get("floor_s"),
            "largest_gaps": [{"phase": g[0], "step_s": g[1], "floor_s": g[3], "gap_s": g[4]} for g in gaps],
            "peak_mib": sorted(data.get("phase_peak_mib", {}).items(), key=lambda kv: -kv[1])[:3],
            # the whole step with and without meta_step's CUDA syncs around each phase (profile_step --sync-ab)
            "sync_ab": {k: (data.get("sync_ab") or {}).get(k) for k in ("median_with_s", "median_without_s",
                                                                         "without_vs_with")},
            # walking each model once per meta_step against every time (profile_step --walks-ab)
            "walks_ab": {k: (data.get("walks_ab") or {}).get(k) for k in ("median_once_s", "median_every_time_s",
                                                                           "paired_difference_median_s")},
            # the student tangent: the step's phase, the floor's forward-AD JVP, torch.func.jvp, the double VJP (ms)
            "tangent_ms": {k: round(v * 1e3, 3) for k, v in (
                ("step: student_jvp phase", phases.get("meta_gradient.student_jvp")),
                ("floor: forward-AD JVP", data.get("floor_medians", {}).get("student_jvp")),
                ("torch.func.jvp", data.get("floor_medians", {}).get("diag: student JVP by torch.func.jvp")),
                ("double VJP", data.get("floor_medians", {}).get("diag: student tangent by double VJP")),
            ) if v is not None},
            # the student's forward+backward alone and right after a teacher forward whose graph it holds (ms):
            # on a CPU the second pays the allocator's fresh mappings; CUDA's caching allocator should not
            "student_pass_ms": {k: round(v * 1e3, 3) for k, v in (
                ("alone", data.get("floor_medians", {}).get("student_forward_backward_train")),
                ("teacher graph alive", data.get("floor_medians", {}).get(
                    "diag: student_forward_backward_train, teacher graph alive")),
            ) if v is not None},
            # the update phases taken apart (bench.updates): row -> [ms, x its side's optimizer step, % copy bw]
            "updates": {r["row"]: [round(r["median_s"] * 1e3, 3), _round(r.get("x_optimizer_step")),
                                   _round(r.get("pct_copy_bw"), 1)]
                        for r in (data.get("updates") or {}).get("rows", []) if "median_s" in r}}


def _round(value, digits: int = 2):
    return None if value is None else round(value, digits)


def _summ_growth(ctx: Context, text: str) -> dict[str, Any]:
    data = _load_json(ctx.results_dir / f"growth_{ctx.suffix}.json")
    if data is None:
        return {}
    counts = {"ok": 0, "failed": 0, "skipped": 0, "not_installed": 0}
    largest: dict[str, Any] = {}
    for r in data["rows"]:
        if "median_s" in r:
            counts["ok"] += 1
            cell = (r["batch_size"] * r["seq_len"], r["seq_len"])
            best = largest.get(r["method"])
            if best is None or cell > best["_cell"]:
                largest[r["method"]] = {"_cell": cell, "batch_size": r["batch_size"], "seq_len": r["seq_len"],
                                        "median_s": r["median_s"], "step_memory_bytes": r["step_memory_bytes"],
                                        "x_exact": r.get("time_vs_exact"), "mem_x_exact": r.get("step_memory_vs_exact")}
        elif "error" in r:
            counts["failed"] += 1
        elif r.get("skipped") == "time":
            counts["skipped"] += 1
        else:
            counts["not_installed"] += 1
    for v in largest.values():
        v.pop("_cell")
    return {"counts": counts, "largest_cell": largest, "growth": data.get("growth"), "incomplete": data.get("incomplete")}


def _summ_kernels(ctx: Context, text: str) -> dict[str, Any]:
    data = _load_json(ctx.results_dir / f"kernels_{ctx.suffix}.json")
    if data is None:
        return {}
    bw = data.get("copy_bandwidth_bytes_per_s")
    fb: dict[str, dict[str, Any]] = {}
    fwd: dict[str, dict[str, Any]] = {}
    problems = []
    for r in data["results"]:
        key = f"{r['rows']}x{r['vocab']} {r.get('dtype_name', r['dtype'])}"
        if "error" in r or "skipped" in r:
            problems.append(f"{key} {r['impl']}: " + (f"skipped ({r['skipped']})" if "skipped" in r else r["error"][:120]))
            continue
        if r["mode"] in ("fwd+bwd", "fwd"):
            (fb if r["mode"] == "fwd+bwd" else fwd).setdefault(key, {})[r["impl"]] = {
                "ms": round(r["median_ms"], 4), "pct_copy_bw": round(100 * r["gb_per_s"] * 1e9 / bw, 1) if bw else None}
    return {"copy_bandwidth_gb_s": round(bw / 1e9, 1) if bw else None, "fwd_bwd": fb, "fwd": fwd,
            "not_measured": problems}


def _summ_hvp(ctx: Context, text: str) -> dict[str, Any]:
    data = _load_json(ctx.results_dir / f"hvp_{ctx.suffix}.json")
    if data is None:
        return {}
    rows = {r["op"]: r for r in data["rows"]}
    out = {}
    for op, r in rows.items():
        if "error" in r or "skipped" in r:
            out[op] = r.get("error") or f"skipped ({r['skipped']})"
            continue
        ref = rows.get("hvp/backward" if op.startswith("hvp/") else "mixed/backward_teacher", {})
        ok_ref = "median_s" in ref
        out[op] = {"median_s": r["median_s"], "peak_bytes": r["peak_bytes"],
                   "x_backward_time": r["median_s"] / ref["median_s"] if ok_ref else None,
                   "x_backward_memory": r["peak_bytes"] / ref["peak_bytes"] if ok_ref and ref["peak_bytes"] > 0 else None}
    return out


SUMMARISERS: dict[str, Callable[[Context, str], dict[str, Any]]] = {
    "info": _summ_info, "extension": _summ_extension, "tests": _summ_tests, "meta_step": _summ_meta_step,
    "profile": _summ_profile, "kernels": _summ_kernels, "hvp": _summ_hvp, "growth": _summ_growth,
}


# =========================================================================== sub-commands (run as steps)
def _version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception as exc:  # noqa: BLE001
        return f"missing ({type(exc).__name__})" if not isinstance(exc, ImportError) else None
    return str(getattr(module, "__version__", "?"))


def _run_text(argv: list[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except Exception:  # noqa: BLE001
        return None
    return (out.stdout + out.stderr).strip() or None


def _git_commit() -> str | None:
    from bench.common import _git_commit as commit  # the one home (bench.common imports no torch)

    return commit()


def info_main(path: str) -> int:
    """Versions, GPU, toolchain, and how fastmeta imports here (JSON to ``path``, readable to stdout)."""
    import platform

    info: dict[str, Any] = {"date_utc": _now(), "python": sys.version.split()[0], "executable": sys.executable,
                            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        _collect_info(info)
    except BaseException as exc:  # noqa: BLE001 - whatever broke is reported, the JSON is still written
        import traceback

        traceback.print_exc()
        info["info_error"] = f"{type(exc).__name__}: {exc}"
    Path(path).write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(json.dumps(info, indent=2, default=str))
    return 0 if "error" not in (info.get("fastmeta") or {}) and "info_error" not in info else 1


def _collect_info(info: dict[str, Any]) -> None:
    for name in ("torch", "triton", "transformers", "numpy", "pytest", "matplotlib", "ninja", "setuptools"):
        info[name] = _version(name)
    info["pytest_benchmark"] = _version("pytest_benchmark")
    try:  # the benchmark's optional peers (their rows say "not installed" without them)
        from bench.peers import PEERS, availability

        info["peers"] = {name: availability(name) for name in PEERS}
    except Exception as exc:  # noqa: BLE001
        info["peers"] = {"error": f"{type(exc).__name__}: {exc}"}
    info["peers_path"] = os.environ.get("GPU_CHECK_PEERS_PATH") or (str(PEERS_DIR) if PEERS_DIR.is_dir() else None)
    import torch

    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        from bench.common import cuda_device_info

        info["gpu"] = cuda_device_info()
        print(_run_text(["nvidia-smi"]) or "nvidia-smi: not available")
    try:
        from torch.utils import cpp_extension

        info["cuda_home"] = cpp_extension.CUDA_HOME
        info["ninja_available"] = bool(cpp_extension.is_ninja_available())
    except Exception as exc:  # noqa: BLE001
        info["cuda_home"] = f"unknown ({type(exc).__name__}: {exc})"
    nvcc = shutil.which("nvcc") or (str(Path(info["cuda_home"]) / "bin" / "nvcc")
                                    if isinstance(info.get("cuda_home"), str) and info["cuda_home"] else None)
    info["nvcc"] = nvcc
    version = _run_text([nvcc, "--version"]) if nvcc else None
    info["nvcc_version"] = version.strip().splitlines()[-1] if version else None
    info["git_commit"] = _git_commit()
    try:
        import fastmeta
        import fastmeta.kernels  # noqa: F401 - kernels/ mounted as fastmeta.kernels

        info["fastmeta"] = {"version": fastmeta.__version__, "file": fastmeta.__file__,
                            "kernels": sys.modules["fastmeta.kernels"].__file__,
                            "from_checkout": str(Path(fastmeta.__file__).resolve()).startswith(str(REPO) + os.sep)}
        import fastmeta.kernels.kd_loss  # noqa: F401 - the Triton kernels import (triton itself)

        info["fastmeta"]["triton_kernels_import"] = True
    except Exception as exc:  # noqa: BLE001
        info["fastmeta"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        from fastmeta.backends import triton_mode

        info["triton_mode"] = triton_mode()
    except Exception as exc:  # noqa: BLE001
        info["triton_mode"] = f"unknown ({type(exc).__name__})"
    info["shared_folder_present"] = (REPO.parent / "shared").is_dir()


def extension_main(path: str, device: str) -> int:
    """Build/load the extension; check one op against its PyTorch twin (and the Triton KD loss on CUDA)."""
    import traceback

    import torch

    out: dict[str, Any] = {"device": device, "require_cuda": _env_flag("FASTMETA_REQUIRE_CUDA_EXTENSION")}
    t0 = time.time()
    try:
        from fastmeta import _extension

        _extension.load_extension()
    except BaseException as exc:  # noqa: BLE001 - FASTMETA_REQUIRE_CUDA_EXTENSION may raise: recorded
        out["exception"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]
        traceback.print_exc()
    out["build_seconds"] = round(time.time() - t0, 1)
    try:
        from fastmeta import _extension

        out.update(dataclasses.asdict(_extension.status()))  # built, cpu, cuda, error, toolkit, build dir, ...
    except Exception as exc:  # noqa: BLE001
        out["status_error"] = f"{type(exc).__name__}: {exc}"
    dev = torch.device(device)
    try:  # one extension op against its twin
        from fastmeta import ops

        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(1000, generator=g).to(dev), torch.randn(7, 3, generator=g).to(dev)]
        ys = [torch.randn(1000, generator=g).to(dev), torch.randn(7, 3, generator=g).to(dev)]
        if ops.extension_ops_available(dev):
            a = float(ops.dot(xs, ys, backend="extension"))
            b = float(ops.dot(xs, ys, backend="torch"))
            out["op_check"] = {"op": "dot", "extension": a, "torch": b, "ok": abs(a - b) <= 1e-4 * max(1.0, abs(b))}
        else:
            out["op_check"] = {"op": "dot", "ok": None, "note": f"extension not available on {device}"}
    except Exception as exc:  # noqa: BLE001
        out["op_check"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if device == "cuda":
        try:  # the Triton KD loss (native) against the PyTorch reference, forward and backward
            from fastmeta.losses import kd_loss

            g = torch.Generator().manual_seed(1)
            zs = (4 * torch.randn(64, 1000, generator=g)).to(dev).requires_grad_(True)
            zt = (4 * torch.randn(64, 1000, generator=g)).to(dev).requires_grad_(True)
            fast = kd_loss(zs, zt, 2.0)
            gs = torch.autograd.grad(fast, (zs, zt))
            ref = kd_loss(zs, zt, 2.0, backend="torch")
            gr = torch.autograd.grad(ref, (zs, zt))
            err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(gs, gr))
            out["kd_loss_check"] = {"loss_triton": float(fast), "loss_torch": float(ref), "max_rel_grad_err": err,
                                    "ok": abs(float(fast) - float(ref)) <= 1e-4 * abs(float(ref)) and err <= 1e-4}
        except Exception as exc:  # noqa: BLE001
            out["kd_loss_check"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    Path(path).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(out, indent=2, default=str))
    if device == "cuda":
        good = bool(out.get("cuda")) and out.get("op_check", {}).get("ok") is True \
            and out.get("kd_loss_check", {}).get("ok") is True
    else:
        good = (bool(out.get("built")) or bool(out.get("disabled"))) and out.get("op_check", {}).get("ok") is not False
    return 0 if good else 1


# =========================================================================== report
def _fmt_s(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def key_figures(report: dict[str, Any]) -> list[str]:
    """Short lines: what a reader of the last screen of output needs."""
    lines: list[str] = []
    steps = {s["name"]: s for s in report["steps"]}
    info = steps.get("info", {}).get("summary", {})
    gpu = info.get("gpu") or {}
    lines.append(f"device: {report['device']}" + (f" = {gpu.get('name')} (sm {gpu.get('capability')}, "
                 f"{(gpu.get('total_memory_bytes') or 0) / 2**30:.0f} GiB, driver {gpu.get('driver')})" if gpu else ""))
    lines.append(f"versions: python {info.get('python')}, torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
                 f"triton {info.get('triton')}, transformers {info.get('transformers')}, numpy {info.get('numpy')}, "
                 f"pytest {info.get('pytest')}, matplotlib {info.get('matplotlib')}; nvcc: {info.get('nvcc_version')}; "
                 f"ninja: {info.get('ninja_available')}; triton mode: {info.get('triton_mode')}")
    pe = info.get("peers") or {}
    if pe and "error" not in pe:
        lines.append("peers: " + ", ".join(f"{k} {v['version']}" if v.get("available") else f"{k} missing"
                                           for k, v in pe.items()))
    fm = info.get("fastmeta") or {}
    if fm:
        lines.append(f"fastmeta imported from {fm.get('file', fm.get('error'))}")
    ext = steps.get("extension", {}).get("summary") or {}
    if ext:
        lines.append(f"extension: built={ext.get('built')} cpu={ext.get('cpu')} cuda={ext.get('cuda')} "
                     f"disabled={ext.get('disabled')} ({ext.get('build_seconds')} s); op check: "
                     f"{(ext.get('op_check') or {}).get('ok')}; Triton kd_loss check: {(ext.get('kd_loss_check') or {}).get('ok')}"
                     + (f"; toolkit: {ext.get('cuda_toolkit') or ext.get('cuda_note')}" if report["device"] == "cuda" else "")
                     + (f"; error: {str(ext.get('error') or ext.get('exception'))[:300]}"
                        if ext.get("error") or ext.get("exception") else ""))
    t = steps.get("tests", {}).get("summary") or {}
    if "tests" in t:
        lines.append(f"tests: {t['tests']} run: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped ({t.get('skipped_time_cap', 0)} by the time cap)")
        if t.get("by_file"):
            lines.append("  per file (passed/failed/skipped): " + ", ".join(
                f"{k} {v['passed']}/{v['failed']}/{v['skipped']}" for k, v in t["by_file"].items()))
        lines += [f"  FAILED {f}" for f in t.get("failures", [])[:15]]
        if len(t.get("failures", [])) > 15:
            lines.append(f"  ... and {len(t['failures']) - 15} more failures (see the junit XML in the tarball)")
    m = steps.get("meta_step", {}).get("summary") or {}
    if m.get("settings"):
        c = m.get("counts", {})
        lines.append(f"meta_step: {c.get('ok')} configurations measured, {c.get('failed')} failed, "
                     f"{c.get('skipped')} skipped (time), {c.get('not_installed', 0)} peer rows not installed")
        for label, s in m["settings"].items():
            st = s["steps"]
            kd = st.get("kd", {})
            ex = st.get("metadistil/exact", {})
            au = st.get("metadistil/autograd", {})
            parts = [f"  {label}: floor {_fmt_s(s.get('floor_s'))} s; kd {_fmt_s(kd.get('median_s'))} s, "
                     f"peak {(kd.get('peak_bytes') or 0) / 2**30:.2f} GiB"]
            if "median_s" in ex:
                parts.append(f"metadistil/exact {_fmt_s(ex['median_s'])} s = {_fmt_x(ex.get('x_kd'))} KD, "
                             f"{_fmt_x(ex.get('x_autograd'))} autograd, {_fmt_x(ex.get('x_floor'))} floor, "
                             f"peak {_fmt_x(ex.get('peak_x_kd'))} KD"
                             + (f" (floor {_fmt_x(s['peak_bound_x_kd'])}: the larger of KD + teacher optimizer "
                                f"state {_fmt_x(s.get('kd_plus_state_x_kd'))} and a teacher forward+backward "
                                f"with both optimizers' states {_fmt_x(s.get('teacher_backward_x_kd'))})"
                                if s.get("peak_bound_x_kd") else ""))
            if "median_s" in au:
                parts.append(f"autograd {_fmt_s(au['median_s'])} s, peak {_fmt_x(au.get('peak_x_kd'))} KD")
            for peer in ("higher", "torchopt"):
                pr = st.get(f"peer/{peer}", {})
                if "median_s" in pr:
                    parts.append(f"{peer} {_fmt_s(pr['median_s'])} s, peak {_fmt_x(pr.get('peak_x_kd'))} KD")
                elif "skipped" in pr:
                    parts.append(f"{peer}: {pr['skipped'][:40]}")
            lines.append("; ".join(parts))
            errs = [f"{k}: {v['error']}" for k, v in st.items() if "error" in v]
            lines += [f"    FAILED {e}" for e in errs[:5]]
    pf = steps.get("profile", {}).get("summary") or {}
    if pf.get("total_s"):
        lines.append(f"profile ({pf.get('label')}): step {_fmt_s(pf['total_s'])} s, floor "
                     f"{_fmt_s(pf.get('floor_s'))} s; largest gaps: " + ", ".join(
                         f"{g['phase']} {g['step_s'] * 1e3:.1f} ms vs {g['floor_s'] * 1e3:.1f} ms"
                         for g in pf.get("largest_gaps", []))
                     + "; peaks above the start: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in pf.get("peak_mib", [])))
        ab = pf.get("sync_ab") or {}
        if ab.get("median_with_s"):
            lines.append(f"  whole step with the phases' CUDA syncs {ab['median_with_s'] * 1e3:.1f} ms, without "
                         f"{ab['median_without_s'] * 1e3:.1f} ms ({_fmt_x(ab['without_vs_with'])})")
        wk = pf.get("walks_ab") or {}
        if wk.get("median_once_s"):
            lines.append(f"  whole step walking each model once {wk['median_once_s'] * 1e3:.1f} ms, every time "
                         f"{wk['median_every_time_s'] * 1e3:.1f} ms (paired difference "
                         f"{wk['paired_difference_median_s'] * 1e3:.2f} ms)")
        if pf.get("student_pass_ms"):
            lines.append("  student forward+backward: " + ", ".join(f"{k} {v:.2f} ms"
                                                                   for k, v in pf["student_pass_ms"].items()))
        if pf.get("tangent_ms"):
            lines.append("  student tangent: " + ", ".join(f"{k} {v:.2f} ms" for k, v in pf["tangent_ms"].items()))
        for row, (ms, x, pct) in (pf.get("updates") or {}).items():
            lines.append(f"  {row}: {ms:.2f} ms, {_fmt_x(x)} its optimizer step, "
                         f"{'-' if pct is None else f'{pct:.0f}%'} of copy bandwidth")
    gr = steps.get("growth", {}).get("summary") or {}
    if gr.get("counts"):
        c = gr["counts"]
        lines.append(f"growth: {c['ok']} configurations measured, {c['failed']} failed, {c['skipped']} skipped (time), "
                     f"{c['not_installed']} peer rows not installed; largest cell measured per method:")
        for m, v in gr.get("largest_cell", {}).items():
            lines.append(f"  {m}: bs{v['batch_size']} seq{v['seq_len']} {_fmt_s(v['median_s'])} s, step mem "
                         f"{(v['step_memory_bytes'] or 0) / 2**20:.0f} MiB ({_fmt_x(v.get('x_exact'))} / "
                         f"{_fmt_x(v.get('mem_x_exact'))} of exact's time / memory)")
    k = steps.get("kernels", {}).get("summary") or {}
    if k.get("fwd_bwd"):
        lines.append(f"kernels (fwd+bwd, copy bandwidth {k.get('copy_bandwidth_gb_s')} GB/s):")
        for key, impls in k["fwd_bwd"].items():
            lines.append(f"  {key}: " + ", ".join(
                f"{impl} {v['ms']:.3f} ms" + (f" ({v['pct_copy_bw']:.0f}% BW)" if v.get("pct_copy_bw") else "")
                for impl, v in impls.items()))
        swept = {key: {i: v for i, v in impls.items() if i.startswith("kernels ")} for key, impls in k.get("fwd", {}).items()}
        for key, impls in swept.items():
            if impls:
                lines.append(f"  launch configurations, forward, {key}: " + ", ".join(
                    f"{impl[len('kernels '):]} {v['ms']:.3f} ms" + (f" ({v['pct_copy_bw']:.0f}% BW)" if v.get("pct_copy_bw") else "")
                    for impl, v in impls.items()))
        lines += [f"  not measured: {p}" for p in k.get("not_measured", [])[:6]]
    h = steps.get("hvp", {}).get("summary") or {}
    if h:
        lines.append("hvp: " + "; ".join(
            f"{op} {v['median_s']:.4f} s ({_fmt_x(v.get('x_backward_time'))} time, {_fmt_x(v.get('x_backward_memory'))} mem)"
            if isinstance(v, dict) else f"{op} {v}" for op, v in h.items()))
    return lines


def step_table(report: dict[str, Any]) -> str:
    rows = ["| step | status | seconds | cap s | estimate s |", "|---|---|---:|---:|---:|"]
    for s in report["steps"]:
        rows.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | {s['cap_s']:.0f} | {s['estimate_s']:.0f} |")
    rows.append(f"| **total** | | {report['wall_s']:.0f} | {report['budget_s']:.0f} (budget) | "
                f"{sum(s['estimate_s'] for s in report['steps']):.0f} |")
    return "\n".join(rows)


def render_markdown(report: dict[str, Any]) -> str:
    title = "dry run on CPU (tiny sizes)" if report["dry_run"] else report["device"]
    lines = [f"# make gpu-check: {title}", "",
             f"{report['date_utc']}, commit {report.get('git_commit')}; {report['wall_s']:.0f} s of a "
             f"{report['budget_s']:.0f} s budget.", "", step_table(report), "", "## Key figures", ""]
    lines += [f"- {line}" if not line.startswith("  ") else f"  - {line.strip()}" for line in key_figures(report)]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in report.get("result_files", [])), ""]
    for s in report["steps"]:
        if s.get("log_tail"):
            lines += [f"## Tail of the {s['name']} log ({s['status']})", "", "```", s["log_tail"], "```", ""]
    return "\n".join(lines)


def finish(ctx: Context, records: list[dict[str, Any]]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "gpu_check": SCHEMA_VERSION,
        "dry_run": ctx.dry_run,
        "device": ctx.device,
        "date_utc": _now(),
        "git_commit": _git_commit(),
        "budget_s": ctx.budget_s,
        "wall_s": round(time.time() - ctx.t0, 1),
        "results_dir": str(ctx.results_dir),
        "out_dir": str(ctx.out) if ctx.out else None,
        "extension_disabled": ctx.disable_extension,
        "steps": records,
    }
    info = next((r.get("summary") for r in records if r["name"] == "info"), None) or {}
    report["environment"] = info
    # this run's result files (older *_cuda files of the repo are not this run's: mtime filter)
    produced = sorted(p for p in ctx.results_dir.glob(f"*_{ctx.suffix}.*")
                      if p.is_file() and p.stat().st_mtime >= ctx.t0 - 1 and not p.name.startswith("gpu_check_"))
    report["result_files"] = [p.name for p in produced] + [f"gpu_check_{ctx.suffix}.json", f"gpu_check_{ctx.suffix}.md"]
    json_path = ctx.results_dir / f"gpu_check_{ctx.suffix}.json"
    md_path = ctx.results_dir / f"gpu_check_{ctx.suffix}.md"
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    # one log with everything: the driver's lines, then every step's full log
    full_log = ctx.work / "gpu_check.log"
    with open(full_log, "w") as fh:
        fh.write("\n".join(ctx.log_lines) + "\n")
        for r in records:
            if r.get("log"):
                fh.write(f"\n\n{'=' * 30} {r['name']} ({r['status']}) {'=' * 30}\n")
                fh.write((ctx.work / r["log"]).read_text(errors="replace"))
    # the tarball: results of this run, logs, junit XML, info/extension JSON, extension build logs
    bundle = ctx.work / "bundle"
    (bundle / "results").mkdir(parents=True, exist_ok=True)
    for p in produced + [json_path, md_path]:
        shutil.copy2(p, bundle / "results" / p.name)
    for p in ctx.work.iterdir():
        if p.is_file():
            shutil.copy2(p, bundle / p.name)
    if (ctx.work / "logs").is_dir():
        shutil.copytree(ctx.work / "logs", bundle / "logs", dirs_exist_ok=True)
    build_dir = (_load_json(ctx.work / "extension.json") or {}).get("build_directory")
    if build_dir and Path(build_dir).is_dir():
        for p in Path(build_dir).glob("*.log"):
            (bundle / "extension_build").mkdir(exist_ok=True)
            shutil.copy2(p, bundle / "extension_build" / p.name)
    tar_path = ctx.work / "gpu_check_results.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(bundle, arcname=f"gpu_check_{ctx.suffix}")
    report["tarball"] = str(tar_path)
    if ctx.out is not None:
        ctx.out.mkdir(parents=True, exist_ok=True)
        limit = int(os.environ.get("GPU_CHECK_OUT_MAX_FILES", "8"))
        sources = {"gpu_check_results.tar.gz": tar_path, "gpu_check.log": full_log}
        copied = []
        for pattern in LOOSE_FILES:
            name = pattern.format(s=ctx.suffix)
            src = sources.get(name, ctx.results_dir / name)
            if len(copied) >= limit:
                break
            if src.is_file() and (src in (tar_path, full_log, json_path, md_path) or src in produced):
                shutil.copy2(src, ctx.out / name)
                copied.append(name)
        report["copied_to_out"] = copied
        if "gpu_check_results.tar.gz" in copied:
            report["tarball"] = str(ctx.out / "gpu_check_results.tar.gz")
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if ctx.out is not None and (ctx.out / json_path.name).is_file():
        shutil.copy2(json_path, ctx.out / json_path.name)
    if ctx.out is not None and "gpu_check_results.tar.gz" in report.get("copied_to_out", []) \
            and not str(ctx.results_dir).startswith(str(ctx.work)):
        shutil.rmtree(ctx.work, ignore_errors=True)  # all of it is in the tarball there
    return report


def print_summary(report: dict[str, Any]) -> None:
    """The compact end of stdout (the device tool returns only the last 12,000 characters)."""
    tails = [s for s in report["steps"] if s.get("log_tail")]
    budget = 3500
    for s in tails:
        text = s["log_tail"][-max(budget // max(len(tails), 1), 400):]
        print(f"\n--- tail of the {s['name']} log ({s['status']}) ---\n{text}")
    print("\n" + "=" * 100)
    print(f"make gpu-check summary ({'DRY RUN, CPU, tiny sizes' if report['dry_run'] else report['device']}; "
          f"{report['wall_s']:.0f} s of {report['budget_s']:.0f} s)")
    text = "\n".join(key_figures(report))
    print(text[:6000] + ("\n[... cut: see gpu_check_*.md]" if len(text) > 6000 else ""))
    print()
    print(step_table(report))
    skipped = [s["name"] for s in report["steps"] if s["status"] == "skipped (time)"]
    if skipped:
        print(f"SKIPPED (time): {', '.join(skipped)} -- the budget ran out; everything before is kept")
    print(f"summary: {report['results_dir']}/gpu_check_{'cpu' if report['device'] == 'cpu' else 'cuda'}.json; "
          f"everything: {report['tarball']}" + (f"; copied to {report['out_dir']}: {', '.join(report['copied_to_out'])}"
                                                if report.get("out_dir") else ""))


# =========================================================================== driver
def run(argv=None) -> int:
    dry_run = _env_flag("GPU_CHECK_DRY_RUN")
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "240" if dry_run else "540"))
    out_env = os.environ.get("GPU_CHECK_OUT")
    out = Path(out_env).resolve() if out_env else None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if dry_run:
        results_dir = (out / "results") if out else work / "results"
        device = "cpu"
    else:
        results_dir = RESULTS_DIR
        device = "cuda"
    t0 = time.time()
    ctx = Context(dry_run=dry_run, device=device, suffix=device, results_dir=results_dir, work=work, out=out,
                  python=sys.executable, budget_s=budget, t0=t0, deadline=t0 + budget,
                  # dry run (CI): no process compiles the extension (minutes on 2 cores) unless asked to
                  disable_extension=dry_run and not _env_flag("GPU_CHECK_DRY_RUN_EXTENSION"))
    ctx.log(f"{'DRY RUN (CPU, tiny sizes)' if dry_run else 'GPU check'}: budget {budget:.0f} s; "
            f"python {sys.executable}; work folder {work}; results -> {results_dir}"
            + (f"; copies -> {out}" if out else ""))
    only = [s for s in os.environ.get("GPU_CHECK_STEPS", "").split(",") if s]
    records = []
    for index, step in enumerate(make_steps(dry_run)):
        if only and step.name not in only:
            continue
        if not dry_run and step.name != "info" and not _cuda_ok(records):
            ctx.results_dir = work / "results"  # nothing measured: bench/results stays as it is
            records.append({"name": step.name, "status": "skipped (no CUDA)", "seconds": 0.0, "cap_s": step.cap_s,
                            "estimate_s": step.estimate_s, "min_s": step.min_s})
            ctx.log(f"{step.name}: SKIPPED: torch.cuda.is_available() is False here (GPU_CHECK_DRY_RUN=1 runs on CPU)")
            continue
        try:
            record = run_step(ctx, step, index)
        except Exception as exc:  # noqa: BLE001 - the driver itself failed on this step: recorded, go on
            import traceback

            record = {"name": step.name, "status": "failed", "seconds": 0.0, "cap_s": step.cap_s,
                      "estimate_s": step.estimate_s, "min_s": step.min_s,
                      "log_tail": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-1500:]}
            ctx.log(f"{step.name}: FAILED in the driver: {type(exc).__name__}: {exc}")
        records.append(record)
        if step.name == "extension" and record["status"] != "ok" and not dry_run:
            ctx.disable_extension = True
            ctx.log("extension: not usable: the later steps run with FASTMETA_DISABLE_EXTENSION=1 "
                    "(PyTorch twins; no process spends time rebuilding it)")
    try:
        report = finish(ctx, records)
    except Exception:  # noqa: BLE001 - never end without saying what ran
        import traceback

        traceback.print_exc()
        print(json.dumps([{k: r.get(k) for k in ("name", "status", "seconds", "summary")} for r in records],
                         indent=1, default=str)[-8000:])
        return 1
    print_summary(report)
    bad = [r for r in records if r["status"] in ("failed", "timeout", "skipped (no CUDA)")]
    return 1 if bad else 0


def _cuda_ok(records: list[dict[str, Any]]) -> bool:
    """False only when the info step saw no CUDA (unknown -> True: the steps then say what is wrong)."""
    info = next((r.get("summary") for r in records if r["name"] == "info"), None) or {}
    return info.get("cuda_available") is not False


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--info"]:
        return info_main(args[1])
    if args[:1] == ["--vendor-peers"]:
        vendor_peers(Path(args[1]).resolve() if len(args) > 1 else PEERS_DIR)
        return 0
    if args[:1] == ["--extension"]:
        device = args[args.index("--device") + 1] if "--device" in args else "cpu"
        return extension_main(args[1], device)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
