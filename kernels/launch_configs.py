"""The Triton launch configurations of fastmeta's kernels on CUDA, and a compiler for them.

A *launch configuration* is what Triton compiles one binary for: the kernel, the
type of every argument (``*bf16``, ``i32``, ``i64``, ``fp32``, ...), the
``constexpr`` values (``KIND``, ``HAS_MASK``, ``NEED_*``, ``BLOCK_V``, and the
integers equal to 1, which Triton turns into constants), the arguments it marks
divisible by 16, and ``num_warps``.

The configurations are not written down by hand: :func:`launch` runs the real
launchers (``kd_loss_forward``, ``kd_loss_backward``, ``kd_second_order``) on
``meta`` tensors with their kernels swapped for recorders and ``block_size``
pinned to its CUDA behaviour, and turns each recorded launch into a
:class:`LaunchConfig` with Triton's own argument specialization.  So the list
follows the launchers (kinds from ``KIND_IDS``, ``reverse_kl`` mapped onto
``kl`` with swapped roles, block sizes from ``block_size``, warps from
``num_warps_for``, the mask/NEED arguments they pass) and cannot drift.

What :func:`configurations` enumerates (``"full"``; ``make check-cuda-build``
compiles all of it, ``tests/test_kernel_compile.py`` the ``"ci"`` subset):

* the flag grid: every launcher x kind x mask x NEED combination the API can
  produce (backward: student and/or teacher gradients; second order:
  cotangent and/or influence) x logits dtype (fp32/bf16/fp16; the tangent in
  the logits' dtype, and fp32/fp64 tangents with half-precision/fp32 logits),
  at V=32000 (BLOCK_V=4096, 8 warps, i32 strides divisible by 16) and at V=2
  (BLOCK_V=16, 4 warps; the GLUE shape);
* the shape sweep, for every launcher x kind: every BLOCK_V that
  ``block_size`` returns on CUDA (16 ... 4096) with its ``num_warps_for``,
  each with V divisible by 16 and not; V=1 (V and the strides become the
  constant 1); and, at BLOCK_V=4096, padded rows (stride divisible by 16, V
  not), vocabulary-sliced rows (V divisible by 16, stride not), i64 strides
  (divisible and not) and logits not 16-byte aligned.

Coverage, as ``tests/test_kernel_compile.py`` checks it for real calls: every
launch's flags (:meth:`LaunchConfig.flags_key`) are in the flag grid and its
shape (:meth:`LaunchConfig.shape_key`: BLOCK_V, warps, integer specializations)
in the shape sweep; the full cross product (~4000 binaries) is not compiled.

:func:`compile_configuration` compiles one configuration to a cubin for an
NVIDIA target (sm_90 by default) without a GPU: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``, Triton's bundled ptxas included.  It needs
the real ``@triton.jit`` kernels, so run it in a process without
``TRITON_INTERPRET``: ``python -m fastmeta.kernels.launch_configs --subset ci``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import itertools
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from . import kd_loss as _kd_loss
from . import kd_second_order as _kd_second_order

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAUNCHERS = ("kd_loss_forward", "kd_loss_backward", "kd_second_order")
# (module, attribute) of the @triton.jit kernels the launchers call
KERNELS = {
    "_kd_loss_forward_kernel": _kd_loss,
    "_kd_loss_backward_kernel": _kd_loss,
    "_kd_second_order_kernel": _kd_second_order,
}
# the shapes of the flag grid: an LM vocabulary (BLOCK_V=4096, 8 warps) and GLUE's 2 classes
FLAG_GRID_VOCABS = (32000, 2)
_CUDA = torch.device("cuda")
_N_ROWS = 2
_I64_STRIDE = 2**31 + 16
# fp32 statistics, scales and outputs of every launch: left out of labels
_ALWAYS_FP32 = {"loss_ptr", "stats_ptr", "grad_rows_ptr", "w_ptr", "inv_tau", "k2", "loss_scale", "grad_scale",
                "c_scale", "w_scale"}


def _kinds(launcher: str) -> Tuple[str, ...]:
    module = _kd_second_order if launcher == "kd_second_order" else _kd_loss
    return tuple(module.KIND_IDS)


def block_sizes() -> Tuple[int, ...]:
    """Every BLOCK_V ``block_size`` picks on CUDA, from the helper itself."""
    vocabs = {1, 2**31 - 1} | {2**k + d for k in range(1, 31) for d in (-1, 0, 1)}
    return tuple(sorted({_kd_loss.block_size(v, _CUDA) for v in vocabs}))


def _need_options(launcher: str) -> Tuple[Tuple[bool, bool], ...]:
    """The (student, teacher) / (cotangent, influence) requests a launch can have:
    at least one (the launchers return before launching when neither is asked for)."""
    if launcher == "kd_loss_forward":
        return ((True, True),)
    return ((True, False), (False, True), (True, True))


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of a launcher: what its caller chooses."""

    launcher: str
    kind: str
    dtype: torch.dtype = torch.bfloat16  # logits (student and teacher share it)
    has_mask: bool = False
    need: Tuple[bool, bool] = (True, True)  # backward: (student, teacher); second order: (cotangent, influence)
    vocab: int = 32000
    row_stride: Optional[int] = None  # inputs' row stride (None: contiguous rows)
    offset: int = 0  # inputs' storage offset in elements (1: not 16-byte aligned)
    u_dtype: Optional[torch.dtype] = None  # second order: the tangent's dtype (None: the logits')


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """What Triton compiles one binary for (see the module docstring)."""

    kernel: str  # attribute name in KERNELS
    signature: Tuple[Tuple[str, str], ...]  # every parameter: (name, Triton type or "constexpr")
    constants: Tuple[Tuple[str, Any], ...]  # constexpr parameters and their values
    divisible_by_16: Tuple[str, ...]  # parameters Triton marks tt.divisibility=16
    num_warps: int
    ones: Tuple[str, ...] = ()  # integer parameters equal to 1 (Triton makes them constants)

    def flags_key(self) -> tuple:
        """Kernel, KIND/HAS_MASK/NEED_* and argument dtypes (no shapes)."""
        constants = tuple((k, v) for k, v in self.constants if k not in self.ones and k != "BLOCK_V")
        pointers = tuple((k, t) for k, t in self.signature if t.startswith("*"))
        return (self.kernel, constants, pointers)

    def shape_key(self) -> tuple:
        """Kernel, KIND, BLOCK_V, warps and the integer arguments' specialization."""
        constants = dict(self.constants)
        ints = tuple(
            (k, t, constants.get(k), k in self.divisible_by_16)
            for k, t in self.signature
            if t in ("i32", "i64") or k in self.ones
        )
        return (self.kernel, constants["KIND"], constants["BLOCK_V"], self.num_warps, ints)

    def label(self) -> str:
        flags = " ".join(
            f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constants if k not in self.ones
        )
        parts = []
        for name, typ in self.signature:
            if (typ == "constexpr" and name not in self.ones) or name in _ALWAYS_FP32:
                continue
            if name in self.ones:
                typ = "=1"
            elif name in self.divisible_by_16:
                typ += "/16"
            parts.append(f"{name.replace('_ptr', '')}:{typ}")
        return f"{self.kernel.strip('_')} {flags} warps={self.num_warps} " + " ".join(parts)


