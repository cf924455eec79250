"""``python -m bench.table4``: Table 4 of the ReptileDistil paper, reproduced side by side.

Table 4 compares, on MRPC with a BERT-base teacher, batch 4, on a V100, the
training time to the best dev score, the peak memory and the best dev scores of
plain KD, MetaDistil and ReptileDistil.  This command trains, from the SAME
fine-tuned teacher and the SAME student initialisation, on the same batches
(rows say what they are: every row but the higher one is ``fastmeta.meta_step``):

==============================  ===================================================================
``kd``                          plain KD                                  (meta_step algorithm="kd")
``metadistil_fastmeta``         MetaDistil, fastmeta exact                (algorithm="metadistil", hypergrad="exact")
``metadistil_double_backward``  MetaDistil, double backward (fastmeta)    (hypergrad="autograd": fastmeta's own
                                double backward through the pilot step; ``metadistil_official`` is its old name)
``metadistil_higher``           MetaDistil, higher (closest stand-in for the official recipe): the step written with
                                ``higher.innerloop_ctx`` (``bench/peers.py``), double backward through a patched
                                student as the official code's hand-written functional BERT does; the paper's
                                MetaDistil figures sit beside this row; needs ``pip install .[bench]``
``reptile``                     ReptileDistil (fastmeta)                  (algorithm="reptile")
``lgtm_finite_diff``            LGTM, finite difference as in its paper   (algorithm="lgtm", hypergrad="finite_diff")
``lgtm_fastmeta``               LGTM, fastmeta exact                      (hypergrad="exact")
``ikd``                         IKD, first order as in its paper (Eq. 14) (algorithm="ikd", hypergrad="first_order")
==============================  ===================================================================

and reports, per method: training time to its best dev score (cumulative
wall time of the training steps, evaluation excluded), training time to first
match plain KD's best dev score, peak memory, best dev F1/accuracy -- each beside
the paper's figure (KD 10 min / 3.7 GB / 90.0/86.5; MetaDistil 31 min / 11.4 GB /
91.1/86.8; ReptileDistil 22 min / 8.1 GB / 91.6/87.7; LGTM and IKD have no figure in
that table).  A dev score reached while the student predicts ONE class for every
dev example is printed as ``majority class (acc x%)`` (or ``one class only``), not as
the method's score, and the best score with both classes predicted is reported
beside it (``never`` when the student never left the majority class).

Default (``--device cpu``, the "quick" run): a SCALED-DOWN CPU reproduction with small
real models -- teacher = all-MiniLM-L6-v2 (6 layers, hidden 384) fine-tuned briefly
on the task ONCE (its state is cached and every method starts from it), student = the
fine-tuned teacher's first 2 layers; a subset of MRPC's train split (720 + 80 quiz),
real text, 30 steps per method, dev = the full MRPC dev split (408).  It measures the
time and memory columns; in 30 steps no student leaves the majority class, which the
table says.  One fresh subprocess per method, so each peak RSS is that method's alone.

``--preset scores``: trains long enough for the score columns to mean something, in
<= 60 minutes on 2 idle cores (two methods at a time, one core each: ``--parallel 2``):
the teacher fine-tuned on the full MRPC train split (3,301 examples after the 10 %
quiz split) for 400 steps of batch 16 (lr 1e-4); then six methods -- KD, MetaDistil
exact, MetaDistil with higher, ReptileDistil, LGTM exact, IKD -- each 400 steps of
batch 8 (student lr 2e-4, teacher lr 2e-5, T = 2, KD weight 0.5), dev evaluation
every 25 steps, each method's training capped at 12 minutes (a capped method says
so).  Results ``bench/results/table4_scores_cpu.{json,md,png}`` beside the quick
ones (``table4_cpu.*``).  Command::

    .venv/bin/python -m bench.table4 --preset scores

Any option given on the command line overrides the preset's value.

``--device cuda``: BERT-base-sized teacher (12L, 768, randomly initialised unless
``--teacher`` names a local model directory) -> 6-layer student for the time and
memory columns; refuses clearly when CUDA is not available.

``--teacher-state PATH``: reuse a fine-tuned teacher (saved there by an earlier run
with the same data, model and fine-tuning settings; fine-tuned and saved when absent).

Results: ``bench/results/table4_<device>.{json,md,png}`` (``table4_<preset>_<device>``
with a preset).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

METHODS = {
    # name: (label, how the step is made: meta_step kwargs, or {"peer": library} for bench/peers.py)
    "kd": ("plain KD", dict(algorithm="kd")),
    "metadistil_fastmeta": ("MetaDistil, fastmeta exact", dict(algorithm="metadistil", hypergrad="exact")),
    "metadistil_double_backward": ("MetaDistil, double backward (fastmeta)",
                                   dict(algorithm="metadistil", hypergrad="autograd")),
    "metadistil_higher": ("MetaDistil, higher (closest stand-in for the official recipe)", dict(peer="higher")),
    "reptile": ("ReptileDistil (fastmeta)", dict(algorithm="reptile", hypergrad="first_order")),
    "lgtm_finite_diff": ("LGTM, finite difference as in its paper (fastmeta)",
                         dict(algorithm="lgtm", hypergrad="finite_diff")),
    "lgtm_fastmeta": ("LGTM, fastmeta exact", dict(algorithm="lgtm", hypergrad="exact")),
    "ikd": ("IKD, first order as in its paper (fastmeta)", dict(algorithm="ikd", hypergrad="first_order")),
}
ALIASES = {"metadistil_official": "metadistil_double_backward"}  # the row's earlier, misleading name

# Table 4 of the ReptileDistil paper (MRPC, BERT-base teacher, batch 4, V100).
# The score pair is MRPC's GLUE pair; we read it as F1/accuracy (F1 > accuracy on MRPC).  The paper's
# MetaDistil ran the official code: its figures sit beside the closest stand-in, the higher row.
PAPER = {
    "kd": dict(time_min=10, memory_gb=3.7, f1=90.0, accuracy=86.5),
    "metadistil_higher": dict(time_min=31, memory_gb=11.4, f1=91.1, accuracy=86.8),
    "reptile": dict(time_min=22, memory_gb=8.1, f1=91.6, accuracy=87.7),
}

# ``--preset NAME``: defaults for a purpose (options given on the command line win).  See the module docstring.
PRESETS: dict[str, dict[str, Any]] = {
    "scores": dict(
        train_examples=0,  # the full train split (3,668 -> 3,301 train + 367 quiz)
        teacher_finetune_steps=400, teacher_finetune_batch_size=16, teacher_finetune_lr=1e-4,
        batch_size=8, steps=400, eval_every=25, student_lr=2e-4, teacher_lr=2e-5,
        methods=["kd", "metadistil_fastmeta", "metadistil_higher", "reptile", "lgtm_fastmeta", "ikd"],
        parallel=2, method_time_cap_s=720.0,
    ),
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
    train = train[: args.train_examples] if args.train_examples else train
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
        "majority_label": _majority_label([e.label for e in split.train]),
    }


def _majority_label(labels) -> int:
    counts: dict[int, int] = {}
    for y in labels:
        counts[int(y)] = counts.get(int(y), 0) + 1
    return max(sorted(counts), key=lambda k: counts[k])


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
    classes = sorted(set(preds))
    return {"accuracy": float(m["accuracy"]), "f1": float(m["f1"]),
            "score": float(m["combined_score"]),
            # the student predicts one class for every example: its score is that class's, not the method's
            "single_class": classes[0] if len(classes) == 1 else None,
            "predicted_positive": sum(1 for p in preds if p == 1)}


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
    how = METHODS[spec["method"]][1]
    if "peer" in how:  # the step written with a peer library (bench/peers.py)
        from bench import peers

        stepper = peers.make_peer(how["peer"], teacher, student, teacher_opt, student_opt,
                                  temperature=spec["temperature"], kd_weight=spec["kd_weight"])

        def train_step(b, q):
            return stepper.step(b, q)["student_loss"]
    else:
        kwargs = dict(how, temperature=spec["temperature"], kd_weight=spec["kd_weight"])

        def train_step(b, q):
            return fastmeta.meta_step(teacher, student, b, q, teacher_opt, student_opt, **kwargs).student_loss
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
    cap = spec.get("method_time_cap_s") or None
    stopped = None
    t_wall = time.perf_counter()
    for step, (b, q) in enumerate(zip(batches, quizzes), start=1):
        before = watch.total
        with watch:
            b = {k: v.to(device) for k, v in b.items()}
            q = {k: v.to(device) for k, v in q.items()}
            with _autocast(device, spec["dtype"]):
                loss = train_step(b, q)
            common.free_grads(teacher_opt, student_opt)  # as a training loop does after each step
        step_times.append(watch.total - before)
        losses.append(float(loss))
        capped = cap is not None and watch.total >= cap and step < len(batches)
        if step % spec["eval_every"] == 0 or step == len(batches) or capped:
            history.append(dict(step=step, train_time_s=watch.total,
                                **evaluate(student, data["dev"], pad, device)))
        if capped:
            stopped = f"training-time cap of {cap:.0f} s reached after step {step} of {len(batches)}"
            break
    if device == "cuda":
        mem["peak_bytes"] = common.cuda_peak_bytes()
        mem["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        mem["peak_bytes"] = common.peak_rss_bytes()
        mem["peak_kind"] = "VmHWM (peak RSS) of the method's process" + (
            ", reset after model set-up" if mem["peak_reset_supported"] else "")
        mem["step_memory_bytes"] = mem["peak_bytes"] - mem["rss_before_training_bytes"]
    return {"kind": "method", "method": spec["method"], "history": history,
            "train_time_s": watch.total, "wall_s": time.perf_counter() - t_wall, "step_times_s": step_times,
            "median_step_s": common.median(step_times), "student_losses": losses,
            "steps_done": len(step_times), "stopped_early": stopped, "memory": mem}


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
def _best(hist: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The method's best evaluation: the best (earliest among equals) at which the student predicts both
    classes; only when it never does, the best one-class evaluation (flagged: that score is the class's)."""
    two = [h for h in hist if h.get("single_class") is None]
    pool = two or hist
    return max(pool, key=lambda h: (h["score"], -h["step"])), not two


