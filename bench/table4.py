"""``python -m bench.table4``: Table 4 of the ReptileDistil paper, reproduced side by side.

Table 4 compares, on MRPC with a BERT-base teacher, batch 4, on a V100, the
training time to the best dev score, the peak memory and the best dev scores of
plain KD, MetaDistil and ReptileDistil.  This command trains, from the SAME
fine-tuned teacher and the SAME student initialisation, on the same batches:

==========================  =======================================================
``kd``                      plain KD                     (meta_step algorithm="kd")
``metadistil_official``     MetaDistil as its official code computes it: double
                            backward (algorithm="metadistil", hypergrad="autograd")
``metadistil_fastmeta``     MetaDistil, fastmeta exact   (hypergrad="exact")
``reptile``                 ReptileDistil                (algorithm="reptile")
``lgtm_finite_diff``        LGTM as in its paper: finite-difference influence
                            (algorithm="lgtm", hypergrad="finite_diff")
``lgtm_fastmeta``           LGTM, fastmeta exact         (hypergrad="exact")
==========================  =======================================================

and reports, per method: training time to its best dev score (cumulative
wall time of the training steps, evaluation excluded), training time to first
match plain KD's best dev score, peak memory, best dev F1/accuracy -- each beside
the paper's figure (KD 10 min / 3.7 GB / 90.0/86.5; MetaDistil 31 min / 11.4 GB /
91.1/86.8; ReptileDistil 22 min / 8.1 GB / 91.6/87.7; LGTM has no figure in that
table).

Default (``--device cpu``): a SCALED-DOWN CPU reproduction with small real
models -- teacher = all-MiniLM-L6-v2 (6 layers, hidden 384) fine-tuned briefly on
the task ONCE (its state is cached in the run's temp dir and every method starts
from it), student = the fine-tuned teacher's first 2 layers; a subset of MRPC's
train split, real text, short schedule, dev = the full MRPC dev split.  One fresh
subprocess per method, so each peak RSS is that method's alone.  The output says
so, with the subset sizes, sequence length and step counts.

``--device cuda``: BERT-base-sized teacher (12L, 768, randomly initialised unless
``--teacher`` names a local model directory) -> 6-layer student for the time and
memory columns; refuses clearly when CUDA is not available.

Results: ``bench/results/table4_<device>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

METHODS = {
    # name: (label, meta_step kwargs)
    "kd": ("plain KD", dict(algorithm="kd")),
    "metadistil_official": ("MetaDistil, official (double backward)",
                            dict(algorithm="metadistil", hypergrad="autograd")),
    "metadistil_fastmeta": ("MetaDistil, fastmeta exact", dict(algorithm="metadistil", hypergrad="exact")),
    "reptile": ("ReptileDistil", dict(algorithm="reptile", hypergrad="first_order")),
    "lgtm_finite_diff": ("LGTM, finite difference (paper)", dict(algorithm="lgtm", hypergrad="finite_diff")),
    "lgtm_fastmeta": ("LGTM, fastmeta exact", dict(algorithm="lgtm", hypergrad="exact")),
}

# Table 4 of the ReptileDistil paper (MRPC, BERT-base teacher, batch 4, V100).
# The score pair is MRPC's GLUE pair; we read it as F1/accuracy (F1 > accuracy on MRPC).
PAPER = {
    "kd": dict(time_min=10, memory_gb=3.7, f1=90.0, accuracy=86.5),
    "metadistil_official": dict(time_min=31, memory_gb=11.4, f1=91.1, accuracy=86.8),
    "reptile": dict(time_min=22, memory_gb=8.1, f1=91.6, accuracy=87.7),
}

DEFAULT_DATA_DIR = common.REPO_ROOT.parent / "shared" / "data" / "glue" / "MRPC"


# =========================================================================== data
def load_data(args) -> dict[str, Any]:
    """Train subset / quiz / dev examples, tokenized (lists of dicts, unpadded)."""
    from fastmeta import data as fdata

    if args.data_dir:
        task_data = fdata.load_task_data("mrpc", data_dir=args.data_dir)
        source = f"local GLUE TSV folder {args.data_dir}"
    else:
        task_data = fdata.load_task_data("mrpc")  # datasets hub (needs the network)
        source = "datasets hub nyu-mll/glue mrpc"
    train = list(task_data.train)
    random.Random(args.seed).shuffle(train)
    train = train[: args.train_examples]
    dev = list(task_data.dev)[: args.dev_examples] if args.dev_examples else list(task_data.dev)
    sub = fdata.TaskData(task_data.spec, train, dev, [], task_data.source)
    split = fdata.split_quiz(sub, quiz_split=args.quiz_split, seed=args.seed)
    tokenizer = _tokenizer(args)
    tok = lambda exs: fdata.tokenize_examples(exs, tokenizer, args.max_seq_length)  # noqa: E731
    return {
        "source": source,
        "task": task_data.spec.name,
        "train": tok(split.train), "quiz": tok(split.quiz), "dev": tok(split.dev),
        "pad_token_id": tokenizer.pad_token_id or 0,
        "sizes": {"train": len(split.train), "quiz": len(split.quiz), "dev": len(split.dev),
                  "full_train": len(task_data.train)},
        "majority_baseline": fdata.majority_baseline(
            task_data.spec, [e.label for e in split.train], [e.label for e in split.dev]),
    }


def _tokenizer(args):
    from transformers import AutoTokenizer

    common.quiet_transformers()
    path = args.tokenizer or common.minilm_path()
    return AutoTokenizer.from_pretrained(path)


def _batches(dataset, batch_size: int, steps: int, seed: int, pad_token_id: int):
    """``steps`` batches in a seeded order (epochs reshuffled), the same for every method."""
    from fastmeta import data as fdata

    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(dataset)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        out.append(fdata.collate([dataset[i] for i in idx], pad_token_id=pad_token_id))
    return out


def evaluate(model, dataset, pad_token_id: int, device: str, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and F1 (positive class) of ``model`` on ``dataset``; mode restored after."""
    import torch

    from fastmeta import data as fdata

    was_training = model.training
    model.eval()
    preds, golds = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = fdata.collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))],
                                  pad_token_id=pad_token_id)
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            preds += logits.argmax(-1).cpu().tolist()
            golds += labels.tolist()
    model.train(was_training)
    spec = fdata.get_task("mrpc")
    m = fdata.compute_metrics(spec, preds, golds)
    return {"accuracy": float(m["accuracy"]), "f1": float(m["f1"]),
            "score": float(m["combined_score"])}