# ----------------------------------------------------------------------------- recording launches
class _Recorder:
    def __init__(self, name: str, kernel, calls: list):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    """Swap the launchers' kernels for recorders and pin ``block_size`` to CUDA's."""
    calls: list = []
    saved = []
    real_block_size = _kd_loss.block_size

    def cuda_block_size(vocab, device):
        return real_block_size(vocab, _CUDA)

    try:
        for name, module in KERNELS.items():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(name, getattr(module, name), calls))
        for module in (_kd_loss, _kd_second_order):
            saved.append((module, "block_size", module.block_size))
            module.block_size = cuda_block_size
        yield calls
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _specializer():
    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # pragma: no cover - triton < 3.5: Triton's rule, restated
        native_specialize_impl = None
    try:
        from triton.backends.nvidia.compiler import CUDABackend as backend
    except Exception:  # pragma: no cover
        from triton.backends.compiler import BaseBackend as backend

    def specialize(value) -> Tuple[str, Any]:
        if native_specialize_impl is not None:
            return native_specialize_impl(backend, value, False, True, True)
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", 1
            typ = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            return typ, "D" if value % 16 == 0 else ""
        if isinstance(value, float):
            return "fp32", None
        if hasattr(value, "data_ptr"):
            from triton.runtime.jit import mangle_type

            return mangle_type(value), "D" if value.data_ptr() % 16 == 0 else ""
        raise TypeError(f"cannot specialize {type(value).__name__}")

    return specialize