def summarise(methods: dict[str, Any]) -> dict[str, Any]:
    """Best score (see :func:`_best`), time to best, time to match plain KD's best, per method."""
    out: dict[str, Any] = {}
    kd_best = kd_two_class = None
    if "kd" in methods and "error" not in methods["kd"]:
        kd_h, kd_one = _best(methods["kd"]["history"])
        kd_best, kd_two_class = kd_h["score"], not kd_one
    for name, res in methods.items():
        if "error" in res:
            out[name] = {"error": res["error"]}
            continue
        hist = res["history"]
        best, one_class = _best(hist)
        eligible = [h for h in hist if not kd_two_class or h.get("single_class") is None]
        match = next((h for h in eligible if kd_best is not None and h["score"] >= kd_best - 1e-12), None)
        first_two = next((h for h in hist if h.get("single_class") is None), None)
        out[name] = {
            "best_score": best["score"], "best_accuracy": best["accuracy"], "best_f1": best["f1"],
            "best_step": best["step"], "time_to_best_s": best["train_time_s"],
            "best_single_class": best.get("single_class") if one_class else None,
            "left_one_class_at_step": first_two["step"] if first_two else None,
            "left_one_class_at_s": first_two["train_time_s"] if first_two else None,
            "time_to_match_kd_best_s": match["train_time_s"] if match else None,
            "step_matching_kd_best": match["step"] if match else None,
            "total_train_time_s": res["train_time_s"], "median_step_s": res["median_step_s"],
            "steps_done": res.get("steps_done", len(res.get("step_times_s", [])) or None),
            "stopped_early": res.get("stopped_early"),
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
    env, summ = report["environment"], report["summary"]
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
    majority = report["data"].get("majority_label")
    rows = []
    for name, (label, _) in METHODS.items():
        s = summ.get(name)
        if s is None:
            continue
        if "error" in s:
            rows.append([label, "failed: " + s["error"].strip().splitlines()[-1][:100]] + [None] * 9)
            continue
        mem_col = common.fmt_bytes(s["peak_bytes"])
        if s.get("step_memory_bytes") is not None:
            mem_col += f" (+{common.fmt_bytes(s['step_memory_bytes'])})"
        if s.get("stopped_early"):
            label += f" [stopped by the time cap after {s.get('steps_done')} steps]"
        rows.append([
            label,
            f"{s['time_to_best_s']:.1f} s (step {s['best_step']})", _paper_cell(name, "time"),
            (f"{s['time_to_match_kd_best_s']:.1f} s" if s["time_to_match_kd_best_s"] is not None
             else "never"),
            common.fmt(s.get("median_step_s"), 3) + " s" + (
                f" ({s['median_step_vs_kd']:.2f}x)" if s.get("median_step_vs_kd") else ""),
            mem_col, _paper_cell(name, "memory"),
            score_cell(s, majority), _paper_cell(name, "score"),
            (f"step {s['left_one_class_at_step']} ({s['left_one_class_at_s']:.0f} s)"
             if s.get("left_one_class_at_step") is not None else "never"),
            common.fmt(s.get("peak_vs_kd"), 2, "x"),
        ])
    lines.append(common.markdown_table(
        ["method", "time to best (ours)", "paper", "time to match KD's best", "median step (x KD)",
         "peak mem (ours; + during training)", "paper", "best dev F1/acc (ours)", "paper F1/acc",
         "first predicts both classes", "peak x KD"], rows))
    lines += ["", "Times are cumulative training-step wall time (evaluation excluded). "
              "A method's best dev score is its best evaluation at which the student predicts both classes; "
              "a student that predicted one class for every dev example at all its evaluations has only that "
              "class's score, printed as 'majority class (acc x%)'. "
              "The paper's figures (V100, BERT-base teacher, batch 4, full MRPC) are beside ours for "
              "reference only: our models, data and hardware differ, so compare ratios, "
              "not absolute values. LGTM and IKD have no figure in the paper's Table 4 (—); the paper's "
              "MetaDistil (its official code) sits beside the higher row, the closest stand-in for that recipe. "
              + report["memory_note"], ""]
    lines.append("Dev score per evaluation (step: F1/acc; 'M' = the student predicted the majority class for "
                 "every dev example, '1' / '0' = that one class):")
    lines.append("")
    for name, res in report["methods"].items():
        if "error" in res:
            continue
        pts = ", ".join(f"{h['step']}: {100 * h['f1']:.1f}/{100 * h['accuracy']:.1f}" + _one_class_mark(h, majority)
                        for h in res["history"])
        lines.append(f"- {METHODS[name][0]}: {pts}")
    lines.append("")
    return "\n".join(lines)


def _one_class_mark(h: dict[str, Any], majority: int | None) -> str:
    c = h.get("single_class")
    if c is None:
        return ""
    return " M" if c == majority else f" {c}"


def score_cell(s: dict[str, Any], majority: int | None) -> str:
    """F1/acc, or what a one-class score is."""
    c = s.get("best_single_class")
    if c is None:
        return f"{100 * s['best_f1']:.1f}/{100 * s['best_accuracy']:.1f}"
    if c == majority:
        return f"majority class (acc {100 * s['best_accuracy']:.1f}%)"
    return f"one class only: {c} (acc {100 * s['best_accuracy']:.1f}%)"


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
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="scores: train long enough for the score columns to mean something (<= 60 min on 2 idle "
                        "cores; see the module docstring); options given here override the preset's")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + list(ALIASES))
    p.add_argument("--train-examples", type=int, default=800, help="0 = the full train split")
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
    p.add_argument("--parallel", type=int, default=1,
                   help="methods trained side by side, one worker process each (2 on an idle 2-core machine with "
                        "--threads 1: one core per method)")
    p.add_argument("--method-time-cap-s", type=float, default=0.0,
                   help="stop a method's training once its training time passes this (0 = none); a capped method "
                        "is marked in the table")
    p.add_argument("--teacher-state", default=None,
                   help="file of a fine-tuned teacher to reuse (written there when absent, with its settings "
                        "beside it in <file>.json; reused only when they match)")
    p.add_argument("--worker-timeout", type=float, default=3600)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--tag", default=None, help="result file stem (default table4_<device>, "
                                               "table4_<preset>_<device> with a preset)")
    p.add_argument("--shared-machine", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    first, _ = p.parse_known_args(argv)
    if first.preset:
        p.set_defaults(**PRESETS[first.preset])
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(ALIASES.get(m, m) for m in args.methods))
    return args


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
    out_dir = Path(args.out_dir)
    stem = args.tag or (f"table4_{args.preset}_{args.device}" if args.preset else f"table4_{args.device}")
    methods: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fastmeta-table4-") as tmp:
        data_path = str(Path(tmp) / "data.pt")
        torch.save(data, data_path)
        run = _runner(args, data_path)
        teacher_state, teacher = _teacher(args, base, data, run, Path(tmp), log)

        def one(name: str) -> tuple[str, dict[str, Any], float]:
            t0 = time.perf_counter()
            spec = dict(base, kind="method", method=name, teacher_state=teacher_state,
                        batch_size=args.batch_size, steps=args.steps, eval_every=args.eval_every,
                        teacher_lr=args.teacher_lr, student_lr=args.student_lr,
                        temperature=args.temperature, kd_weight=args.kd_weight,
                        method_time_cap_s=args.method_time_cap_s)
            try:
                return name, run(spec), time.perf_counter() - t0
            except common.WorkerError as exc:
                return name, {"method": name, "error": str(exc)}, time.perf_counter() - t0

        def done(name: str, res: dict[str, Any], seconds: float) -> None:
            methods[name] = res
            if "error" in res:
                log(f"{name}: FAILED\n{res['error']}")
            else:
                s = summarise({name: res})[name]
                log(f"{name}: {seconds:.0f} s, {res['steps_done']} steps, median step {res['median_step_s']:.3f} s, "
                    f"best dev F1/acc {score_cell(s, data['majority_label'])} at step {s['best_step']}, peak "
                    f"{common.fmt_bytes(res['memory']['peak_bytes'])}"
                    + (f"; {res['stopped_early']}" if res.get("stopped_early") else ""))
            partial = make_report(args, env, data, teacher, {n: methods[n] for n in args.methods if n in methods},
                                  time.perf_counter() - t_start)
            partial["partial"] = True
            common.write_json(out_dir / f"{stem}.json", partial)

        if args.parallel > 1 and args.isolation == "subprocess":
            from concurrent.futures import ThreadPoolExecutor, as_completed

            log(f"{len(args.methods)} methods, {args.parallel} at a time (one worker process each)")
            with ThreadPoolExecutor(max_workers=args.parallel) as pool:
                for fut in as_completed([pool.submit(one, name) for name in args.methods]):
                    done(*fut.result())
        else:
            for name in args.methods:
                done(*one(name))
    env["load_average_at_end"] = common.load_average()
    report = make_report(args, env, data, teacher, {n: methods[n] for n in args.methods},
                         time.perf_counter() - t_start)
    common.write_json(out_dir / f"{stem}.json", report)
    md = render_markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    render_chart(report, out_dir / f"{stem}.png")
    print(md)
    print(f"wrote {out_dir / stem}.{{json,md,png}} in {report['total_wall_s']:.0f} s")
    return report


