"""GPU benchmark of the fused KD-loss kernels: ``python -m bench.kernels``.

For each size (rows x vocabulary; default 8192x32000 and 4096x128256), dtype
(bf16, fp32) and implementation it times three modes:

* ``fwd``: the loss alone (no autograd graph);
* ``bwd``: the backward alone (one forward graph kept, ``torch.autograd.grad(...,
  retain_graph=True)`` timed, gradients w.r.t. BOTH logits: the teacher is trained);
* ``fwd+bwd``: forward then backward.

Implementations:

* ``fastmeta``: ``fastmeta.kd_loss`` (Triton kernels on CUDA);
* ``eager``: plain PyTorch, ``τ²·F.kl_div(log_softmax(zs/τ), log_softmax(zt/τ), log_target=True, reduction="batchmean")``;
* ``compile``: the same function under ``torch.compile`` (default inductor backend);
* ``--sweep 4096x8,8192x16,...``: the fastmeta kernels in other launch configurations
  (``BLOCK_V`` x ``num_warps``; the default is ``block_size``/``num_warps_for``), one row
  ``kernels BLOCK_VxWARPS`` each: the forward and backward launchers called directly
  (``kd_loss_forward``/``kd_loss_backward`` under a minimal autograd.Function, batchmean;
  no custom-op dispatch, no argument checks; list the default configuration too for a
  like-for-like row).  Each configuration's loss and gradients are first checked
  against the default configuration's (``max_rel_diff_vs_default`` in the row; a
  configuration whose loss differs by more than 1e-5 relative, or its gradients by more than
  two ulps of their dtype, is reported, not timed).
  It picks the configuration per dtype: a bf16 row moves half the bytes of an fp32 row
  per loop iteration at the same ``BLOCK_V``.

Timing: ``triton.testing.do_bench`` (warm-up then median, L2 flushed) when
available on CUDA, else CUDA events around each call after warm-up (median).
Achieved bandwidth counts the minimal traffic: fwd reads both logits (2·N·V
elements), bwd reads both and writes both gradients (4·N·V), fwd+bwd 6·N·V;
it is compared with the device's measured copy bandwidth (``dst.copy_(src)`` on
a 1 GiB buffer, read+write bytes / time).  Peak memory: the largest
``torch.cuda.max_memory_allocated`` during one fwd+bwd, minus what was allocated
before (the inputs).

Results go to ``bench/results/kernels_<device>.json`` and ``.md`` with device
and versions (``bench.common.environment_info``).

Without CUDA the script refuses (non-zero exit) unless ``--device cpu
--sizes tiny`` is given: a smoke run of the PyTorch paths (no Triton, no GPU
figures) used by the unit test of this script's plumbing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from bench.common import (
    RESULTS_DIR,
    copy_bandwidth,
    environment_info,
    resolve_deadline,
    markdown_table,
    median,
    require_device,
    time_calls,
    write_json,
)

SIZES = {
    "full": [(8192, 32000), (4096, 128256)],
    "tiny": [(8, 33), (4, 257)],
}
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
MODES = ("fwd", "bwd", "fwd+bwd")
BYTES_PER_MODE = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}  # x N·V·element size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (the benchmark) or cpu (smoke run of the plumbing, needs --sizes tiny)")
    p.add_argument("--sizes", default="full", choices=sorted(SIZES), help="size set")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32, fp16")
    p.add_argument("--kind", default="kl", choices=["kl", "reverse_kl", "softmax_mse", "logit_mse"])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--impls", default="fastmeta,eager,compile", help="comma list of fastmeta, eager, compile")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--deadline", type=float, default=None,
                   help="time.time() after which no new case starts (the rest is reported as skipped, "
                        "what ran is kept); torch.compile cases run last")
    p.add_argument("--time-budget-s", type=float, default=None, help="the same, relative to the start")
    p.add_argument("--sweep", default="", help="comma list of BLOCK_VxWARPS launch configurations of the "
                   "fastmeta kernels to time as well (e.g. 4096x8,8192x16; see the module docstring)")
    p.add_argument("--sweep-dtypes", default=None, help="dtypes of the --sweep rows (default: --dtypes)")
    args = p.parse_args(argv)
    try:
        args.sweep = parse_sweep(args.sweep)
    except ValueError as exc:
        p.error(f"--sweep: {exc}")
    args.sweep_dtypes = (args.sweep_dtypes or args.dtypes).split(",")
    for flag, names in (("--dtypes", args.dtypes.split(",")), ("--sweep-dtypes", args.sweep_dtypes)):
        for d in names:
            if d not in DTYPES:
                p.error(f"{flag}: unknown dtype {d!r} (choose from {sorted(DTYPES)})")
    for impl in args.impls.split(","):
        if impl not in ("fastmeta", "eager", "compile"):
            p.error(f"--impls: unknown implementation {impl!r}")
    if args.device == "cpu" and args.sizes != "tiny":
        p.error("--device cpu is a smoke run of the plumbing only: use it with --sizes tiny "
                "(the kernel benchmark needs a CUDA GPU)")
    return args


def parse_sweep(text: str) -> list[tuple[int, int]]:
    """``"4096x8,8192x16"`` -> ``[(4096, 8), (8192, 16)]`` (BLOCK_V a power of two >= 16, warps 1..32)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            block, warps = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"{item!r} is not BLOCK_VxWARPS (e.g. 8192x16)") from None
        if block < 16 or block & (block - 1):
            raise ValueError(f"{item!r}: BLOCK_V must be a power of two >= 16")
        if warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"{item!r}: warps must be one of 1, 2, 4, 8, 16, 32")
        out.append((block, warps))
    return out