def config_of_launch(name: str, kernel, args: Sequence, kwargs: Dict[str, Any]) -> LaunchConfig:
    """The :class:`LaunchConfig` Triton compiles for ``kernel[grid](*args, **kwargs)``."""
    fn = getattr(kernel, "fn", kernel)  # JITFunction / InterpretedFunction -> the Python function
    params = inspect.signature(fn).parameters
    names = list(params)
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{name}: launch without {missing}")
    specialize = _specializer()
    signature, constants, divisible, ones = [], [], [], []
    for param in names:
        value = bound[param]
        if "constexpr" in str(params[param].annotation):
            signature.append((param, "constexpr"))
            constants.append((param, value))
            continue
        typ, key = specialize(value)
        signature.append((param, typ))
        if typ == "constexpr":
            constants.append((param, key))
            ones.append(param)
        elif isinstance(key, str) and "D" in key:
            divisible.append(param)
    return LaunchConfig(
        kernel=name,
        signature=tuple(signature),
        constants=tuple(constants),
        divisible_by_16=tuple(divisible),
        num_warps=int(kwargs.get("num_warps", 4)),
        ones=tuple(ones),
    )


def _rows(scenario: Scenario, dtype: torch.dtype) -> torch.Tensor:
    v = scenario.vocab
    stride = scenario.row_stride or v
    storage = torch.empty(scenario.offset + stride * (_N_ROWS - 1) + v, dtype=dtype, device="meta")
    return torch.as_strided(storage, (_N_ROWS, v), (stride, 1), scenario.offset)


def launch(scenario: Scenario, block_v: Optional[int] = None, num_warps: Optional[int] = None) -> List[LaunchConfig]:
    """Run ``scenario``'s launcher on meta tensors; the configurations it launches.

    ``block_v`` / ``num_warps``: passed to the launcher (None: its defaults, the
    configurations the API launches); other values are the candidates that
    ``bench.kernels --sweep`` times (:func:`sweep_configurations`)."""
    zs = _rows(scenario, scenario.dtype)
    zt = _rows(scenario, scenario.dtype)
    mask = torch.ones(_N_ROWS, dtype=torch.bool, device="meta") if scenario.has_mask else None
    config = {k: v for k, v in (("block_v", block_v), ("num_warps", num_warps)) if v is not None}
    with _recording() as calls:
        if scenario.launcher == "kd_loss_forward":
            _kd_loss.kd_loss_forward(zs, zt, mask, 2.0, scenario.kind, **config)
        elif scenario.launcher == "kd_loss_backward":
            grad_rows = torch.empty(_N_ROWS, dtype=torch.float32, device="meta")
            stats = torch.empty(_N_ROWS, _kd_loss.STATS_PER_ROW, dtype=torch.float32, device="meta")
            _kd_loss.kd_loss_backward(
                grad_rows, zs, zt, stats, mask, 2.0, scenario.kind,
                need_student=scenario.need[0], need_teacher=scenario.need[1], **config,
            )
        elif scenario.launcher == "kd_second_order":
            u = _rows(scenario, scenario.u_dtype or scenario.dtype)
            _kd_second_order.kd_second_order(
                zs, zt, u, mask, 2.0, scenario.kind,
                need_cotangent=scenario.need[0], need_influence=scenario.need[1], **config,
            )
        else:
            raise ValueError(f"unknown launcher {scenario.launcher!r}")
    return [config_of_launch(name, kernel, args, kwargs) for name, kernel, args, kwargs in calls]


# ----------------------------------------------------------------------------- the enumeration
def _u_dtypes(dtype: torch.dtype) -> Tuple[Optional[torch.dtype], ...]:
    # the tangent u = J_S v comes in the logits' dtype from fastmeta's engine; the public
    # functions pass any floating tangent through as it is: fp32 with half logits, fp64 with fp32
    return (None, torch.float32) if dtype != torch.float32 else (None, torch.float64)


def flag_grid_scenarios() -> List[Scenario]:
    out = []
    for vocab in FLAG_GRID_VOCABS:
        for launcher in LAUNCHERS:
            for kind, dtype, has_mask, need in itertools.product(
                _kinds(launcher), LOGITS_DTYPES, (False, True), _need_options(launcher)
            ):
                u_dtypes = _u_dtypes(dtype) if launcher == "kd_second_order" else (None,)
                for u_dtype in u_dtypes:
                    out.append(Scenario(launcher, kind, dtype, has_mask, need, vocab, u_dtype=u_dtype))
    return out