def _teacher(args, base: dict[str, Any], data: dict[str, Any], run, tmp: Path, log):
    """Fine-tune the teacher once (or reuse ``--teacher-state`` when its settings match); (state path, result)."""
    settings = dict(model=args.model, teacher=args.teacher, tokenizer=args.tokenizer, attn=args.attn, seed=args.seed,
                    data_source=data["source"], sizes=data["sizes"], max_seq_length=args.max_seq_length,
                    quiz_split=args.quiz_split, steps=args.teacher_finetune_steps,
                    batch_size=args.teacher_finetune_batch_size, lr=args.teacher_finetune_lr, device=args.device)
    if args.teacher_state:
        path = Path(args.teacher_state)
        meta_path = path.with_name(path.name + ".json")
        if path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("settings") == json.loads(json.dumps(settings)):
                log(f"teacher: reusing {path} (dev F1/acc {100 * meta['result']['dev']['f1']:.1f}/"
                    f"{100 * meta['result']['dev']['accuracy']:.1f})")
                return str(path), dict(meta["result"], reused_from=str(path))
            log(f"teacher: {path} was fine-tuned with other settings: fine-tuning again")
    else:
        path, meta_path = tmp / "teacher.pt", None
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the teacher is fine-tuned alone: it may use every core the methods will share
    teacher = run(dict(base, kind="teacher", teacher_state=str(path), threads=args.threads * max(args.parallel, 1),
                       teacher_finetune_steps=args.teacher_finetune_steps,
                       teacher_finetune_batch_size=args.teacher_finetune_batch_size,
                       teacher_finetune_lr=args.teacher_finetune_lr))
    log(f"teacher fine-tuned: {teacher['steps']} steps in {time.perf_counter() - t0:.0f} s, dev "
        f"F1/acc {100 * teacher['dev']['f1']:.1f}/{100 * teacher['dev']['accuracy']:.1f}")
    if meta_path is not None:
        meta_path.write_text(json.dumps({"settings": settings, "result": teacher}, indent=1))
    return str(path), teacher