def sweep_name(block: int, warps: int) -> str:
    return f"kernels {block}x{warps}"


def launched_kd_loss(kind: str, temperature: float, block: int, warps: int) -> Callable:
    """batchmean KD loss by the fastmeta launchers in one launch configuration (see ``--sweep``)."""
    import torch

    from fastmeta.kernels.kd_loss import kd_loss_backward, kd_loss_forward

    class Launched(torch.autograd.Function):
        @staticmethod
        def forward(ctx, zs, zt):
            loss, stats = kd_loss_forward(zs, zt, None, temperature, kind, True, block, warps)
            ctx.save_for_backward(zs, zt, stats)
            return loss.sum() / zs.shape[0]

        @staticmethod
        def backward(ctx, grad):
            zs, zt, stats = ctx.saved_tensors
            rows = (grad.float() / zs.shape[0]).expand(zs.shape[0])
            return kd_loss_backward(rows, zs, zt, stats, None, temperature, kind, True, True, True, block, warps)

    return Launched.apply


def check_against_default(fn: Callable, kind: str, temperature: float, rows: int, vocab: int, dtype,
                          device) -> dict[str, float]:
    """How far ``fn`` is from the default configuration, relative to the largest magnitude of each output:

    * ``loss``: ``fn``'s loss against the default configuration's (the same wrapper,
      :func:`launched_kd_loss`; fp32, so only the reduction order differs: ~1e-7);
    * ``loss_vs_public``: the default configuration's loss against ``fastmeta.kd_loss``'s (the public
      entry point on the Triton kernels, which returns the loss in the logits' dtype);
    * ``gradients``: both gradients, of ``fn`` against the default's and of the default's against the
      public entry point's (in the logits' dtype, where one rounding flip is an ulp: bf16 up to 2^-8
      of the largest entry).
    """
    import torch

    from fastmeta.kernels.kd_loss import block_size, num_warps_for
    from fastmeta.losses import kd_loss

    gen = torch.Generator(device=device).manual_seed(1)
    zs = torch.randn(rows, vocab, device=device, dtype=dtype, generator=gen).mul_(4).requires_grad_(True)
    zt = torch.randn(rows, vocab, device=device, dtype=dtype, generator=gen).mul_(4).requires_grad_(True)
    block = block_size(vocab, torch.device(device))
    default = launched_kd_loss(kind, temperature, block, num_warps_for(block))

    def public(a, b):
        return kd_loss(a, b, temperature, kind=kind, backend="triton", check_finite=False)

    outputs = {}
    for name, f in (("public", public), ("default", default), ("fn", fn)):
        loss = f(zs, zt)
        outputs[name] = (loss.detach(), *torch.autograd.grad(loss, (zs, zt)))

    def rel(got, ref):
        scale = ref.float().abs().max().clamp_min(1e-30)
        return float((got.float() - ref.float()).abs().max() / scale)

    pub, dflt, own = outputs["public"], outputs["default"], outputs["fn"]
    return {"loss": rel(own[0], dflt[0]), "loss_vs_public": rel(dflt[0], pub[0]),
            "gradients": max([rel(own[i], dflt[i]) for i in (1, 2)] + [rel(dflt[i], pub[i]) for i in (1, 2)])}


def default_agreement(diffs: dict[str, float], dtype) -> bool:
    """Whether :func:`check_against_default`'s differences are rounding: the fp32 losses to 1e-5, what
    comes in the logits' dtype to two ulps of it (at least 1e-5)."""
    import torch

    tol = max(1e-5, 2 * torch.finfo(dtype).eps)
    return diffs["loss"] <= 1e-5 and diffs["loss_vs_public"] <= tol and diffs["gradients"] <= tol


