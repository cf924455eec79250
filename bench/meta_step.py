"""``python -m bench.meta_step``: fastmeta's training step against autograd and against its floor.

For every algorithm x hypergradient method (``fastmeta.meta_step(algorithm=...,
hypergrad=...)``) this measures, in ONE run:

- the median wall time of a full training step after warm-up
  (``time.perf_counter`` on CPU, CUDA events on GPU);
- peak memory: on CPU the peak resident set size (``VmHWM``) of a fresh
  subprocess per configuration, reset after model set-up so it covers the
  warm-up + timed steps only, and ``step memory`` = that peak minus the RSS just
  before the first step (models, inputs and interpreter excluded); on GPU
  ``torch.cuda.max_memory_allocated`` over the steps (models and optimizer
  state included, as usually reported);
- ratios to plain KD's step (``algorithm="kd"``) and to the ``autograd``
  (double-backward) hypergradient of the same algorithm;
- the floor: the passes a MetaDistil step cannot avoid, each timed alone in the
  same run -- teacher forward+backward, teacher forward, student
  forward+backward x3 (pilot, quiz, real step), one student JVP -- and every
  step's time over their sum.  Optimizer updates are timed too but are NOT part
  of the floor (reported beside it).

Configurations:

- ``--device cpu`` (default): small real models -- teacher = all-MiniLM-L6-v2
  (6 layers, hidden 384) with a 2-class head, student = its first 2 layers;
  seq 128, batch 4.  Meant to finish in a few minutes on 2 cores.
- ``--device cuda``: BERT-base-sized teacher (12 layers, hidden 768, randomly
  initialised: speed and memory do not depend on the weights) -> 6-layer
  student, seq 128, batch 4 and 32, fp32 and bf16 autocast.  Refuses clearly
  when CUDA is not available.
- ``--model tiny``: a randomly initialised 2-layer hidden-32 BERT (tests/smoke).

Results: ``bench/results/meta_step_<device>.{json,md,png}`` (``--out-dir`` to
change).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

ALGORITHMS = ("kd", "metadistil", "lgtm", "reptile", "ikd")
HYPERGRADS = ("exact", "finite_diff", "autograd", "first_order")
# Which hypergradient methods mean something for each algorithm (the static
# fallback of :func:`meaningful`): kd computes no meta-gradient (hypergrad is
# ignored: None here); ReptileDistil is first order by construction ("exact"
# means the same thing there, so only first_order is run).
_MEANINGFUL_FALLBACK = {
    "kd": (None,),
    "metadistil": ("exact", "finite_diff", "autograd"),
    "lgtm": ("exact", "finite_diff", "autograd"),
    "reptile": ("first_order",),
    "ikd": ("exact", "finite_diff", "autograd", "first_order"),
}


def meaningful() -> dict[str, tuple]:
    """algorithm -> hypergrad values to benchmark, from fastmeta's own registry when importable."""
    try:
        from fastmeta.algorithms import ALGORITHMS as registry
    except Exception:  # noqa: BLE001 - engine not importable: the documented table
        return dict(_MEANINGFUL_FALLBACK)
    out = {}
    for alg in ALGORITHMS:
        accepted = tuple(h for h in HYPERGRADS if h in getattr(registry[alg], "HYPERGRADS", ()))
        if alg == "kd":
            out[alg] = (None,)
        elif alg == "reptile" and "first_order" in accepted:
            out[alg] = ("first_order",)
        else:
            out[alg] = accepted
    return out


MODELS = {
    # name: teacher spec, student layers, default seq/batch
    "minilm": dict(desc="teacher all-MiniLM-L6-v2 (6L, hidden 384, 22.7M params) + 2-class head; "
                        "student = its first 2 layers", student_layers=2),
    "bert-base": dict(desc="teacher BERT-base config (12L, hidden 768, random init) -> "
                           "6-layer student (first 6 layers)", student_layers=6),
    "tiny": dict(desc="random tiny BERT (2L, hidden 32, vocab 1000) -> 1-layer student",
                 student_layers=1),
}