def make_report(args, env, data, teacher, methods, wall_s: float) -> dict[str, Any]:
    scale_short = (f"{args.model}, {data['sizes']['train']} train ex., seq<={args.max_seq_length}, "
                   f"bs {args.batch_size}, {args.steps} steps")
    if args.device == "cpu":
        scale = (f"Scaled-down CPU reproduction, not the paper's setting{f' (preset {args.preset})' if args.preset else ''}: "
                 f"teacher {args.model} "
                 f"({'all-MiniLM-L6-v2, 6L/384' if args.model == 'minilm' else args.model}) fine-tuned "
                 f"{args.teacher_finetune_steps} steps (bs {args.teacher_finetune_batch_size}, lr "
                 f"{args.teacher_finetune_lr:g}) on the train split; student = its first {STUDENT_LAYERS[args.model]} "
                 f"layers; MRPC train {'split' if not args.train_examples else 'subset'} of "
                 f"{data['sizes']['train']} examples (+{data['sizes']['quiz']} quiz, 10% split as in "
                 f"MetaDistil, used by every method), full dev ({data['sizes']['dev']}); max seq length "
                 f"{args.max_seq_length} (dynamic padding); batch size {args.batch_size}; {args.steps} "
                 f"training steps per method (student lr {args.student_lr:g}, teacher lr {args.teacher_lr:g}, "
                 f"T {args.temperature:g}, KD weight {args.kd_weight:g})"
                 + (f", each capped at {args.method_time_cap_s:.0f} s of training" if args.method_time_cap_s else "")
                 + f", dev evaluation every {args.eval_every} steps; {args.dtype}"
                 + (f"; {args.parallel} methods at a time, one worker process each" if args.parallel > 1 else "")
                 + ".")
    else:
        scale = (f"GPU run: teacher {args.model}, student its first {STUDENT_LAYERS[args.model]} layers, "
                 f"{data['sizes']['train']} train examples, batch {args.batch_size}, {args.steps} steps, "
                 f"{args.dtype}.")
    return {
        "benchmark": "table4",
        "preset": args.preset,
        "environment": env,
        "scale_note": scale,
        "scale_short": scale_short,
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "data": {k: data[k] for k in ("source", "task", "sizes", "majority_baseline", "majority_label")},
        "methods_meta_step_kwargs": {k: v[1] for k, v in METHODS.items()},
        "method_labels": {k: v[0] for k, v in METHODS.items()},
        "paper": PAPER,
        "paper_note": "Table 4 of the ReptileDistil paper: MRPC, BERT-base teacher, batch 4, V100; "
                      "score pair read as F1/accuracy; LGTM and IKD have no figure there; the paper's MetaDistil "
                      "(official code) is compared with the higher row.",
        "memory_note": ("Peak memory on CPU: peak RSS (VmHWM) of one fresh process per method, reset "
                        "after model set-up (it includes the models, optimizer state and interpreter); "
                        "'+' = the increase over the RSS just before training."
                        if args.device == "cpu" else
                        "Peak memory on GPU: torch.cuda.max_memory_allocated over training."),
        "teacher": teacher,
        "methods": methods,
        "summary": summarise(methods),
        "total_wall_s": wall_s,
    }


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