def eager_kd_loss(kind: str, temperature: float) -> Callable:
    """The plain-PyTorch loss every method would otherwise write."""
    import torch
    import torch.nn.functional as F

    tau = temperature

    def loss_fn(zs, zt):
        s = zs.float() / tau
        t = zt.float() / tau
        if kind == "kl":
            out = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        elif kind == "reverse_kl":
            out = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="batchmean")
        elif kind == "softmax_mse":
            out = F.mse_loss(torch.softmax(s, -1), torch.softmax(t, -1))
        else:
            out = F.mse_loss(s, t)
        return (out * tau * tau).to(zs.dtype)

    return loss_fn


def make_impl(name: str, kind: str, temperature: float, device: str) -> Callable:
    import torch

    if name == "fastmeta":
        from fastmeta.losses import kd_loss

        # check_finite=False: the hot-loop setting (the check is one extra read + a sync)
        return lambda zs, zt: kd_loss(zs, zt, temperature, kind=kind, check_finite=False)
    fn = eager_kd_loss(kind, temperature)
    if name == "compile":
        # The "bwd" mode times a backward of ONE kept graph (retain_graph=True); AOTAutograd's donated
        # buffers forbid that ("compiled with non-empty donated buffers", first seen on an H200), so
        # they are off for this benchmark (torch >= 2.6 has the switch; the fwd+bwd mode is unaffected).
        try:
            import torch._functorch.config as functorch_config
        except ImportError:
            functorch_config = None
        if functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        return torch.compile(fn)
    return fn


def _timer(device: str, warmup: int, repeats: int) -> Callable[[Callable], float]:
    """Median seconds per call."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            def timed(fn):
                return do_bench(fn, warmup=max(warmup, 1) * 5, rep=max(repeats, 1) * 5,
                                return_mode="median") / 1000.0

            return timed
        except ImportError:
            pass
    return lambda fn: median(time_calls(fn, repeats=repeats, warmup=warmup, device=device))


def bench_case(impl_name, fn, rows, vocab, dtype, device, timed) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    zs = torch.randn(rows, vocab, device=device, dtype=dtype, generator=gen).mul_(4).requires_grad_(True)
    zt = torch.randn(rows, vocab, device=device, dtype=dtype, generator=gen).mul_(4).requires_grad_(True)
    elem = zs.element_size()
    results = []

    def fwd():
        with torch.no_grad():
            return fn(zs, zt)

    graph_loss = fn(zs, zt)

    def bwd():
        return torch.autograd.grad(graph_loss, (zs, zt), retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(fn(zs, zt), (zs, zt))

    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    for mode, call in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        seconds = timed(call)
        nbytes = BYTES_PER_MODE[mode] * rows * vocab * elem
        results.append({
            "impl": impl_name, "rows": rows, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
            "mode": mode, "median_ms": seconds * 1e3, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9,
            "peak_extra_bytes_fwd_bwd": peak,
        })
    del graph_loss, zs, zt
    return results


def report_markdown(env: dict, copy_bw: float | None, rows: list[dict]) -> str:
    lines = ["# fastmeta KD-loss kernel benchmark", ""]
    lines.append(f"Device: {env['device_name']} ({env['device']}); torch {env['versions']['torch']}, "
                 f"triton {env['versions']['triton']}, CUDA {env['versions']['cuda']}; {env['date_utc']}; "
                 f"commit {env.get('git_commit')}.")
    if copy_bw:
        lines.append(f"Measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s.")
    if env["device"] != "cuda":
        lines.append("CPU SMOKE RUN of the benchmark's plumbing (PyTorch paths, tiny sizes): "
                     "not a kernel benchmark, no GPU figures.")
    lines.append("")
    table = []
    for r in rows:
        frac = (f"{100 * r['gb_per_s'] * 1e9 / copy_bw:.0f}%" if copy_bw else None)
        peak = r["peak_extra_bytes_fwd_bwd"]
        table.append([
            f"{r['rows']}x{r['vocab']}", r["dtype"], r["mode"], r["impl"], f"{r['median_ms']:.3f}",
            f"{r['gb_per_s']:.1f}", frac, None if peak is None else f"{peak / 2**20:.0f}",
            None if r.get("max_rel_diff_vs_default") is None else f"{r['max_rel_diff_vs_default']:.1e}",
        ])
    lines.append(markdown_table(
        ["size", "dtype", "mode", "impl", "median ms", "GB/s", "% of copy BW", "peak extra MiB (fwd+bwd)",
         "rel. diff vs default config"], table))
    return "\n".join(lines)


def plan_cases(sizes, dtypes, impls, sweep=(), sweep_dtypes=None) -> list[tuple[int, int, str, str]]:
    """(rows, vocab, dtype name, impl): every size and dtype for the fastmeta and eager
    implementations first, then the ``--sweep`` configurations (``sweep_dtypes``, default
    ``dtypes``), then torch.compile's (each one compiles first: the slowest cases)."""
    cases = [(n, v, d, i) for i in impls if i != "compile" for (n, v) in sizes for d in dtypes]
    cases += [(n, v, d, sweep_name(b, w)) for (b, w) in sweep for (n, v) in sizes for d in (sweep_dtypes or dtypes)]
    cases += [(n, v, d, "compile") for (n, v) in sizes for d in dtypes if "compile" in impls]
    return cases