def shape_sweep_scenarios() -> List[Scenario]:
    out = []
    blocks = block_sizes()
    biggest = blocks[-1]
    for launcher in LAUNCHERS:
        for kind in _kinds(launcher):
            base = dict(launcher=launcher, kind=kind, dtype=torch.bfloat16, has_mask=True)
            vocabs = [1]
            for block in blocks:
                # V divisible by 16 and not, each landing on this block
                vocabs += [block, block - 1] if block > 16 else [16, 15]
            vocabs += [50257, 32001]  # above the cap: several blocks per row
            for vocab in vocabs:
                out.append(Scenario(vocab=vocab, **base))
            big = max(biggest * 8, 32000)
            out += [
                Scenario(vocab=big + 1, row_stride=big + 64, **base),  # padded rows
                Scenario(vocab=big, row_stride=big + 1, **base),  # vocabulary slice
                Scenario(vocab=big, row_stride=_I64_STRIDE, **base),  # i64 strides
                Scenario(vocab=big + 1, row_stride=_I64_STRIDE + 1, **base),
                Scenario(vocab=big, offset=1, **base),  # logits not 16-byte aligned
            ]
    return out


def ci_scenarios() -> List[Scenario]:
    """A CI-sized subset: every launcher x kind with 8 warps, BLOCK_V=4096, i32 strides,
    a mask and every output; plus the smallest block (V=2, 4 warps), V=1 and i64 strides."""
    out = []
    for launcher in LAUNCHERS:
        for kind in _kinds(launcher):
            out.append(Scenario(launcher, kind, torch.bfloat16, True, (True, True), 32000))
    out += [
        Scenario("kd_second_order", "softmax_mse", torch.float16, False, (True, False), 2, u_dtype=torch.float32),
        Scenario("kd_loss_backward", "reverse_kl", torch.float32, False, (True, False), 2),
        Scenario("kd_loss_forward", "kl", torch.float32, True, (True, True), 1),
        Scenario("kd_loss_backward", "kl", torch.bfloat16, True, (False, True), 32000, row_stride=_I64_STRIDE),
    ]
    return out


SUBSETS: Dict[str, Callable[[], List[Scenario]]] = {
    "full": lambda: flag_grid_scenarios() + shape_sweep_scenarios(),
    "flags": flag_grid_scenarios,
    "shapes": shape_sweep_scenarios,
    "ci": ci_scenarios,
}


def configurations(subset: str = "full") -> List[LaunchConfig]:
    """The distinct launch configurations of ``subset`` (see :data:`SUBSETS`), in order."""
    seen: Dict[LaunchConfig, None] = {}
    for scenario in SUBSETS[subset]():
        for config in launch(scenario):
            seen.setdefault(config, None)
    return list(seen)


def sweep_configurations(sweep: Sequence[Tuple[int, int]], dtype: torch.dtype = torch.bfloat16,
                         kind: str = "kl", vocabs: Sequence[int] = (32000, 128256)) -> List[LaunchConfig]:
    """The forward and backward (both gradients) launches of ``bench.kernels --sweep``: each
    ``(BLOCK_V, num_warps)`` of ``sweep`` at the benchmark's vocabularies, distinct."""
    seen: Dict[LaunchConfig, None] = {}
    for (block, warps), vocab, launcher in itertools.product(sweep, vocabs, ("kd_loss_forward", "kd_loss_backward")):
        for config in launch(Scenario(launcher, kind, dtype=dtype, vocab=vocab), block, warps):
            seen.setdefault(config, None)
    return list(seen)


def uncovered(launched: Iterable[LaunchConfig], compiled: Optional[Sequence[LaunchConfig]] = None) -> List[str]:
    """Launches whose flags or shape no configuration of ``compiled`` (default: "full") has."""
    compiled = configurations("full") if compiled is None else compiled
    flags = {c.flags_key() for c in compiled}
    shapes = {c.shape_key() for c in compiled}
    problems = []
    for config in launched:
        if config.flags_key() not in flags:
            problems.append(f"flags not compiled: {config.label()}")
        if config.shape_key() not in shapes:
            problems.append(f"shape not compiled: {config.label()}")
    return problems


