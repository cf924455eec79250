"""Static cost of the KD kernels' hot loops on an H100/H200, without a GPU: ``python -m bench.kernel_sass``.

Each launch configuration (launcher x logits dtype x ``BLOCK_V``x``num_warps``) is compiled
for ``sm_90`` exactly as ``make check-cuda-build`` does (:mod:`fastmeta.kernels.launch_configs`),
the cubin disassembled with Triton's bundled ``nvdisasm``, and the vocabulary loop (the
largest block that branches back to its own label) counted: SASS instructions per
iteration and per element a thread handles (``BLOCK_V / (32·num_warps)``), by opcode,
with the registers per thread (``cuobjdump -res-usage``).

Why: a loop that needs more instructions per byte than an SM can issue is
instruction-bound whatever the memory system does.  An H100/H200 SM issues at most 4
warp-instructions per cycle (128 thread-instructions).  At the copy bandwidth
(4.25 TB/s measured on the H200, 132 SMs at ~1.75 GHz), a bf16 KD forward (2 bytes
per element per logits tensor, 2 tensors) must retire about 4.6 element pairs per
cycle per SM: ``4.6 × instructions-per-element`` thread-instructions per cycle, which
exceeds 128 above ~28 instructions per element (fp32: above ~56).
``issue_bound_fraction`` states that bound (1.0: instructions are not the limit).
It is an upper bound from instruction counts alone (latency, reductions' barriers
and occupancy come on top), to read next to ``bench.kernels``' measured bandwidth.

Results: ``bench/results/kernel_sass.{json,md}`` (they name the triton version: counts
differ between compiler versions).  Needs triton with its NVIDIA backend and no
``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, environment_info, markdown_table, write_json

# tensors read or written per vocabulary position in each launcher's hottest loop (x element size): the
# forward reads zs, zt; the backward reads both and writes both gradients; the second order's pass 1 reads
# zs, zt and the tangent u (its cotangent pass, when asked for, is a separate, shorter loop)
TENSORS_PER_POSITION = {"kd_loss_forward": 2, "kd_loss_backward": 4, "kd_second_order": 3}
ISSUE_PER_SM_CYCLE = 128  # thread-instructions: 4 schedulers x 32 lanes (Hopper)
H200 = {"copy_bandwidth_bytes_per_s": 4.25e12, "sms": 132, "clock_hz": 1.755e9}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
DEFAULT_CONFIGS = "default,8192x16,2048x4"
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\(?\.(L_x_\d+)")


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} (triton's bundled {name}) is missing")
    return str(path)


def opcode(instruction: str) -> str:
    """``@!P2 FMUL.FTZ R1, R2, R3`` -> ``FMUL``."""
    words = instruction.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def hottest_loop(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of the largest block of ``sass`` that ends in a branch back to its label."""
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _INSTRUCTION.search(line)
        if found:
            instructions.append(found.group(1))
    best: list[str] = []
    for i, instruction in enumerate(instructions):
        branch = _BRANCH.search(instruction)
        if branch and branch.group(1) in labels and labels[branch.group(1)] <= i:
            body = instructions[labels[branch.group(1)]:i + 1]
            if len(body) > len(best):
                best = body
    return len(best), collections.Counter(opcode(b) for b in best)


def registers(cubin_path: str) -> int | None:
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)", out)
    return int(found.group(1)) if found else None