# =========================================================================== worker side
def build_models(model: str, *, seed: int, attn: str, dropout: float | None):
    """Teacher and student (``BertForSequenceClassification``, 2 labels)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    common.quiet_transformers()
    torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if dropout is not None:
        extra.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if model == "minilm":
        teacher = BertForSequenceClassification.from_pretrained(
            common.minilm_path(), num_labels=2, attn_implementation=attn, **extra)
    elif model == "bert-base":
        config = BertConfig(num_labels=2, **extra)  # 12 layers, 768 hidden, 12 heads
        config._attn_implementation = attn
        teacher = BertForSequenceClassification(config)
    elif model == "tiny":
        config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128, num_labels=2, **extra)
        config._attn_implementation = attn
        teacher = BertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown --model {model!r}; choose from {sorted(MODELS)}")
    student = common.student_from_teacher(teacher, MODELS[model]["student_layers"])
    teacher.train()
    student.train()
    return teacher, student


def random_batch(vocab: int, batch_size: int, seq_len: int, *, generator, device):
    """A BERT-style batch of random token ids (speed/memory do not depend on the text)."""
    import torch

    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch_size, seq_len), generator=generator)
    ids[:, 0] = 101 if vocab > 2000 else 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator).to(device),
    }


def _autocast(device: str, dtype: str):
    import contextlib

    import torch

    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    if dtype != "fp32":
        raise ValueError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    return contextlib.nullcontext()


def _setup(spec: dict[str, Any]):
    import torch

    device = spec["device"]
    torch.manual_seed(spec["seed"])
    teacher, student = build_models(spec["model"], seed=spec["seed"], attn=spec["attn"],
                                    dropout=spec.get("dropout"))
    teacher.to(device)
    student.to(device)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    vocab = teacher.config.vocab_size
    batch = random_batch(vocab, spec["batch_size"], spec["seq_len"], generator=gen, device=device)
    quiz = random_batch(vocab, spec["batch_size"], spec["seq_len"], generator=gen, device=device)
    opt_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec["optimizer"]]
    teacher_opt = opt_cls(teacher.parameters(), lr=spec["teacher_lr"])
    student_opt = opt_cls(student.parameters(), lr=spec["student_lr"])
    return teacher, student, batch, quiz, teacher_opt, student_opt


def _memory_start(device: str) -> dict[str, Any]:
    if device == "cuda":
        common.reset_cuda_peak()
        import torch

        return {"allocated_before_steps_bytes": int(torch.cuda.memory_allocated())}
    rss = common.current_rss_bytes()
    reset_ok = common.reset_peak_rss()
    return {"rss_before_steps_bytes": rss, "peak_reset_supported": reset_ok}


def _memory_end(device: str, start: dict[str, Any]) -> dict[str, Any]:
    out = dict(start)
    if device == "cuda":
        out["peak_bytes"] = common.cuda_peak_bytes()
        out["step_memory_bytes"] = out["peak_bytes"] - start["allocated_before_steps_bytes"]
        out["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_bytes"] = common.peak_rss_bytes()
        out["step_memory_bytes"] = out["peak_bytes"] - start["rss_before_steps_bytes"]
        out["peak_kind"] = "VmHWM (peak RSS) of the worker process" + (
            ", reset after set-up" if start["peak_reset_supported"] else ", whole process")
    return out


def worker_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``fastmeta.meta_step`` for one (algorithm, hypergrad) configuration."""
    import torch

    import fastmeta

    device = spec["device"]
    teacher, student, batch, quiz, teacher_opt, student_opt = _setup(spec)
    kwargs: dict[str, Any] = dict(algorithm=spec["algorithm"], temperature=spec["temperature"],
                                  kd_weight=spec["kd_weight"])
    if spec.get("hypergrad") is not None:
        kwargs["hypergrad"] = spec["hypergrad"]
    if spec.get("inner_lr") is not None:
        kwargs["inner_lr"] = spec["inner_lr"]
    kwargs.update(spec.get("algorithm_options") or {})
    phase_records: list[dict[str, float]] = []

    def step():
        with _autocast(device, spec["dtype"]):
            out = fastmeta.meta_step(teacher, student, batch, quiz, teacher_opt, student_opt,
                                     **kwargs)
        timings = getattr(out, "timings", None)
        if isinstance(timings, dict):
            phase_records.append({k: float(v) for k, v in timings.items()
                                  if isinstance(v, (int, float))})
        return out

    mem = _memory_start(device)
    t_wall = time.perf_counter()
    times = common.time_calls(step, repeats=spec["repeats"], warmup=spec["warmup"], device=device)
    wall = time.perf_counter() - t_wall
    mem = _memory_end(device, mem)
    timed_phases = phase_records[spec["warmup"]:]
    phases = {}
    if timed_phases:
        for key in timed_phases[0]:
            vals = [r[key] for r in timed_phases if key in r]
            phases[key] = common.median(vals)
    finite = all(bool(torch.isfinite(p).all()) for m in (teacher, student) for p in m.parameters())
    return {
        "kind": "step", "algorithm": spec["algorithm"], "hypergrad": spec.get("hypergrad"),
        "times_s": times, "median_s": common.median(times), "wall_s": wall,
        "phase_medians_s": phases, "memory": mem, "parameters_finite_after": finite,
        "torch_threads": torch.get_num_threads(),
    }