# ----------------------------------------------------------------------------- compiling
def _jit_kernel(name: str):
    kernel = getattr(KERNELS[name], name)
    if not hasattr(kernel, "arg_names") or type(kernel).__name__ != "JITFunction":
        raise RuntimeError(
            f"{name} is a {type(kernel).__name__}, not a JITFunction: compile in a process without "
            "TRITON_INTERPRET"
        )
    return kernel


def compiled_configuration(config: LaunchConfig, arch: int = 90):
    """Triton's compiled kernel of ``config`` for ``sm_<arch>`` (no GPU needed): its ``asm`` holds
    ``ttir`` ... ``ptx`` and ``cubin`` (``bench.kernel_sass`` disassembles the cubin).  Raises on any
    compiler error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import CUDABackend

        divisible = CUDABackend.parse_attr("D")
    except Exception:  # pragma: no cover
        divisible = [["tt.divisibility", 16]]
    kernel = _jit_kernel(config.kernel)
    attrs = {(kernel.arg_names.index(name),): divisible for name in config.divisible_by_16}
    source = ASTSource(fn=kernel, signature=dict(config.signature), constexprs=dict(config.constants), attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})


def compile_configuration(config: LaunchConfig, arch: int = 90) -> Tuple[int, float]:
    """Compile ``config`` for ``sm_<arch>`` (no GPU needed); ``(cubin bytes, seconds)``.

    Raises on any compiler error, or when no cubin comes out.
    """
    start = time.perf_counter()
    compiled = compiled_configuration(config, arch)
    seconds = time.perf_counter() - start
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError(f"no cubin for {config.label()} (stages: {sorted(compiled.asm)})")
    return len(cubin), seconds


def _compile_one(args):
    config, arch = args
    try:
        size, seconds = compile_configuration(config, arch)
        return config, size, seconds, None
    except Exception as exc:  # noqa: BLE001 - reported per configuration
        message = str(exc).strip().splitlines()
        return config, 0, 0.0, f"{type(exc).__name__}: {' | '.join(message[-12:])[:3000]}"


def _init_worker(env: Dict[str, str]) -> None:
    os.environ.update(env)


def compile_configurations(
    configs: Sequence[LaunchConfig],
    arch: int = 90,
    jobs: int = 1,
    cache_dir: Optional[str] = None,
    on_result: Optional[Callable[[LaunchConfig, int, float, Optional[str]], None]] = None,
) -> List[Tuple[LaunchConfig, int, float, Optional[str]]]:
    """Compile every configuration (``jobs`` processes); ``(config, cubin bytes, s, error)`` each.

    Triton's cache goes to ``cache_dir`` (default: a fresh temporary directory, so
    everything is really compiled).  Needs a process without ``TRITON_INTERPRET``.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it")
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastmeta-triton-"))
        env = {"TRITON_CACHE_DIR": cache_dir, "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
        saved = {k: os.environ.get(k) for k in env}
        results = []
        work = [(config, arch) for config in configs]
        try:
            if jobs <= 1:
                _init_worker(env)
                for item in work:
                    results.append(_compile_one(item))
                    if on_result:
                        on_result(*results[-1])
            else:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                         initargs=(env,)) as pool:
                    for result in pool.map(_compile_one, work, chunksize=1):
                        results.append(result)
                        if on_result:
                            on_result(*result)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmeta.kernels.launch_configs",
        description="Compile fastmeta's Triton kernels in their CUDA launch configurations to cubins (no GPU needed).",
    )
    parser.add_argument("--subset", choices=sorted(SUBSETS), default="full")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--list", action="store_true", help="print the configurations, compile nothing")
    args = parser.parse_args(argv)
    configs = configurations(args.subset)
    if args.list:
        for config in configs:
            print(config.label())
        print(f"{len(configs)} configurations")
        return 0
    import triton

    start = time.perf_counter()
    results = compile_configurations(configs, args.arch, args.jobs)
    failed = [(c, e) for c, _, _, e in results if e]
    for config, error in failed:
        print(f"FAIL {config.label()}\n     {error}", file=sys.stderr)
    print(
        f"{len(results) - len(failed)}/{len(results)} Triton kernel configurations -> sm_{args.arch} cubin "
        f"(triton {triton.__version__}, {time.perf_counter() - start:.1f} s, {args.jobs} jobs)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