def measure(launcher: str, dtype_name: str, block: int | None, warps: int | None, kind: str = "kl",
            vocab: int = 32000) -> dict[str, Any]:
    """Compile one configuration for sm_90 and count its hot loop."""
    import torch

    from fastmeta.kernels import launch_configs as lc

    dtype = getattr(torch, DTYPES[dtype_name])
    (config, *_) = lc.launch(lc.Scenario(launcher, kind, dtype=dtype, vocab=vocab), block, warps)
    compiled = lc.compiled_configuration(config, 90)
    with tempfile.TemporaryDirectory(prefix="fastmeta-sass-") as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        regs = registers(cubin)
    constants = dict(config.constants)
    block_v, num_warps = constants["BLOCK_V"], config.num_warps
    n, ops = hottest_loop(sass)
    per_thread = block_v / (32 * num_warps)
    per_element = n / per_thread if n else None
    element_size = torch.empty((), dtype=dtype).element_size()
    positions_per_cycle = H200["copy_bandwidth_bytes_per_s"] / (
        TENSORS_PER_POSITION[launcher] * element_size * H200["sms"] * H200["clock_hz"])
    bound = None if not per_element else min(1.0, ISSUE_PER_SM_CYCLE / (positions_per_cycle * per_element))
    return {
        "launcher": launcher, "kind": kind, "dtype": dtype_name, "block_v": block_v, "num_warps": num_warps,
        "default_config": block is None and warps is None, "loop_instructions": n,
        "elements_per_thread": per_thread, "instructions_per_element": per_element,
        "registers": regs, "issue_bound_fraction": bound,
        "opcodes": dict(ops.most_common()),
    }


def parse_configs(text: str) -> list[tuple[int | None, int | None]]:
    from bench.kernels import parse_sweep

    out: list[tuple[int | None, int | None]] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        out.append((None, None) if item == "default" else parse_sweep(item)[0])
    return out


def report_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = ["# KD kernels: SASS of the hot loops (sm_90, no GPU)", "",
             f"Compiled {env['date_utc']} with triton {env['versions']['triton']} (torch {env['versions']['torch']}); "
             f"commit {env.get('git_commit')}.  `python -m bench.kernel_sass` — see its docstring for the "
             "issue bound (H200: 4.25 TB/s copy bandwidth, 132 SMs, ~1.75 GHz, 128 thread-instructions per SM "
             "per cycle).", ""]
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["launcher"], r["dtype"], r.get("config"), None, None, None, None, r["error"][:80]])
            continue
        top = ", ".join(f"{k} {v}" for k, v in list(r["opcodes"].items())[:6])
        rows.append([r["launcher"], r["dtype"], f"{r['block_v']}x{r['num_warps']}" + (" (default)" if r["default_config"] else ""),
                     r["loop_instructions"], f"{r['instructions_per_element']:.1f}" if r["instructions_per_element"] else None,
                     r["registers"], f"{100 * r['issue_bound_fraction']:.0f}%" if r["issue_bound_fraction"] else None, top])
    lines.append(markdown_table(["launcher", "dtype", "BLOCK_V x warps", "loop instructions", "per element",
                                 "registers", "issue bound (of copy BW)", "top opcodes"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list: default and/or BLOCK_VxWARPS")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--launchers", default="kd_loss_forward,kd_loss_backward,kd_second_order")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="kernel_sass")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    configs = parse_configs(args.configs)
    rows = []
    for launcher in args.launchers.split(","):
        for dtype_name in args.dtypes.split(","):
            for block, warps in configs:
                try:
                    rows.append(measure(launcher, dtype_name, block, warps))
                except Exception as exc:  # noqa: BLE001 - reported per configuration
                    rows.append({"launcher": launcher, "dtype": dtype_name, "config": f"{block}x{warps}",
                                 "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"})
                r = rows[-1]
                print(f"{launcher} {dtype_name} " + (f"{r['block_v']}x{r['num_warps']}: {r['loop_instructions']} "
                      f"instructions/iteration, {r['instructions_per_element']:.1f} per element, {r['registers']} registers"
                      if "error" not in r else f"{r['config']}: {r['error']}"), flush=True)
    data = {"environment": environment_info("cpu"), "target": "sm_90", "configs": args.configs, "rows": rows}
    out = Path(args.out_dir)
    write_json(out / f"{args.tag}.json", data)
    (out / f"{args.tag}.md").write_text(report_markdown(data))
    print(f"wrote {out / args.tag}.json and .md")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