# =========================================================================== models
def build_teacher(args):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    common.quiet_transformers()
    torch.manual_seed(args["seed"])
    model = args["model"]
    if model == "minilm":
        return BertForSequenceClassification.from_pretrained(
            args.get("teacher") or common.minilm_path(), num_labels=2, attn_implementation=args["attn"])
    if model == "bert-base":
        if args.get("teacher"):
            return BertForSequenceClassification.from_pretrained(
                args["teacher"], num_labels=2, attn_implementation=args["attn"])
        config = BertConfig(num_labels=2)
    elif model == "tiny":
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, num_labels=2)
    else:
        raise ValueError(f"unknown --model {model!r}")
    config._attn_implementation = args["attn"]
    return BertForSequenceClassification(config)


STUDENT_LAYERS = {"minilm": 2, "bert-base": 6, "tiny": 1}


# =========================================================================== workers
def worker_teacher(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the teacher once on the train subset; save its state dict."""
    import torch

    data = spec["data"]
    device = spec["device"]
    teacher = build_teacher(spec).to(device)
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=spec["teacher_finetune_lr"])
    batches = _batches(data["train"], spec["teacher_finetune_batch_size"], spec["teacher_finetune_steps"],
                       spec["seed"] + 100, data["pad_token_id"])
    t0 = time.perf_counter()
    losses = []
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        loss = teacher(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t0
    metrics = evaluate(teacher, data["dev"], data["pad_token_id"], device)
    torch.save({k: v.detach().cpu() for k, v in teacher.state_dict().items()}, spec["teacher_state"])
    return {"kind": "teacher", "train_s": train_s, "steps": len(batches),
            "final_losses": losses[-5:], "dev": metrics}


def worker_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method from the cached teacher; evaluate the student every ``eval_every`` steps."""
    import torch

    import fastmeta

    data = spec["data"]
    device = spec["device"]
    teacher = build_teacher(spec)
    teacher.load_state_dict(torch.load(spec["teacher_state"], map_location="cpu"))
    teacher.to(device).train()
    student = common.student_from_teacher(teacher, STUDENT_LAYERS[spec["model"]]).to(device).train()
    if spec.get("freeze_word_embeddings"):
        for m in (teacher, student):
            m.get_input_embeddings().weight.requires_grad_(False)
    teacher_opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=spec["teacher_lr"])
    student_opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=spec["student_lr"])
    pad = data["pad_token_id"]
    batches = _batches(data["train"], spec["batch_size"], spec["steps"], spec["seed"] + 1, pad)
    quizzes = _batches(data["quiz"], spec["batch_size"], spec["steps"], spec["seed"] + 2, pad)
    kwargs = dict(METHODS[spec["method"]][1], temperature=spec["temperature"], kd_weight=spec["kd_weight"])
    watch = common.Stopwatch(device)
    history = [dict(step=0, train_time_s=0.0, **evaluate(student, data["dev"], pad, device))]
    losses = []
    mem = {"rss_before_training_bytes": common.current_rss_bytes() if device == "cpu" else None}
    if device == "cuda":
        common.reset_cuda_peak()
        mem["allocated_before_training_bytes"] = int(torch.cuda.memory_allocated())
    else:
        mem["peak_reset_supported"] = common.reset_peak_rss()
    step_times = []
    for step, (b, q) in enumerate(zip(batches, quizzes), start=1):
        before = watch.total
        with watch:
            b = {k: v.to(device) for k, v in b.items()}
            q = {k: v.to(device) for k, v in q.items()}
            with _autocast(device, spec["dtype"]):
                out = fastmeta.meta_step(teacher, student, b, q, teacher_opt, student_opt, **kwargs)
        step_times.append(watch.total - before)
        losses.append(float(out.student_loss))
        if step % spec["eval_every"] == 0 or step == len(batches):
            history.append(dict(step=step, train_time_s=watch.total,
                                **evaluate(student, data["dev"], pad, device)))
    if device == "cuda":
        mem["peak_bytes"] = common.cuda_peak_bytes()
        mem["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        mem["peak_bytes"] = common.peak_rss_bytes()
        mem["peak_kind"] = "VmHWM (peak RSS) of the method's process" + (
            ", reset after model set-up" if mem["peak_reset_supported"] else "")
        mem["step_memory_bytes"] = mem["peak_bytes"] - mem["rss_before_training_bytes"]
    return {"kind": "method", "method": spec["method"], "history": history,
            "train_time_s": watch.total, "step_times_s": step_times,
            "median_step_s": common.median(step_times), "student_losses": losses,
            "memory": mem}


def _autocast(device: str, dtype: str):
    import contextlib

    import torch

    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    data_path = spec.pop("data_path")
    spec["data"] = torch.load(data_path, weights_only=False)
    result = {"teacher": worker_teacher, "method": worker_method}[spec["kind"]](spec)
    Path(spec["output"]).write_text(json.dumps(result))


# =========================================================================== summary
def summarise(methods: dict[str, Any]) -> dict[str, Any]:
    """Best score, time to best, time to match plain KD's best, per method."""
    out: dict[str, Any] = {}
    kd_best = None
    if "kd" in methods and "error" not in methods["kd"]:
        kd_best = max(h["score"] for h in methods["kd"]["history"])
    for name, res in methods.items():
        if "error" in res:
            out[name] = {"error": res["error"]}
            continue
        hist = res["history"]
        best = max(hist, key=lambda h: (h["score"], -h["step"]))  # earliest among equal bests
        match = next((h for h in hist if kd_best is not None and h["score"] >= kd_best - 1e-12), None)
        out[name] = {
            "best_score": best["score"], "best_accuracy": best["accuracy"], "best_f1": best["f1"],
            "best_step": best["step"], "time_to_best_s": best["train_time_s"],
            "time_to_match_kd_best_s": match["train_time_s"] if match else None,
            "step_matching_kd_best": match["step"] if match else None,
            "total_train_time_s": res["train_time_s"], "median_step_s": res["median_step_s"],
            "peak_bytes": res["memory"]["peak_bytes"],
            "step_memory_bytes": res["memory"].get("step_memory_bytes"),
        }
    kd = out.get("kd")
    for name, s in out.items():
        if "error" in s or not kd or "error" in kd:
            continue
        s["median_step_vs_kd"] = s["median_step_s"] / kd["median_step_s"]
        s["peak_vs_kd"] = s["peak_bytes"] / kd["peak_bytes"]
        if s.get("step_memory_bytes") and kd.get("step_memory_bytes"):
            s["step_memory_vs_kd"] = s["step_memory_bytes"] / kd["step_memory_bytes"]
    return out


def _paper_cell(name: str, key: str) -> str:
    p = PAPER.get(name)
    if not p:
        return "—"
    if key == "time":
        return f"{p['time_min']} min"
    if key == "memory":
        return f"{p['memory_gb']} GB"
    return f"{p['f1']:.1f}/{p['accuracy']:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    env, cfg, summ = report["environment"], report["config"], report["summary"]
    scale = report["scale_note"]
    lines = [f"# Table 4 (ReptileDistil paper) reproduced: {env['device']} ({env['device_name']})", "",
             f"**{scale}**", "",
             f"Measured {env['date_utc']} with `{env['command']}`; torch {env['versions']['torch']}, "
             f"transformers {env['versions']['transformers']}, triton {env['versions']['triton']}, "
             f"python {env['versions']['python']}; {env['worker_threads']} intra-op thread(s) per worker process. {env['note']}", "",
             f"Teacher after fine-tuning: dev F1/acc = {100 * report['teacher']['dev']['f1']:.1f}/"
             f"{100 * report['teacher']['dev']['accuracy']:.1f} ({report['teacher']['steps']} steps, "
             f"{report['teacher']['train_s']:.0f} s). Majority-class baseline on dev: F1/acc = "
             f"{100 * report['data']['majority_baseline']['f1']:.1f}/"
             f"{100 * report['data']['majority_baseline']['accuracy']:.1f}.", ""]
    rows = []
    for name, (label, _) in METHODS.items():
        s = summ.get(name)
        if s is None:
            continue
        if "error" in s:
            rows.append([label, "failed: " + s["error"].strip().splitlines()[-1][:100]] + [None] * 8)
            continue
        mem_col = common.fmt_bytes(s["peak_bytes"])
        if s.get("step_memory_bytes") is not None:
            mem_col += f" (+{common.fmt_bytes(s['step_memory_bytes'])})"
        rows.append([
            label,
            f"{s['time_to_best_s']:.1f} s (step {s['best_step']})", _paper_cell(name, "time"),
            (f"{s['time_to_match_kd_best_s']:.1f} s" if s["time_to_match_kd_best_s"] is not None
             else "never"),
            common.fmt(s.get("median_step_s"), 3) + " s" + (
                f" ({s['median_step_vs_kd']:.2f}x)" if s.get("median_step_vs_kd") else ""),
            mem_col, _paper_cell(name, "memory"),
            f"{100 * s['best_f1']:.1f}/{100 * s['best_accuracy']:.1f}", _paper_cell(name, "score"),
            common.fmt(s.get("peak_vs_kd"), 2, "x"),
        ])
    lines.append(common.markdown_table(
        ["method", "time to best (ours)", "paper", "time to match KD's best", "median step (x KD)",
         "peak mem (ours; + during training)", "paper", "best dev F1/acc (ours)", "paper F1/acc",
         "peak x KD"], rows))
    lines += ["", "Times are cumulative training-step wall time (evaluation excluded). "
              "The paper's figures (V100, BERT-base teacher, batch 4, full MRPC) are beside ours for "
              "reference only: our models, data subset and hardware differ, so compare ratios, "
              "not absolute values. LGTM has no figure in the paper's Table 4 (—). "
              + report["memory_note"], ""]
    lines.append("Dev score per evaluation (step: F1/acc):")
    lines.append("")
    for name, res in report["methods"].items():
        if "error" in res:
            continue
        pts = ", ".join(f"{h['step']}: {100 * h['f1']:.1f}/{100 * h['accuracy']:.1f}" for h in res["history"])
        lines.append(f"- {METHODS[name][0]}: {pts}")
    lines.append("")
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    summ = report["summary"]
    names = [n for n in METHODS if n in summ and "error" not in summ[n]]
    labels = [METHODS[n][0] for n in names]
    kd = summ.get("kd", {})
    env = report["environment"]
    panels = [
        ("median step time, x plain KD", [summ[n].get("median_step_vs_kd") for n in names]),
        ("time to best dev score, x KD's",
         [(summ[n]["time_to_best_s"] / kd["time_to_best_s"]) if kd.get("time_to_best_s") else None
          for n in names]),
        ("peak memory, x plain KD", [summ[n].get("peak_vs_kd") for n in names]),
    ]
    paper_kd = PAPER["kd"]
    paper_names = [n for n in names if n in PAPER]
    if paper_names:
        panels.append(("paper (V100): time to best, x KD",
                       [PAPER[n]["time_min"] / paper_kd["time_min"] if n in PAPER else None for n in names]))
    common.bar_chart_ratios(path, labels, panels,
                            title=f"Table 4 reproduction on {env['device']} ({env['device_name']}): "
                                  + report["scale_short"],
                            footnote=f"{env['date_utc']}; torch {env['versions']['torch']}"
                                     + ("; shared machine, timings noisy" if env.get("shared_machine") else ""))


# =========================================================================== main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.table4", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, choices=["minilm", "bert-base", "tiny"],
                   help="default: minilm on cpu, bert-base on cuda")
    p.add_argument("--teacher", default=None, help="local HF model directory for the teacher")
    p.add_argument("--tokenizer", default=None, help="default: all-MiniLM-L6-v2's (uncased WordPiece)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else None,
                   help="GLUE MRPC TSV folder (default ../shared/data/glue/MRPC when it exists, "
                        "else the datasets hub)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--train-examples", type=int, default=800)
    p.add_argument("--dev-examples", type=int, default=0, help="0 = the full dev split")
    p.add_argument("--quiz-split", type=float, default=0.1)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--teacher-finetune-steps", type=int, default=30)
    p.add_argument("--teacher-finetune-batch-size", type=int, default=16)
    p.add_argument("--teacher-finetune-lr", type=float, default=1e-4)
    p.add_argument("--teacher-lr", type=float, default=1e-5, help="teacher (meta) learning rate")
    p.add_argument("--student-lr", type=float, default=5e-5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--freeze-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze both models' word embeddings during distillation (default: on for cpu, "
                        "where AdamW over the 11.7M-parameter embedding matrices dominated the step)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per worker (default 1: on the shared 2-core machine two OpenMP "
                        "threads stalled at barriers, 2-3x slower and far noisier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolation", choices=["subprocess", "inprocess"], default="subprocess")
    p.add_argument("--worker-timeout", type=float, default=900)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--tag", default=None, help="result file stem (default table4_<device>)")
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
    import torch

    args.model = args.model or ("bert-base" if args.device == "cuda" else "minilm")
    if args.freeze_word_embeddings is None:
        args.freeze_word_embeddings = args.device == "cpu"
    shared = {"auto": None, "yes": True, "no": False}[args.shared_machine]
    env = common.environment_info(args.device, shared_machine=shared)
    env["worker_threads"] = args.threads or env["torch_threads"]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    data = load_data(args)
    log(f"data: {data['source']}; train {data['sizes']['train']} / quiz {data['sizes']['quiz']} / "
        f"dev {data['sizes']['dev']} examples (of {data['sizes']['full_train']} train)")
    base = dict(device=args.device, model=args.model, teacher=args.teacher, attn=args.attn, seed=args.seed,
                threads=args.threads, dtype=args.dtype, freeze_word_embeddings=args.freeze_word_embeddings)
    with tempfile.TemporaryDirectory(prefix="fastmeta-table4-") as tmp:
        data_path = str(Path(tmp) / "data.pt")
        torch.save(data, data_path)
        teacher_state = str(Path(tmp) / "teacher.pt")
        run = _runner(args, data_path)
        t0 = time.perf_counter()
        teacher = run(dict(base, kind="teacher", teacher_state=teacher_state,
                           teacher_finetune_steps=args.teacher_finetune_steps,
                           teacher_finetune_batch_size=args.teacher_finetune_batch_size,
                           teacher_finetune_lr=args.teacher_finetune_lr))
        log(f"teacher fine-tuned: {teacher['steps']} steps in {time.perf_counter() - t0:.0f} s, dev "
            f"F1/acc {100 * teacher['dev']['f1']:.1f}/{100 * teacher['dev']['accuracy']:.1f}")
        methods: dict[str, Any] = {}
        for name in args.methods:
            t0 = time.perf_counter()
            spec = dict(base, kind="method", method=name, teacher_state=teacher_state,
                        batch_size=args.batch_size, steps=args.steps, eval_every=args.eval_every,
                        teacher_lr=args.teacher_lr, student_lr=args.student_lr,
                        temperature=args.temperature, kd_weight=args.kd_weight)
            try:
                methods[name] = run(spec)
            except common.WorkerError as exc:
                methods[name] = {"method": name, "error": str(exc)}
                log(f"{name}: FAILED\n{exc}")
                continue
            best = max(h["score"] for h in methods[name]["history"])
            log(f"{name}: {time.perf_counter() - t0:.0f} s, median step "
                f"{methods[name]['median_step_s']:.3f} s, best (F1+acc)/2 {100 * best:.1f}, peak "
                f"{common.fmt_bytes(methods[name]['memory']['peak_bytes'])}")
    env["load_average_at_end"] = common.load_average()
    scale_short = (f"{args.model}, {data['sizes']['train']} train ex., seq<={args.max_seq_length}, "
                   f"bs {args.batch_size}, {args.steps} steps")
    if args.device == "cpu":
        scale = (f"Scaled-down CPU reproduction, not the paper's setting: teacher {args.model} "
                 f"({'all-MiniLM-L6-v2, 6L/384' if args.model == 'minilm' else args.model}) fine-tuned "
                 f"{args.teacher_finetune_steps} steps (bs {args.teacher_finetune_batch_size}) on the train "
                 f"subset; student = its first {STUDENT_LAYERS[args.model]} layers; MRPC train subset of "
                 f"{data['sizes']['train']} examples (+{data['sizes']['quiz']} quiz, 10% split as in "
                 f"MetaDistil, used by every method), full dev ({data['sizes']['dev']}); max seq length "
                 f"{args.max_seq_length} (dynamic padding); batch size {args.batch_size}; {args.steps} "
                 f"training steps per method, dev evaluation every {args.eval_every} steps; "
                 f"{args.dtype}.")
    else:
        scale = (f"GPU run: teacher {args.model}, student its first {STUDENT_LAYERS[args.model]} layers, "
                 f"{data['sizes']['train']} train examples, batch {args.batch_size}, {args.steps} steps, "
                 f"{args.dtype}.")
    report = {
        "benchmark": "table4",
        "environment": env,
        "scale_note": scale,
        "scale_short": scale_short,
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "data": {k: data[k] for k in ("source", "task", "sizes", "majority_baseline")},
        "methods_meta_step_kwargs": {k: v[1] for k, v in METHODS.items()},
        "paper": PAPER,
        "paper_note": "Table 4 of the ReptileDistil paper: MRPC, BERT-base teacher, batch 4, V100; "
                      "score pair read as F1/accuracy; LGTM has no figure there.",
        "memory_note": ("Peak memory on CPU: peak RSS (VmHWM) of one fresh process per method, reset "
                        "after model set-up (it includes the models, optimizer state and interpreter); "
                        "'+' = the increase over the RSS just before training."
                        if args.device == "cpu" else
                        "Peak memory on GPU: torch.cuda.max_memory_allocated over training."),
        "teacher": teacher,
        "methods": methods,
        "summary": summarise(methods),
        "total_wall_s": time.perf_counter() - t_start,
    }
    out_dir = Path(args.out_dir)
    stem = args.tag or f"table4_{args.device}"
    common.write_json(out_dir / f"{stem}.json", report)
    md = render_markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    render_chart(report, out_dir / f"{stem}.png")
    print(md)
    print(f"wrote {out_dir / stem}.{{json,md,png}} in {report['total_wall_s']:.0f} s")
    return report


def _runner(args, data_path: str):
    if args.isolation == "subprocess":
        return lambda spec: common.run_worker("bench.table4", dict(spec, data_path=data_path),
                                              timeout=args.worker_timeout)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def in_process(spec):
        import torch

        spec = dict(spec, data=torch.load(data_path, weights_only=False))
        return {"teacher": worker_teacher, "method": worker_method}[spec["kind"]](spec)
    return in_process


if __name__ == "__main__":
    main()