def worker_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the passes a MetaDistil step cannot avoid, each alone."""
    import torch
    from torch.func import functional_call, jvp

    device = spec["device"]
    teacher, student, batch, quiz, teacher_opt, student_opt = _setup(spec)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    quiz_inputs = {k: v for k, v in quiz.items() if k != "labels"}
    labels, quiz_labels = batch["labels"], quiz["labels"]
    ac = lambda: _autocast(device, spec["dtype"])  # noqa: E731
    rep, warm = spec["repeats"], spec["warmup"]
    gen = torch.Generator().manual_seed(spec["seed"] + 7)

    def clear():
        for m in (teacher, student):
            for p in m.parameters():
                p.grad = None

    num_labels = teacher.config.num_labels
    cot = torch.randn(labels.shape[0], num_labels, generator=gen).to(device)

    def teacher_fwd_bwd():
        clear()
        with ac():
            logits = teacher(**inputs).logits
        logits.float().backward(cot)

    def teacher_fwd():
        with torch.no_grad(), ac():
            teacher(**inputs)

    def student_fwd_bwd(kw, y):
        def run():
            clear()
            with ac():
                logits = student(**kw).logits
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
        return run

    params = {n: p.detach() for n, p in student.named_parameters()}
    tangents = {n: torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
                for n, p in params.items()}

    def student_jvp():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def f(p):
            return functional_call(student, p, args=(), kwargs=inputs).logits
        with sdpa_kernel(SDPBackend.MATH), ac():
            jvp(f, (params,), (tangents,))

    def optimizer_steps():
        # teacher once, student twice (pilot + real) as a MetaDistil step does
        for p in teacher.parameters():
            p.grad = torch.zeros_like(p)
        for p in student.parameters():
            p.grad = torch.zeros_like(p)
        with torch.no_grad():
            teacher_opt.step()
            student_opt.step()
            student_opt.step()

    mem = _memory_start(device)
    passes = {
        "teacher_forward_backward": (teacher_fwd_bwd, 1),
        "teacher_forward": (teacher_fwd, 1),
        "student_forward_backward_train": (student_fwd_bwd(inputs, labels), 2),
        "student_forward_backward_quiz": (student_fwd_bwd(quiz_inputs, quiz_labels), 1),
        "student_jvp": (student_jvp, 1),
    }
    results: dict[str, Any] = {}
    for name, (fn, count) in passes.items():
        times = common.time_calls(fn, repeats=rep, warmup=warm, device=device)
        results[name] = {"times_s": times, "median_s": common.median(times), "count": count}
    clear()
    opt_times = common.time_calls(optimizer_steps, repeats=rep, warmup=warm, device=device)
    mem = _memory_end(device, mem)
    floor = sum(r["median_s"] * r["count"] for r in results.values())
    return {
        "kind": "floor", "passes": results, "floor_s": floor,
        "optimizer_updates": {"times_s": opt_times, "median_s": common.median(opt_times),
                              "what": "teacher optimizer step x1 + student optimizer step x2 "
                                      f"({spec['optimizer']}), not part of the floor"},
        "memory": mem,
    }


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    fn = {"step": worker_step, "floor": worker_floor}[spec["kind"]]
    result = fn(spec)
    Path(spec["output"]).write_text(json.dumps(result))


# =========================================================================== parent side
def settings_for(args) -> list[dict[str, Any]]:
    """The (model, batch, seq, dtype) settings of this run."""
    if args.device == "cuda":
        model = args.model or "bert-base"
        batches = args.batch_sizes or [4, 32]
        dtypes = args.dtypes or ["fp32", "bf16"]
    else:
        model = args.model or "minilm"
        batches = args.batch_sizes or [4]
        dtypes = args.dtypes or ["fp32"]
    seq = args.seq_len or (16 if model == "tiny" else 128)
    return [dict(model=model, batch_size=b, seq_len=seq, dtype=d) for b in batches for d in dtypes]


def configurations(algorithms, hypergrads) -> list[tuple[str, str | None]]:
    out = []
    table = meaningful()
    for alg in algorithms:
        if alg not in table:
            raise SystemExit(f"unknown algorithm {alg!r}; choose from {ALGORITHMS}")
        for hg in table[alg]:
            if hg is None or hg in hypergrads:
                out.append((alg, hg))
    if not any(a == "kd" for a, _ in out):
        out.insert(0, ("kd", None))  # every ratio divides by plain KD
    return out


def run_setting(args, setting: dict[str, Any], log) -> dict[str, Any]:
    base = dict(device=args.device, seed=args.seed, attn=args.attn, dropout=args.dropout,
                optimizer=args.optimizer, teacher_lr=args.teacher_lr, student_lr=args.student_lr,
                inner_lr=args.inner_lr, temperature=args.temperature, kd_weight=args.kd_weight,
                warmup=args.warmup, repeats=args.repeats, threads=args.threads, **setting)
    label = f"{setting['model']} bs{setting['batch_size']} seq{setting['seq_len']} {setting['dtype']}"
    rows: list[dict[str, Any]] = []
    runner = _runner(args)
    log(f"[{label}] floor passes ...")
    t0 = time.perf_counter()
    floor = runner(dict(base, kind="floor"))
    log(f"[{label}] floor = {floor['floor_s']:.3f} s ({time.perf_counter() - t0:.0f} s)")
    for alg, hg in configurations(args.algorithms, args.hypergrads):
        t0 = time.perf_counter()
        spec = dict(base, kind="step", algorithm=alg, hypergrad=hg)
        try:
            res = runner(spec)
        except common.WorkerError as exc:
            res = {"kind": "step", "algorithm": alg, "hypergrad": hg, "error": str(exc)}
            log(f"[{label}] {alg}/{hg}: FAILED\n{exc}")
        else:
            log(f"[{label}] {alg}/{hg}: median {res['median_s']:.3f} s, peak "
                f"{common.fmt_bytes(res['memory']['peak_bytes'])} ({time.perf_counter() - t0:.0f} s)")
        rows.append(res)
    _add_ratios(rows, floor)
    return {"setting": setting, "label": label, "floor": floor, "steps": rows}


def _runner(args):
    if args.isolation == "subprocess":
        return lambda spec: common.run_worker("bench.meta_step", spec, timeout=args.worker_timeout)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def in_process(spec):  # for tests: no fresh process, peak memory is process-wide
        fn = {"step": worker_step, "floor": worker_floor}[spec["kind"]]
        return fn(spec)
    return in_process


def _add_ratios(rows: list[dict[str, Any]], floor: dict[str, Any]) -> None:
    ok = [r for r in rows if "error" not in r]
    kd = next((r for r in ok if r["algorithm"] == "kd"), None)
    for r in ok:
        auto = next((a for a in ok if a["algorithm"] == r["algorithm"]
                     and a["hypergrad"] == "autograd"), None)
        r["time_vs_kd"] = r["median_s"] / kd["median_s"] if kd else None
        r["time_vs_autograd"] = r["median_s"] / auto["median_s"] if auto else None
        r["time_vs_floor"] = r["median_s"] / floor["floor_s"]
        pk, sm = r["memory"]["peak_bytes"], r["memory"]["step_memory_bytes"]
        r["peak_vs_kd"] = pk / kd["memory"]["peak_bytes"] if kd else None
        r["step_memory_vs_kd"] = (sm / kd["memory"]["step_memory_bytes"]
                                  if kd and kd["memory"]["step_memory_bytes"] > 0 else None)
        r["peak_vs_autograd"] = pk / auto["memory"]["peak_bytes"] if auto else None
        r["step_memory_vs_autograd"] = (sm / auto["memory"]["step_memory_bytes"]
                                        if auto and auto["memory"]["step_memory_bytes"] > 0 else None)


def goals(setting_result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for MetaDistil with fastmeta exact (stated for GPU)."""
    steps = {(r["algorithm"], r["hypergrad"]): r for r in setting_result["steps"] if "error" not in r}
    exact = steps.get(("metadistil", "exact"))
    auto = steps.get(("metadistil", "autograd"))
    out: dict[str, Any] = {}
    if exact and auto:
        out["speedup_vs_autograd"] = {"value": auto["median_s"] / exact["median_s"], "goal": ">= 2",
                                      "met": auto["median_s"] / exact["median_s"] >= 2.0}
    if exact:
        out["time_vs_floor"] = {"value": exact["time_vs_floor"], "goal": "<= 1.15",
                                "met": exact["time_vs_floor"] <= 1.15}
        if exact.get("peak_vs_kd") is not None:
            out["peak_memory_vs_kd"] = {"value": exact["peak_vs_kd"], "goal": "<= 1.5",
                                        "met": exact["peak_vs_kd"] <= 1.5}
    return out


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# fastmeta.meta_step benchmark ({env['device']}: {env['device_name']})", "",
             f"Measured {env['date_utc']} with `{env['command']}`; torch {env['versions']['torch']}, "
             f"transformers {env['versions']['transformers']}, triton {env['versions']['triton']}, "
             f"python {env['versions']['python']}; {env['worker_threads']} intra-op thread(s) per worker process. {env['note']}", "",
             f"Models: {report['models']}. Optimizer: {report['options']['optimizer']} for both "
             f"models; warm-up {report['options']['warmup']} steps, median of "
             f"{report['options']['repeats']} timed steps. {report['memory_note']}", ""]
    for s in report["settings"]:
        lines += [f"## {s['label']}", ""]
        rows = []
        for r in s["steps"]:
            name = r["algorithm"] + (f" / {r['hypergrad']}" if r["hypergrad"] else "")
            if "error" in r:
                first = r["error"].strip().splitlines()[-1][:120]
                rows.append([name, f"failed: {first}"] + [None] * 9)
                continue
            m = r["memory"]
            rows.append([
                name, common.fmt(r["median_s"], 3), common.fmt(r["time_vs_kd"], 2, "x"),
                common.fmt(r["time_vs_autograd"], 2, "x"), common.fmt(r["time_vs_floor"], 2, "x"),
                common.fmt_bytes(m["peak_bytes"]), common.fmt(r["peak_vs_kd"], 2, "x"),
                common.fmt_bytes(m["step_memory_bytes"]), common.fmt(r["step_memory_vs_kd"], 2, "x"),
                common.fmt(r["step_memory_vs_autograd"], 2, "x"),
            ])
        lines.append(common.markdown_table(
            ["step", "median s", "x KD", "x autograd", "x floor", "peak mem", "peak x KD",
             "step mem", "step mem x KD", "step mem x autograd"], rows))
        f = s["floor"]
        frows = [[k, r["count"], common.fmt(r["median_s"], 4), common.fmt(r["median_s"] * r["count"], 4)]
                 for k, r in f["passes"].items()]
        frows.append(["**floor (sum)**", "", "", common.fmt(f["floor_s"], 4)])
        frows.append(["optimizer updates (not in floor)", "", "",
                      common.fmt(f["optimizer_updates"]["median_s"], 4)])
        lines += ["Floor: the necessary passes, each timed alone in this run:", "",
                  common.markdown_table(["pass", "count", "median s", "s x count"], frows)]
        g = goals(s)
        if g:
            lines.append("MetaDistil with fastmeta exact against the issue's goals (stated for GPU): "
                         + "; ".join(f"{k} = {v['value']:.2f} (goal {v['goal']}: "
                                     f"{'met' if v['met'] else 'missed'})" for k, v in g.items()))
            lines.append("")
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    s = report["settings"][0]
    ok = [r for r in s["steps"] if "error" not in r]
    labels = [r["algorithm"] + (f"/{r['hypergrad']}" if r["hypergrad"] else "") for r in ok]
    mem_key = "step_memory_vs_kd" if report["environment"]["device"] == "cpu" else "peak_vs_kd"
    mem_title = ("step memory (peak RSS - RSS before steps), x KD" if mem_key == "step_memory_vs_kd"
                 else "peak GPU memory, x KD")
    env = report["environment"]
    common.bar_chart_ratios(
        path, labels,
        [("median step time, x plain KD", [r["time_vs_kd"] for r in ok]),
         (mem_title, [r[mem_key] for r in ok])],
        title=f"fastmeta.meta_step, {s['label']} on {env['device']} ({env['device_name']})",
        footnote=f"{env['date_utc']}; torch {env['versions']['torch']}; "
                 + ("shared machine, timings noisy" if env.get("shared_machine") else ""),
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.meta_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="default: minilm on cpu, bert-base on cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    p.add_argument("--hypergrads", nargs="+", default=list(HYPERGRADS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--teacher-lr", type=float, default=2e-5)
    p.add_argument("--student-lr", type=float, default=5e-5)
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dropout", type=float, default=None,
                   help="override the models' dropout (default: the config's, 0.1)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per worker (default 1: on the shared 2-core machine two OpenMP "
                        "threads stalled at barriers, 2-3x slower and far noisier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolation", choices=["subprocess", "inprocess"], default="subprocess",
                   help="subprocess: one fresh process per configuration (clean peaks)")
    p.add_argument("--worker-timeout", type=float, default=900)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--tag", default=None, help="result file stem (default meta_step_<device>)")
    p.add_argument("--shared-machine", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    common.require_device(args.device)
    common.quiet_transformers()
    shared = {"auto": None, "yes": True, "no": False}[args.shared_machine]
    env = common.environment_info(args.device, shared_machine=shared)
    env["worker_threads"] = args.threads or env["torch_threads"]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    settings = [run_setting(args, s, log) for s in settings_for(args)]
    env["load_average_at_end"] = common.load_average()
    report = {
        "benchmark": "meta_step",
        "environment": env,
        "models": MODELS[settings[0]["setting"]["model"]]["desc"],
        "options": {k: v for k, v in vars(args).items() if k != "worker"},
        "memory_note": ("CPU memory: peak RSS (VmHWM) of one fresh subprocess per configuration, "
                        "reset after model set-up; 'step mem' = that peak minus the RSS just before "
                        "the first step." if args.device == "cpu" and args.isolation == "subprocess"
                        else "GPU memory: torch.cuda.max_memory_allocated over the steps (models and "
                        "optimizer state included); 'step mem' = peak minus allocated before the steps."
                        if args.device == "cuda" else
                        "In-process run (tests): peaks are process-wide and not comparable."),
        "settings": settings,
        "goals": {s["label"]: goals(s) for s in settings},
        "total_wall_s": time.perf_counter() - t0,
    }
    out_dir = Path(args.out_dir)
    stem = args.tag or f"meta_step_{args.device}"
    common.write_json(out_dir / f"{stem}.json", report)
    md = render_markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    render_chart(report, out_dir / f"{stem}.png")
    print(md)
    print(f"wrote {out_dir / stem}.{{json,md,png}} in {report['total_wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
