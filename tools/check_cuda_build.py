"""``make check-cuda-build``: build what the GPU machines build, on a CPU machine.

Run by ``tools/check_cuda_build.sh`` in ``.venv-cuda`` (the GPU machines' torch
and triton: torch 2.11.0+cu130, triton 3.6.0) with ``CUDA_HOME``/``CUDA_PATH``
unset, ``TORCH_CUDA_ARCH_LIST=9.0`` and a build cache of its own:

1. the full C++/CUDA extension, through fastmeta's own build path
   (``fastmeta._extension.build_extension(with_cuda=True)``: the toolkit
   detection and ``_build`` that ``load_extension`` uses), then every op that
   ``csrc/`` defines must have a CUDA and a CPU kernel registered;
2. every Triton launch configuration (``fastmeta.kernels.launch_configs``)
   compiled to an sm_90 cubin.

The last line is ``check-cuda-build: OK ...``; any failure exits non-zero
with ``check-cuda-build: FAIL ...``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "check-cuda-build:"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def fail(message: str) -> "None":
    print(f"{PREFIX} FAIL {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def defined_ops(csrc: Path) -> list:
    """The op names ``TORCH_LIBRARY(fastmeta, m)`` defines (``m.def("name(...``)."""
    names = []
    for source in sorted(csrc.glob("*.cpp")):
        names += re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)\s*\(', source.read_text())
    return names


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"? ({exc})"
    match = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "?"


def check_extension(arch_list: str):
    import torch

    from fastmeta import _extension

    toolkit = _extension.cuda_toolkit()
    if not toolkit.found:
        fail(toolkit.describe())
    say(f"CUDA toolkit {toolkit.describe()}")
    start = time.perf_counter()
    try:
        status = _extension.build_extension(with_cuda=True)
    except RuntimeError as exc:
        fail(f"the CUDA extension did not build: {exc}")
    seconds = time.perf_counter() - start
    if not (status.cuda and status.cpu and _extension.load_extension() and _extension.extension_available("cuda")):
        fail(f"the extension built but does not report CUDA: {status}")
    root = _extension.sources_directory()
    ops = defined_ops(root)
    if not ops:
        fail(f"no ops found in {root}/*.cpp (m.def(...))")
    missing = [
        f"{op} ({key})"
        for op in ops
        for key in ("CUDA", "CPU")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmeta::{op}", key)
    ]
    if missing:
        fail(f"ops without a kernel: {', '.join(missing)}")
    say(
        f"extension built (or up to date) for CUDA (TORCH_CUDA_ARCH_LIST={arch_list}) in {seconds:.1f} s "
        f"[{status.build_directory}]; {len(ops)} ops registered for CUDA and CPU: {', '.join(ops)}"
    )
    return ops, toolkit


def check_triton(arch: int, jobs: int, subset: str):
    from fastmeta.kernels import launch_configs

    start = time.perf_counter()
    configs = launch_configs.configurations(subset)
    say(f"{len(configs)} Triton launch configurations ({subset}); compiling to sm_{arch} with {jobs} processes")
    done = []
    step = max(1, len(configs) // 10)

    def progress(config, size, seconds, error):
        done.append(error is None)
        if error:
            print(f"{PREFIX} FAIL {config.label()}\n    {error}", file=sys.stderr, flush=True)
        if len(done) % step == 0 or len(done) == len(configs):
            say(f"  {len(done)}/{len(configs)} compiled ({time.perf_counter() - start:.0f} s)")

    results = launch_configs.compile_configurations(configs, arch=arch, jobs=jobs, on_result=progress)
    failed = [config for config, _, _, error in results if error]
    total = sum(seconds for _, _, seconds, _ in results)
    if failed:
        fail(f"{len(failed)}/{len(results)} Triton kernel configurations did not compile to sm_{arch} (above)")
    say(
        f"{len(results)} Triton configurations compiled in {time.perf_counter() - start:.0f} s "
        f"({total:.0f} s of compiler time; cubins {min(r[1] for r in results)}-{max(r[1] for r in results)} bytes)"
    )
    return len(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="Triton compile processes")
    parser.add_argument("--subset", default="full", help="Triton configurations: full (default), flags, shapes, ci")
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        fail("TRITON_INTERPRET is set: unset it (the kernels must be compiled, not interpreted)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        fail("set TORCH_CUDA_ARCH_LIST (e.g. 9.0): there is no GPU to ask")
    import torch
    import triton

    if torch.version.cuda is None:
        fail(f"torch {torch.__version__} is a CPU-only build; this check needs the CUDA wheel")
    say(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"python {sys.version.split()[0]}; CUDA_HOME={os.environ.get('CUDA_HOME', '(unset)')}, "
        f"GPU visible: {torch.cuda.is_available()}"
    )
    ops, toolkit = check_extension(arch_list)
    count = check_triton(args.arch, args.jobs, args.subset)
    say(f"done in {time.perf_counter() - wall:.0f} s")
    say(
        f"OK {len(ops)} ops registered for CUDA, {count}/{count} Triton kernel configurations -> sm_{args.arch} "
        f"cubin, torch {torch.__version__}, triton {triton.__version__}, nvcc {nvcc_version(toolkit.nvcc)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