def _sort_key(sizes, dtypes, impls):
    def key(row):
        return (sizes.index((row["rows"], row["vocab"])), dtypes.index(row["dtype_name"]),
                MODES.index(row["mode"]) if row["mode"] in MODES else -1, impls.index(row["impl"]))
    return key


def main(argv=None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)  # SystemExit with a clear message without CUDA
    import time

    import torch

    deadline = resolve_deadline(args.deadline, args.time_budget_s)
    timed = _timer(device, args.warmup, args.repeats)
    impls = args.impls.split(",")
    if device == "cpu" and "compile" in impls:
        impls.remove("compile")  # smoke run: keep it fast
    dtypes = args.dtypes.split(",")
    sweep = {sweep_name(b, w): (b, w) for b, w in args.sweep}
    order_impls = [i for i in impls if i != "compile"] + list(sweep) + [i for i in impls if i == "compile"]
    order_dtypes = dtypes + [d for d in args.sweep_dtypes if d not in dtypes]
    sizes = SIZES[args.sizes]
    env = environment_info(device)
    copy_bw = copy_bandwidth(device, timed) if device == "cuda" else None
    out_dir = Path(args.out_dir)
    json_path, md_path = out_dir / f"kernels_{device}.json", out_dir / f"kernels_{device}.md"
    rows: list[dict] = []

    def write(final: bool) -> None:
        ordered = sorted(rows, key=_sort_key(sizes, order_dtypes, order_impls))
        data = {"environment": env, "kind": args.kind, "temperature": args.temperature,
                "warmup": args.warmup, "repeats": args.repeats,
                "copy_bandwidth_bytes_per_s": copy_bw, "results": ordered}
        if not final:
            data["partial"] = True
        write_json(json_path, data)
        md = report_markdown(env, copy_bw, [r for r in ordered if "error" not in r and "skipped" not in r])
        notes = [f"- {r['rows']}x{r['vocab']} {r['dtype_name']} {r['impl']}: "
                 + (f"skipped ({r['skipped']})" if "skipped" in r else f"failed: {r['error'][:200]}")
                 for r in ordered if "error" in r or "skipped" in r]
        if notes:
            md += "\nNot measured:\n\n" + "\n".join(notes) + "\n"
        md_path.write_text(md)

    for (n, v, dname, impl) in plan_cases(sizes, dtypes, impls, args.sweep, args.sweep_dtypes):
        if deadline is not None and time.time() >= deadline:
            rows.append({"impl": impl, "rows": n, "vocab": v, "dtype": DTYPES[dname], "dtype_name": dname,
                         "mode": "all", "skipped": "time"})
            continue
        dtype = getattr(torch, DTYPES[dname])
        t0 = time.perf_counter()
        try:
            if impl in sweep:
                fn = launched_kd_loss(args.kind, args.temperature, *sweep[impl])
                diffs = check_against_default(fn, args.kind, args.temperature, min(n, 64), v, dtype, device)
                if not default_agreement(diffs, dtype):
                    raise RuntimeError("outputs differ from the default configuration's or the public loss's "
                                       f"(relative to their largest entry): {diffs}")
                got = bench_case(impl, fn, n, v, dtype, device, timed)
                for r in got:
                    r["max_rel_diff_vs_default"] = max(diffs["loss"], diffs["gradients"])
                    r["diffs_vs_default"] = diffs
            else:
                fn = make_impl(impl, args.kind, args.temperature, device)
                got = bench_case(impl, fn, n, v, dtype, device, timed)
        except Exception as exc:  # noqa: BLE001 - out of memory, a kernel or compile failure: report, go on
            what = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
            got = [{"impl": impl, "rows": n, "vocab": v, "dtype": DTYPES[dname], "mode": "all",
                    "error": f"{what}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}]
        for r in got:
            r["dtype_name"] = dname
        rows.extend(got)
        print(f"{n}x{v} {dname} {impl}: " + ", ".join(
            f"{r['mode']} {r['median_ms']:.3f} ms" if "median_ms" in r else f"{r.get('error')}" for r in got)
            + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        write(final=False)
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        print(f"SKIPPED (time): {len(skipped)} case(s) left when the deadline passed; what ran is kept", flush=True)
    write(final=True)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
