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
- the floor of a MetaDistil step: the necessary passes -- teacher
  forward+backward, teacher forward (for the real step), student
  forward+backward x2 (pilot, real step), quiz forward+backward, one student
  JVP -- plus the necessary optimizer updates -- the teacher's update x1 and
  the student's update x1 (the optimizers' own ``step()``; the pilot's update
  is part of the meta-gradient, not an optimizer update of the floor) -- each
  timed alone in the same run; ``time_vs_floor`` = step time / their sum;
- the exact step's other student tangent (``--student-tangents double_vjp``, the default; fp32
  settings only: under autocast it would also change the tangent's precision):
  rows ``{"algorithm": "metadistil" | "lgtm", "hypergrad": "exact", "student_tangent":
  "double_vjp"}`` (the tangent back-propagated through the pilot's kept graph instead of
  the forward-mode JVP: faster at large batches, more memory); fastmeta's default rows have
  ``"student_tangent": null`` (``"jvp"``);
- the exact MetaDistil step with the teacher's graph recomputed (``--teacher-graphs recompute``,
  the default): rows ``{"algorithm": "metadistil", "hypergrad": "exact", "teacher_graph":
  "recompute"}`` (no teacher graph alive through the student's passes, one more teacher
  forward: less memory, more time); fastmeta's default rows have ``"teacher_graph": null``
  (``"keep"``);
- both together (``--combined-variants``, the default): the exact MetaDistil row with each
  student tangent and each teacher graph above at once, e.g. ``{"student_tangent": "double_vjp",
  "teacher_graph": "recompute"}`` (the kept pilot graph no longer lives beside the teacher's);
- peers (``--peers higher torchopt``, the default): the same MetaDistil step
  written the way a user of ``higher`` and of TorchOpt writes it
  (``bench/peers.py``: same models, batch, optimizers, KD loss), as rows
  ``{"algorithm": "metadistil", "hypergrad": "autograd", "peer": "higher" |
  "torchopt", ...}`` with the same fields and ratios (``time_vs_autograd`` is
  against fastmeta's own ``metadistil/autograd``).  A peer that is not
  installed (``pip install .[bench]``) is a row with ``"skipped": "not
  installed: ..."``, one that fails a row with ``"error"``: never faked.
  fastmeta's own rows have ``"peer": null``.

Configurations:

- ``--device cpu`` (default): small real models -- teacher = all-MiniLM-L6-v2
  (6 layers, hidden 384) with a 2-class head, student = its first 2 layers;
  seq 128, batch 4.  Meant to finish in a few minutes on 2 cores.
- ``--device cuda``: BERT-base-sized teacher (12 layers, hidden 768, randomly
  initialised: speed and memory do not depend on the weights) -> 6-layer
  student, seq 128, batch 4 and 32, fp32 and bf16 autocast.  Refuses clearly
  when CUDA is not available.
- ``--model tiny``: a randomly initialised 2-layer hidden-32 BERT (tests/smoke).
- ``--model bert-base-thin``: BERT-base's structure (12 layers, 201 parameter tensors -> 6
  layers, 105) at hidden 24, vocab 1000, seq 16: the ops are tiny, so on a CPU a step costs about what its host
  side (Python, dispatch, checks) costs at BERT-base on a GPU, where bs 4 is host-bound.

On CUDA all configurations run in one process by default (``--isolation inprocess``: the
models of a setting are built once on CPU and deep-copied per configuration, everything of
the previous configuration is freed and ``max_memory_allocated`` is reset before each one;
fresh processes would pay CUDA start-up each time).  ``--priority kd metadistil/exact ...``
runs those configurations of every setting first; ``--deadline``/``--time-budget-s`` stop
starting new ones (the rest is reported "skipped (time)"; the JSON is rewritten after each
item, so what ran is kept).  ``--replot JSON`` redraws the markdown and PNG of a result file
(e.g. one measured where matplotlib was missing).

Noisy machines: ``--rounds R`` (CPU default 2, with ``--repeats 2``) runs every
configuration R times, interleaved (round 1 of all configurations and the floor, then
round 2, ...), each time in a fresh worker with its own warm-up; a row's median is over
all its timed steps, its memory the largest of its rounds.  A slow spell of a shared
machine then hits every configuration alike instead of whichever ran during it.

Results: ``bench/results/meta_step_<device>.{json,md,png}`` (``--out-dir`` to
change).
"""
from __future__ import annotations

import argparse
import json
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
                        "student = its first 2 layers", student_layers=2, seq_len=128),
    "bert-base": dict(desc="teacher BERT-base config (12L, hidden 768, random init) -> "
                           "6-layer student (first 6 layers)", student_layers=6, seq_len=128),
    "tiny": dict(desc="random tiny BERT (2L, hidden 32, vocab 1000) -> 1-layer student",
                 student_layers=1, seq_len=16),
    "bert-base-thin": dict(desc="teacher with BERT-base's structure at hidden 24 (12L, 12 heads, vocab 1000, "
                                "201 parameter tensors, random init) -> 6-layer student: every op is small, so a "
                                "step's time is mostly its host overhead (Python, dispatch), the share that bounds "
                                "a BERT-base step on a GPU at small batch", student_layers=6, seq_len=16),
}


# What the floor holds (the words): every necessary pass and every necessary optimizer update
# of a MetaDistil step, each timed alone in the same run; the sum.  The pilot step's update is not an
# optimizer update of the floor: it is part of the meta-gradient (fastmeta: the fused pilot op).
FLOOR_DEFINITION = (
    "floor = teacher forward+backward (logits cotangent) + teacher forward (no graph, for the real step) "
    "+ student forward+backward x2 (pilot, real step) + quiz forward+backward (student) + one student JVP "
    "(forward-mode AD on dual tensors, math attention) + teacher optimizer update x1 + student optimizer update x1 "
    "({optimizer}, the optimizers' own step()), each timed alone in this run, medians summed")

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
    elif model == "bert-base-thin":  # BERT-base's modules and parameter tensors, each op tiny
        config = BertConfig(vocab_size=1000, hidden_size=24, num_attention_heads=12, intermediate_size=96,
                            num_labels=2, **extra)
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


# In-process runs (``--isolation inprocess``, the default on CUDA) build the models of a
# setting once on CPU and give every configuration fresh deep copies: a random BERT-base
# takes seconds to initialise, a copy a fraction of that.
_MODEL_CACHE: dict[tuple, tuple] = {}


def _models(spec: dict[str, Any]):
    key = (spec["model"], spec["seed"], spec["attn"], spec.get("dropout"))
    if not spec.get("cache_models"):
        return build_models(spec["model"], seed=spec["seed"], attn=spec["attn"], dropout=spec.get("dropout"))
    import copy

    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = build_models(spec["model"], seed=spec["seed"], attn=spec["attn"],
                                         dropout=spec.get("dropout"))
    teacher, student = _MODEL_CACHE[key]
    return copy.deepcopy(teacher), copy.deepcopy(student)


def _setup(spec: dict[str, Any]):
    import torch

    device = spec["device"]
    torch.manual_seed(spec["seed"])
    teacher, student = _models(spec)
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
    """Time one training step configuration: ``fastmeta.meta_step(algorithm, hypergrad)``, or, with
    ``spec["peer"]``, the MetaDistil step of that peer library (``bench/peers.py``)."""
    import torch

    peer = spec.get("peer")
    row: dict[str, Any] = {"kind": "step", "algorithm": spec["algorithm"], "hypergrad": spec.get("hypergrad"),
                           "peer": peer, **variant_fields(spec.get("variant"))}
    if peer is not None:
        from bench import peers

        info = peers.availability(peer)
        if not info["available"]:
            return dict(row, skipped=info["reason"])
        row["peer_version"] = info["version"]
    device = spec["device"]
    teacher, student, batch, quiz, teacher_opt, student_opt = _setup(spec)
    phase_records: list[dict[str, float]] = []
    if peer is None:
        import fastmeta

        kwargs: dict[str, Any] = dict(algorithm=spec["algorithm"], temperature=spec["temperature"],
                                      kd_weight=spec["kd_weight"])
        if spec.get("hypergrad") is not None:
            kwargs["hypergrad"] = spec["hypergrad"]
        if spec.get("inner_lr") is not None:
            kwargs["inner_lr"] = spec["inner_lr"]
        kwargs.update({k: v for k, v in variant_fields(spec.get("variant")).items() if v is not None})
        kwargs.update(spec.get("algorithm_options") or {})

        def run_step():
            out = fastmeta.meta_step(teacher, student, batch, quiz, teacher_opt, student_opt, **kwargs)
            timings = getattr(out, "timings", None)
            if isinstance(timings, dict):
                phase_records.append({k: float(v) for k, v in timings.items() if isinstance(v, (int, float))})
    else:
        if spec["algorithm"] != "metadistil":
            raise ValueError(f"peer rows are MetaDistil steps, got algorithm={spec['algorithm']!r}")
        stepper = peers.make_peer(peer, teacher, student, teacher_opt, student_opt,
                                  temperature=spec["temperature"], kd_weight=spec["kd_weight"])

        def run_step():
            stepper.step(batch, quiz)

    def step():
        with _autocast(device, spec["dtype"]):
            run_step()
        common.free_grads(teacher_opt, student_opt)  # as a training loop does after each step

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
    if spec.get("phase_memory") and peer is None:  # one more step, untimed: where the peak is
        try:
            with common.phase_peaks(device) as peaks:
                step()
            row["phase_peak_bytes"] = peaks
        except Exception as exc:  # noqa: BLE001  (the timed steps stand; say why this part is missing)
            row["phase_peak_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if spec.get("tensor_memory") and device == "cpu":  # two more steps under torch.profiler: live tensors
        try:
            peaks, before = common.phase_tensor_peaks(step, step)  # a warm-up step, then the one measured
            top = max(peaks.values(), default=0)
            row["tensor_memory"] = {"before_bytes": before, "step_bytes": top, "peak_bytes": before + top,
                                    "phase_peak_bytes": peaks}
        except Exception as exc:  # noqa: BLE001  (the timed steps stand; say why this part is missing)
            row["tensor_memory_error"] = f"{type(exc).__name__}: {exc}"[:300]
    finite = all(bool(torch.isfinite(p).all()) for m in (teacher, student) for p in m.parameters())
    # what the loop left alive between steps (0: every .grad freed, common.free_grads)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for m in (teacher, student) for p in m.parameters()
                     if p.grad is not None)
    return dict(row, times_s=times, median_s=common.median(times), wall_s=wall, phase_medians_s=phases,
                memory=mem, parameters_finite_after=finite, grad_bytes_between_steps=grad_bytes,
                torch_threads=torch.get_num_threads())


# The floor's items: name -> (how many of it a MetaDistil step needs, kind).  FLOOR_DEFINITION says it in words.
FLOOR_ITEMS = {
    "teacher_forward_backward": (1, "pass"),
    "teacher_forward": (1, "pass"),
    "student_forward_backward_train": (2, "pass"),
    "student_forward_backward_quiz": (1, "pass"),
    "student_jvp": (1, "pass"),
    "teacher_update": (1, "optimizer update"),
    "student_update": (1, "optimizer update"),
}


def floor_items(teacher, student, batch, quiz, teacher_opt, student_opt, *, device: str, dtype: str,
                seed: int) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """``(items, clear, tangents)``: ``{name: fn}`` for every item of :data:`FLOOR_ITEMS` on these models, the
    one home of the floor's passes (``worker_floor`` times them here, ``bench.profile_step`` on copies of its
    models); ``clear()`` drops every ``.grad`` the items leave; ``tangents`` is the JVP's random direction
    (no state of any training step: clear it before measuring what a step holds).

    Passes write ``.grad`` as a plain training loop does (cleared first); the JVP runs under math
    attention; an optimizer update is the optimizer's own ``step()`` with gradients set once, outside
    the call (zeros: the same work; its state exists after the first call).  The models move when an
    update item runs: time them on models nothing else uses."""
    import torch

    from fastmeta.functional import as_split_inputs
    from fastmeta.functional import student_jvp as jvp

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    quiz_inputs = {k: v for k, v in quiz.items() if k != "labels"}
    labels, quiz_labels = batch["labels"], quiz["labels"]
    ac = lambda: _autocast(device, dtype)  # noqa: E731
    gen = torch.Generator().manual_seed(seed + 7)  # drawn on the CPU (the same numbers on every device)

    def clear():
        for m in (teacher, student):
            for p in m.parameters():
                p.grad = None

    cot = torch.randn(labels.shape[0], teacher.config.num_labels, generator=gen).to(device)

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
    tangents = {n: torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype) for n, p in params.items()}

    split_inputs = as_split_inputs(inputs)

    def student_jvp():  # the engine's own JVP (forward mode on dual tensors, math attention)
        with ac():
            jvp(student, split_inputs, tangents)

    def optimizer_update(model, opt):
        ready = []

        def run():
            if not ready:  # gradients set once, outside the timed calls after the first (a warm-up)
                clear()
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                ready.append(True)
            with torch.no_grad():
                opt.step()
        return run

    items = {
        "teacher_forward_backward": teacher_fwd_bwd,
        "teacher_forward": teacher_fwd,
        "student_forward_backward_train": student_fwd_bwd(inputs, labels),
        "student_forward_backward_quiz": student_fwd_bwd(quiz_inputs, quiz_labels),
        "student_jvp": student_jvp,
        "teacher_update": optimizer_update(teacher, teacher_opt),
        "student_update": optimizer_update(student, student_opt),
    }
    return items, clear, tangents


def worker_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the passes and updates a MetaDistil step cannot avoid, each alone (:func:`floor_items`)."""
    device = spec["device"]
    teacher, student, batch, quiz, teacher_opt, student_opt = _setup(spec)
    rep, warm = spec["repeats"], spec["warmup"]
    items, clear, tangents = floor_items(teacher, student, batch, quiz, teacher_opt, student_opt, device=device,
                                         dtype=spec["dtype"], seed=spec["seed"])
    mem = _memory_start(device)
    results: dict[str, Any] = {}
    for name, (count, kind) in FLOOR_ITEMS.items():
        # an update's first call sets its gradients and creates the optimizer's state: at least one warm-up
        warmup = max(warm, 1) if kind == "optimizer update" else warm
        times = common.time_calls(items[name], repeats=rep, warmup=warmup, device=device)
        results[name] = {"times_s": times, "median_s": common.median(times), "count": count, "kind": kind}
    clear()
    mem = _memory_end(device, mem)
    memory_items = teacher_memory_items(teacher, teacher_opt)  # the teacher optimizer's state exists now
    tangents.clear()  # the JVP's random direction is no state of any training step
    memory_items["teacher_backward_peak_bytes"] = common.peak_of(device, items["teacher_forward_backward"])
    clear()
    floor = sum(r["median_s"] * r["count"] for r in results.values())
    passes_s = sum(r["median_s"] * r["count"] for r in results.values() if r["kind"] == "pass")
    return {
        "kind": "floor", "passes": results, "floor_s": floor, "floor_passes_only_s": passes_s,
        "definition": FLOOR_DEFINITION.format(optimizer=spec["optimizer"]),
        "memory": mem, "memory_items": memory_items,
    }


def teacher_memory_items(teacher, teacher_opt) -> dict[str, int]:
    """Bytes a MetaDistil step keeps on the teacher's device beyond a KD step's: its optimizer's state (the
    tensors of ``teacher_opt.state`` on the parameters' device, so a CUDA run leaves out the step counters
    torch keeps on the CPU), its gradient
    (one tensor like each trainable parameter) and its trainable parameters (``meta_step``'s undo
    snapshot copies them and the state)."""
    import torch

    trainable = [p for p in teacher.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(t.numel() * t.element_size() for p in trainable for t in teacher_opt.state.get(p, {}).values()
                if isinstance(t, torch.Tensor) and t.device == p.device)
    return {"teacher_optimizer_state_bytes": int(state), "teacher_grad_bytes": int(params),
            "teacher_param_bytes": int(params)}


def memory_floor(setting_result: dict[str, Any]) -> dict[str, Any] | None:
    """The least peak a MetaDistil step can reach next to plain KD's, from this setting's KD peak and the
    floor worker's byte counts (:func:`teacher_memory_items`).

    Two necessary moments bound it from below; the floor (``bound_bytes``) is the larger.
    ``meta_step``'s MetaDistil step ends with a real student step that is plain KD's step (teacher
    forward, student forward+backward, student update: the same code), while the teacher
    optimizer's state -- which no KD step has -- is alive: its peak is at least KD's peak + that
    state (``kd_plus_state_bytes``).  And the teacher's gradient needs a teacher forward+backward
    (its activations, unless the teacher checkpoints them) while both models and both optimizers'
    states are alive: the floor worker measures one such pass alone, no student gradient alive
    (``teacher_backward_peak_bytes``; absent in result files older than it).  Another implementation's
    student step may allocate less than fastmeta's KD step (e.g. free the previous ``.grad`` first),
    so the first bound is for steps whose student step is this one.  ``meta_step`` also keeps,
    through that student step, the teacher's ``.grad`` and (``atomic=True``, the default) the undo
    snapshot of the teacher's parameters and optimizer state (``with_meta_step_extras``).  Exact on
    CUDA (``max_memory_allocated``); on CPU the peaks are RSS, so the figures are approximate.
    Computed once per setting (``_finish``: the setting's ``"memory_floor"``), read from there."""
    kd = next((r for r in setting_result["steps"] if _ok(r) and r["algorithm"] == "kd"), None)
    items = setting_result["floor"].get("memory_items")
    if kd is None or not items:
        return None
    kd_peak = kd["memory"]["peak_bytes"]
    state, grad, params = (items["teacher_optimizer_state_bytes"], items["teacher_grad_bytes"],
                           items["teacher_param_bytes"])
    extras = state + grad + params + state
    bound = max(kd_peak + state, items.get("teacher_backward_peak_bytes", 0))
    out = dict(items, peak_kind=kd["memory"].get("peak_kind", ""), kd_peak_bytes=kd_peak,
               kd_plus_state_bytes=kd_peak + state, kd_plus_state_vs_kd=(kd_peak + state) / kd_peak,
               bound_bytes=bound, bound_vs_kd=bound / kd_peak,
               with_meta_step_extras_bytes=kd_peak + extras, with_meta_step_extras_vs_kd=(kd_peak + extras) / kd_peak)
    if "teacher_backward_peak_bytes" in items:
        out["teacher_backward_vs_kd"] = items["teacher_backward_peak_bytes"] / kd_peak
    return out


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
    seq = args.seq_len or MODELS[model]["seq_len"]
    return [dict(model=model, batch_size=b, seq_len=seq, dtype=d) for b in batches for d in dtypes]


def configurations(algorithms, hypergrads) -> list[tuple[str, str | None]]:
    """fastmeta's own (algorithm, hypergrad) configurations of this run (plain KD always included)."""
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


STUDENT_TANGENT_ROWS = ("metadistil", "lgtm")  # the exact rows repeated with each --student-tangents value
TEACHER_GRAPH_ROWS = ("metadistil",)  # the exact rows repeated with each --teacher-graphs value
TEACHER_GRAPH_PREFIX = "teacher_"  # a variant "teacher_recompute" is the option teacher_graph="recompute"


def variant_fields(variant: str | None) -> dict[str, str | None]:
    """A row's variant as its meta_step options (None: the default): ``"double_vjp"`` ->
    ``student_tangent="double_vjp"``; ``"teacher_recompute"`` -> ``teacher_graph="recompute"``; both
    joined by ``+`` (``"double_vjp+teacher_recompute"``) -> both options."""
    fields: dict[str, str | None] = {"student_tangent": None, "teacher_graph": None}
    for part in variant.split("+") if variant else ():
        if part.startswith(TEACHER_GRAPH_PREFIX):
            fields["teacher_graph"] = part[len(TEACHER_GRAPH_PREFIX):]
        else:
            fields["student_tangent"] = part
    return fields


def row_variant(r: dict[str, Any]) -> str | None:
    parts = ([r["student_tangent"]] if r.get("student_tangent") else []) + \
        ([TEACHER_GRAPH_PREFIX + r["teacher_graph"]] if r.get("teacher_graph") else [])
    return "+".join(parts) or None


def keys(args) -> list[tuple[str, str | None, str | None, str | None]]:
    """Every row of a setting, as (algorithm, hypergrad, peer, variant): fastmeta's configurations
    (peer None, variant None: the default options), the exact rows of metadistil/lgtm again with each
    ``--student-tangents`` value, the exact metadistil row with each ``--teacher-graphs`` value and (with
    ``--combined-variants``) with each pair of the two, then the peers' MetaDistil steps (hypergrad
    "autograd": they backprop through the pilot)."""
    from fastmeta.engine import STUDENT_TANGENTS, TEACHER_GRAPHS

    own = configurations(args.algorithms, args.hypergrads)
    out = [(a, h, None, None) for a, h in own]
    others = tuple(t for t in STUDENT_TANGENTS if t != "jvp")  # "jvp" is the default rows' tangent
    for tangent in getattr(args, "student_tangents", None) or ():
        if tangent not in others:
            raise SystemExit(f"unknown student tangent {tangent!r}; choose from {others}")
        out += [(a, h, None, tangent) for a, h in own if h == "exact" and a in STUDENT_TANGENT_ROWS]
    graphs = tuple(g for g in TEACHER_GRAPHS if g != "keep")  # "keep" is the default rows' graph
    for graph in getattr(args, "teacher_graphs", None) or ():
        if graph not in graphs:
            raise SystemExit(f"unknown teacher graph {graph!r}; choose from {graphs}")
        out += [(a, h, None, TEACHER_GRAPH_PREFIX + graph) for a, h in own if h == "exact" and a in TEACHER_GRAPH_ROWS]
    if getattr(args, "combined_variants", False):  # each tangent with each graph, in one row
        out += [(a, h, None, f"{tangent}+{TEACHER_GRAPH_PREFIX}{graph}")
                for tangent in args.student_tangents or () for graph in args.teacher_graphs or ()
                for a, h in own if h == "exact" and a in TEACHER_GRAPH_ROWS]
    for name in getattr(args, "peers", None) or ():
        from bench.peers import PEERS

        if name not in PEERS:
            raise SystemExit(f"unknown peer {name!r}; choose from {PEERS}")
        out.append(("metadistil", "autograd", name, None))
    return out


def conf_name(alg: str, hg: str | None, peer: str | None = None, variant: str | None = None) -> str:
    if peer is not None:
        return f"peer/{peer}"
    return (alg if hg is None else f"{alg}/{hg}") + (f"+{variant}" if variant else "")


def parse_conf_name(name: str) -> tuple[str, str | None, str | None, str | None]:
    """The inverse of :func:`conf_name`, for a name a user typed (``bench.growth --methods``):
    "kd" -> ("kd", None, None, None); "metadistil/exact" -> (..., "exact", None, None); "peer/higher" ->
    ("metadistil", "autograd", "higher", None); "metadistil/exact+double_vjp" -> (..., "exact", None,
    "double_vjp"): a variant (``+teacher_recompute``: ``teacher_graph="recompute"``)."""
    if name == "kd":
        return ("kd", None, None, None)
    head, _, tail = name.partition("/")
    if head == "peer" and tail:
        from bench.peers import PEERS

        if tail not in PEERS:
            raise SystemExit(f"unknown peer {tail!r}; choose from {PEERS}")
        return ("metadistil", "autograd", tail, None)
    tail, _, variant = tail.partition("+")
    if variant:
        from fastmeta.engine import STUDENT_TANGENTS, TEACHER_GRAPHS

        # a variant is a non-default value (the default is the plain row), or two joined by "+"
        parts = variant.split("+")
        fields = variant_fields(variant)
        known = (len(set(parts)) == len(parts) == sum(v is not None for v in fields.values())
                 and fields["student_tangent"] in {None, *STUDENT_TANGENTS} - {"jvp"}
                 and fields["teacher_graph"] in {None, *TEACHER_GRAPHS} - {"keep"})
        if not known or tail != "exact":
            raise SystemExit(f"unknown method {name!r}: a variant is exact+double_vjp, exact+teacher_recompute "
                             "or exact+double_vjp+teacher_recompute")
        variant = row_variant(fields)  # the canonical order: "double_vjp+teacher_recompute"
    if head in ("metadistil", "lgtm", "ikd", "reptile") and tail:
        return (head, tail, None, variant or None)
    raise SystemExit(f"unknown method {name!r}; e.g. kd, metadistil/exact, metadistil/exact+double_vjp, "
                     "peer/higher")


def row_name(r: dict[str, Any]) -> str:
    return conf_name(r["algorithm"], r["hypergrad"], r.get("peer"), row_variant(r))


def _label(r: dict[str, Any]) -> str:
    """How a row is printed: ``metadistil / exact``, ``metadistil / exact (double_vjp)``,
    ``metadistil / exact (teacher recomputed)``, ``metadistil / exact (double_vjp, teacher recomputed)``;
    a peer: ``MetaDistil with higher (peer)``."""
    if r.get("peer"):
        return f"MetaDistil with {r['peer']} (peer)"
    words = [r["student_tangent"]] if r.get("student_tangent") else []
    if r.get("teacher_graph"):
        words.append(f"teacher {r['teacher_graph']}d" if r["teacher_graph"] == "recompute" else r["teacher_graph"])
    extra = f" ({', '.join(words)})" if words else ""
    return r["algorithm"] + (f" / {r['hypergrad']}" if r["hypergrad"] else "") + extra


def _priority(names: list[str] | None, confs: list[tuple]) -> set:
    """The configurations of ``--priority`` ("kd", "metadistil/exact", "peer/higher", ...); all when not given."""
    if not names:
        return set(confs)
    by_name = {conf_name(*c): c for c in confs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--priority: {unknown} not among this run's configurations {sorted(by_name)}")
    return {by_name[n] for n in names}


def plan(args, settings: list[dict[str, Any]]) -> list[tuple[int, str, tuple | None]]:
    """The order of the work: (setting index, "floor"|"step", (algorithm, hypergrad, peer, variant) or None).

    Every setting's floor and its ``--priority`` configurations first (all settings), then the
    rest, so that a run cut short by ``--deadline`` has the most wanted figures of every setting;
    that whole order once per ``--rounds``.
    """
    confs = keys(args)
    first = _priority(args.priority, confs)

    def runs(i: int, c: tuple) -> bool:
        """The student-tangent rows run in fp32 settings only: under autocast double_vjp needs
        jvp_precision="autocast", a tangent of another precision than the default rows'."""
        return variant_fields(c[3])["student_tangent"] is None or settings[i]["dtype"] == "fp32"

    items: list[tuple[int, str, tuple | None]] = []
    for i in range(len(settings)):
        items.append((i, "floor", None))
        items += [(i, "step", c) for c in confs if c in first and runs(i, c)]
    for i in range(len(settings)):
        items += [(i, "step", c) for c in confs if c not in first and runs(i, c)]
    return items * max(1, getattr(args, "rounds", 1))


def _tensor_memory_lines(s: dict[str, Any]) -> list[str]:
    """The live-tensor table of one setting (rows measured with ``--tensor-memory``), or nothing."""
    rows = [r for r in s["steps"] if _ok(r) and "tensor_memory" in r]
    if not rows:
        return []
    kd = next((r["tensor_memory"] for r in rows if r["algorithm"] == "kd" and r.get("peer") is None), None)
    autograd = {r["algorithm"]: r["tensor_memory"] for r in rows
                if r.get("hypergrad") == "autograd" and r.get("peer") is None and row_variant(r) is None}

    def ratio(a, b):
        return common.fmt(a / b, 2, "x") if b else "—"

    table = []
    for r in rows:
        m = r["tensor_memory"]
        ref = autograd.get(r["algorithm"]) if r.get("peer") is None else autograd.get("metadistil")
        table.append([_label(r), common.fmt_bytes(m["before_bytes"]), common.fmt_bytes(m["peak_bytes"]),
                      ratio(m["peak_bytes"], kd and kd["peak_bytes"]), common.fmt_bytes(m["step_bytes"]),
                      ratio(m["step_bytes"], ref and ref["step_bytes"]),
                      max(m["phase_peak_bytes"], key=m["phase_peak_bytes"].get, default="—")])
    return ["Live tensors (two more, untimed steps per row, the second under torch.profiler: the bytes of tensors "
            "alive, what max_memory_allocated counts on CUDA; 'before' = the tensors alive between steps, 'step' = "
            "the peak above them; x autograd: against the same algorithm's double backward, the peers against "
            "MetaDistil's):", "",
            common.markdown_table(["step", "before", "peak", "peak x KD", "step", "step x autograd", "peak phase"],
                                  table), ""]


def merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row (or floor) from the results of its rounds: times pooled (median over all timed steps),
    phase medians the median of the rounds' ones, memory the largest round's; an error or skip wins."""
    bad = next((r for r in results if not _ok(r)), None)
    if bad is not None or len(results) == 1:
        return bad if bad is not None else results[0]
    out = dict(results[-1])
    out["rounds"] = len(results)
    if out["kind"] == "floor":
        passes = {}
        for name, last in results[-1]["passes"].items():
            times = [t for r in results for t in r["passes"][name]["times_s"]]
            passes[name] = dict(last, times_s=times, median_s=common.median(times))
        out["passes"] = passes
        out["floor_s"] = sum(p["median_s"] * p["count"] for p in passes.values())
        out["floor_passes_only_s"] = sum(p["median_s"] * p["count"] for p in passes.values() if p["kind"] == "pass")
    else:
        times = [t for r in results for t in r["times_s"]]
        out.update(times_s=times, median_s=common.median(times), wall_s=sum(r["wall_s"] for r in results))
        phases = {k for r in results for k in r.get("phase_medians_s", {})}
        out["phase_medians_s"] = {k: common.median([r["phase_medians_s"][k] for r in results
                                                    if k in r.get("phase_medians_s", {})]) for k in phases}
        out["parameters_finite_after"] = all(r.get("parameters_finite_after", True) for r in results)
        if any("grad_bytes_between_steps" in r for r in results):
            out["grad_bytes_between_steps"] = max(r.get("grad_bytes_between_steps", 0) for r in results)
    tensors = [r["tensor_memory"] for r in results if "tensor_memory" in r]
    if tensors:  # live tensors (CPU, --tensor-memory): the largest round's
        out["tensor_memory"] = max(tensors, key=lambda m: m["peak_bytes"])
    largest = max(results, key=lambda r: r["memory"]["peak_bytes"])
    if "phase_peak_bytes" in largest:  # where the peak is: of the round whose peak is reported
        out["phase_peak_bytes"] = largest["phase_peak_bytes"]
    out["memory"] = dict(largest["memory"], rounds_peak_bytes=[r["memory"]["peak_bytes"] for r in results],
                         rounds_step_memory_bytes=[r["memory"].get("step_memory_bytes") for r in results])
    return out


def run_all(args, settings: list[dict[str, Any]], log, deadline: float | None = None,
            on_progress=None) -> list[dict[str, Any]]:
    """Run the plan; past ``deadline`` (``time.time()``), what is left is recorded as skipped."""
    base = dict(device=args.device, seed=args.seed, attn=args.attn, dropout=args.dropout,
                optimizer=args.optimizer, teacher_lr=args.teacher_lr, student_lr=args.student_lr,
                inner_lr=args.inner_lr, temperature=args.temperature, kd_weight=args.kd_weight,
                warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                cache_models=args.isolation == "inprocess",
                phase_memory=args.device == "cuda" if args.phase_memory is None else args.phase_memory,
                tensor_memory=args.tensor_memory)
    confs = keys(args)
    states = [{"setting": s, "label": f"{s['model']} bs{s['batch_size']} seq{s['seq_len']} {s['dtype']}",
               "floor": [], "rows": {}} for s in settings]
    runner = _runner(args)
    skipped = 0
    for i, kind, conf in plan(args, settings):
        st = states[i]
        label = st["label"]
        if deadline is not None and time.time() >= deadline:
            skipped += 1
            if kind == "floor":
                if not st["floor"]:  # a round already measured is kept
                    st["floor"].append({"kind": "floor", "skipped": "time"})
            elif conf not in st["rows"]:
                alg, hg, peer, variant = conf
                st["rows"][conf] = [{"kind": "step", "algorithm": alg, "hypergrad": hg, "peer": peer,
                                     **variant_fields(variant), "skipped": "time"}]
            continue
        spec = dict(base, **st["setting"], kind=kind)
        t0 = time.perf_counter()
        if kind == "floor":
            log(f"[{label}] floor ...")
            try:
                floor = runner(spec)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                floor = {"kind": "floor", "error": _error_text(exc)}
                log(f"[{label}] floor: FAILED\n{floor['error']}")
            else:
                log(f"[{label}] floor = {floor['floor_s']:.4f} s ({time.perf_counter() - t0:.0f} s)")
            st["floor"].append(floor)
        else:
            alg, hg, peer, variant = conf
            name = conf_name(alg, hg, peer, variant)
            spec.update(algorithm=alg, hypergrad=hg, peer=peer, variant=variant)
            try:
                res = runner(spec)
            except Exception as exc:  # noqa: BLE001 - WorkerError, OOM, a bug in one algorithm: recorded
                res = {"kind": "step", "algorithm": alg, "hypergrad": hg, "peer": peer, **variant_fields(variant),
                       "error": _error_text(exc)}
                log(f"[{label}] {name}: FAILED\n{res['error']}")
            else:
                if "skipped" in res:
                    log(f"[{label}] {name}: skipped ({res['skipped']})")
                else:
                    log(f"[{label}] {name}: median {res['median_s']:.4f} s, peak "
                        f"{common.fmt_bytes(res['memory']['peak_bytes'])} ({time.perf_counter() - t0:.0f} s)")
            st["rows"].setdefault(conf, []).append(res)
        if on_progress is not None:
            on_progress(_finish(states, confs))
    if skipped:
        log(f"SKIPPED (time): {skipped} item(s) left when the deadline passed; what ran is kept")
    return _finish(states, confs)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, common.WorkerError):
        return str(exc)
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip().splitlines()
    return "\n".join(tb[-12:])


def _finish(states, confs) -> list[dict[str, Any]]:
    """Settings in the report's form: steps in the canonical order, ratios added."""
    import copy

    out = []
    for st in states:
        rows = [copy.deepcopy(merge_rounds(st["rows"][c])) for c in confs if c in st["rows"]]
        floor = copy.deepcopy(merge_rounds(st["floor"])) if st["floor"] else {"kind": "floor", "skipped": "not run"}
        _add_ratios(rows, floor)
        result = {"setting": st["setting"], "label": st["label"], "floor": floor, "steps": rows}
        result["memory_floor"] = memory_floor(result)
        out.append(result)
    return out


def _ok(row: dict[str, Any]) -> bool:
    return "error" not in row and "skipped" not in row


def _runner(args):
    if args.isolation == "subprocess":
        return lambda spec: common.run_worker("bench.meta_step", spec, timeout=args.worker_timeout)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def in_process(spec):
        # CUDA: max_memory_allocated is reset right before the steps and everything of the
        # previous configuration is freed first, so each peak is the configuration's own.
        # CPU (tests): peak RSS is process-wide and not comparable between configurations.
        import gc

        import torch

        cuda = spec["device"] == "cuda"
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            before = int(torch.cuda.memory_allocated())
        fn = {"step": worker_step, "floor": worker_floor}[spec["kind"]]
        try:
            result = fn(spec)
        finally:
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
        if cuda:
            result["memory"]["allocated_before_setup_bytes"] = before
        return result
    return in_process


def _add_ratios(rows: list[dict[str, Any]], floor: dict[str, Any]) -> None:
    ok = [r for r in rows if _ok(r)]
    kd = next((r for r in ok if r["algorithm"] == "kd"), None)
    floor_s = floor.get("floor_s")
    for r in ok:
        auto = next((a for a in ok if a["algorithm"] == r["algorithm"] and a["hypergrad"] == "autograd"
                     and not a.get("peer")), None)  # fastmeta's own double backward
        # the fastest timed step: a shared machine's interference only ever adds time
        r["min_s"] = min(r["times_s"]) if r.get("times_s") else r["median_s"]
        r["min_vs_autograd"] = r["min_s"] / min(auto["times_s"]) if auto and auto.get("times_s") else None
        r["time_vs_kd"] = r["median_s"] / kd["median_s"] if kd else None
        r["time_vs_autograd"] = r["median_s"] / auto["median_s"] if auto else None
        r["time_vs_floor"] = r["median_s"] / floor_s if floor_s else None
        pk, sm = r["memory"]["peak_bytes"], r["memory"]["step_memory_bytes"]
        r["peak_vs_kd"] = pk / kd["memory"]["peak_bytes"] if kd else None
        r["step_memory_vs_kd"] = (sm / kd["memory"]["step_memory_bytes"]
                                  if kd and kd["memory"]["step_memory_bytes"] > 0 else None)
        r["peak_vs_autograd"] = pk / auto["memory"]["peak_bytes"] if auto else None
        r["step_memory_vs_autograd"] = (sm / auto["memory"]["step_memory_bytes"]
                                        if auto and auto["memory"]["step_memory_bytes"] > 0 else None)


def goals(setting_result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for MetaDistil with fastmeta exact (stated for GPU), peers included:
    exact faster and leaner (step memory; peak on CUDA) than every peer that ran."""
    steps = {(r["algorithm"], r["hypergrad"]): r for r in setting_result["steps"]
             if _ok(r) and not r.get("peer") and not row_variant(r)}
    exact = steps.get(("metadistil", "exact"))
    auto = steps.get(("metadistil", "autograd"))
    out: dict[str, Any] = {}
    if exact and auto:
        out["speedup_vs_autograd"] = {"value": auto["median_s"] / exact["median_s"], "goal": ">= 2",
                                      "met": auto["median_s"] / exact["median_s"] >= 2.0}
    if exact and exact.get("time_vs_floor") is not None:
        out["time_vs_floor"] = {"value": exact["time_vs_floor"], "goal": "<= 1.15",
                                "met": exact["time_vs_floor"] <= 1.15}
    if exact and exact.get("peak_vs_kd") is not None:
        out["peak_memory_vs_kd"] = {"value": exact["peak_vs_kd"], "goal": "<= 1.5",
                                    "met": exact["peak_vs_kd"] <= 1.5}
        bound = setting_result.get("memory_floor")  # None in result files older than the memory floor
        if bound is not None:  # the least meta_step's MetaDistil step can reach
            out["peak_memory_vs_kd"]["bound"] = bound["bound_vs_kd"]
    for r in setting_result["steps"]:
        if not (exact and r.get("peer") and _ok(r)):
            continue
        t = exact["median_s"] / r["median_s"]
        out[f"time_vs_{r['peer']}"] = {"value": t, "goal": "< 1", "met": t < 1.0}
        mem_key = "peak_bytes" if exact["memory"].get("peak_kind", "").startswith("torch.cuda") else "step_memory_bytes"
        if r["memory"][mem_key] > 0:
            m = exact["memory"][mem_key] / r["memory"][mem_key]
            out[f"{'peak' if mem_key == 'peak_bytes' else 'step'}_memory_vs_{r['peer']}"] = {
                "value": m, "goal": "< 1", "met": m < 1.0}
    return out


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    threads = (f"{env['worker_threads']} intra-op thread(s) per worker process"
               if env["device"] == "cpu" else f"{env['torch_threads']} CPU thread(s)")
    lines = [f"# fastmeta.meta_step benchmark ({env['device']}: {env['device_name']})", "",
             f"Measured {env['date_utc']} with `{env['command']}`; torch {env['versions']['torch']}, "
             f"transformers {env['versions']['transformers']}, triton {env['versions']['triton']}, "
             f"python {env['versions']['python']}; {threads}. {env['note']}", "",
             f"Models: {report['models']}. Optimizer: {report['options']['optimizer']} for both "
             f"models; {_timing_words(report['options'])}. {report['memory_note']}", ""]
    if report.get("incomplete"):
        lines += [f"**Incomplete run**: {report['incomplete']}", ""]
    for s in report["settings"]:
        lines += [f"## {s['label']}", ""]
        rows = []
        for r in s["steps"]:
            name = _label(r)
            if "skipped" in r:
                rows.append([name, f"skipped ({r['skipped']})"] + [None] * 10)
                continue
            if "error" in r:
                first = r["error"].strip().splitlines()[-1][:120]
                rows.append([name, f"failed: {first}"] + [None] * 10)
                continue
            m = r["memory"]
            best = r.get("min_s", min(r["times_s"]) if r.get("times_s") else None)
            rows.append([
                name, common.fmt(r["median_s"], 4), common.fmt(r["time_vs_kd"], 2, "x"),
                common.fmt(r["time_vs_autograd"], 2, "x"), common.fmt(r["time_vs_floor"], 2, "x"),
                common.fmt(best, 4), common.fmt(r.get("min_vs_autograd"), 2, "x"),
                common.fmt_bytes(m["peak_bytes"]), common.fmt(r["peak_vs_kd"], 2, "x"),
                common.fmt_bytes(m["step_memory_bytes"]), common.fmt(r["step_memory_vs_kd"], 2, "x"),
                common.fmt(r["step_memory_vs_autograd"], 2, "x"),
            ])
        lines.append(common.markdown_table(
            ["step", "median s", "x KD", "x autograd", "x floor", "fastest s", "fastest x autograd's", "peak mem",
             "peak x KD",
             "step mem", "step mem x KD", "step mem x autograd"], rows))
        f = s["floor"]
        if "floor_s" in f:
            frows = [[k, r.get("kind", "pass"), r["count"], common.fmt(r["median_s"], 4),
                      common.fmt(r["median_s"] * r["count"], 4)] for k, r in f["passes"].items()]
            frows.append(["**floor (sum)**", "", "", "", common.fmt(f["floor_s"], 4)])
            if "optimizer_updates" in f:  # a result file of the earlier definition (updates outside the floor)
                frows.append(["optimizer updates (not in this floor)", "", "", "",
                              common.fmt(f["optimizer_updates"]["median_s"], 4)])
            lines += [f"Floor ({f.get('definition', 'the necessary passes, each timed alone in this run')}):", "",
                      common.markdown_table(["item", "kind", "count", "median s", "s x count"], frows)]
            if s["setting"]["dtype"] != "fp32":
                lines += [f"(The floor's passes all run under {s['setting']['dtype']} autocast, its JVP too; the "
                          "engine computes the student tangent in fp32 by default, jvp_precision='fp32'.)", ""]
        else:
            why = f"skipped ({f['skipped']})" if "skipped" in f else "failed: " + f.get("error", "?").strip().splitlines()[-1][:120]
            lines += [f"Floor: {why}.", ""]
        mf = s.get("memory_floor")
        if mf is not None:
            lines += [_memory_floor_words(mf), ""]
        lines += _tensor_memory_lines(s)
        peaks = [r for r in s["steps"] if _ok(r) and r.get("phase_peak_bytes") and r["algorithm"] in ("kd", "metadistil")]
        if peaks:
            lines += ["Where the peak is (one more, untimed step per row; the 3 phases with the highest peak, "
                      "absolute):", ""]
            lines += [f"- {_label(r)}: " + ", ".join(
                f"{name} {common.fmt_bytes(b)}" for name, b in sorted(r["phase_peak_bytes"].items(),
                                                                         key=lambda kv: -kv[1])[:3])
                      for r in peaks]
            lines.append("")
        g = goals(s)
        if g:
            lines.append("MetaDistil with fastmeta exact against the issue's goals (stated for GPU): "
                         + "; ".join(f"{k} = {v['value']:.2f} (goal {v['goal']}: "
                                     f"{'met' if v['met'] else 'missed'}"
                                     + (f"; floor {v['bound']:.2f} (see Memory floor)"
                                        if "bound" in v else "")
                                     + ")" for k, v in g.items()))
            lines.append("")
    return "\n".join(lines)


def _memory_floor_words(mf: dict[str, Any]) -> str:
    b = common.fmt_bytes
    exact = mf["peak_kind"].startswith("torch.cuda")
    # result files older than the teacher-backward floor: their bound is KD's peak + the state alone
    kd_plus_state = mf.get("kd_plus_state_bytes", mf["bound_bytes"])
    return (
        f"Memory floor (peaks {'by max_memory_allocated: exact' if exact else 'as RSS: approximate'}): "
        f"plain KD peaks at {b(mf['kd_peak_bytes'])}. meta_step's MetaDistil step ends with a real student "
        f"step that is KD's step, while the teacher optimizer's state "
        f"({b(mf['teacher_optimizer_state_bytes'])}, which a KD step does not have) is alive, so it cannot "
        f"peak below {b(kd_plus_state)} = {kd_plus_state / mf['kd_peak_bytes']:.2f}x KD's peak"
        f"{'' if exact else ' (RSS: roughly)'}. "
        + (f"The teacher's gradient needs a teacher forward+backward with both models and both optimizers' "
           f"states alive (no student gradient): alone, measured in the floor worker, it peaks at "
           f"{b(mf['teacher_backward_peak_bytes'])} = {mf['teacher_backward_vs_kd']:.2f}x KD's peak "
           f"(unless the teacher checkpoints its activations). The floor is the larger of the two: "
           f"{mf['bound_vs_kd']:.2f}x. " if "teacher_backward_peak_bytes" in mf else "")
        + f"meta_step also keeps the teacher's "
        f".grad ({b(mf['teacher_grad_bytes'])}) and, with atomic=True (the default), the undo snapshot of "
        f"the teacher's parameters and optimizer state "
        f"({b(mf['teacher_param_bytes'] + mf['teacher_optimizer_state_bytes'])}) through that student step: "
        f"{b(mf['with_meta_step_extras_bytes'])} = {mf['with_meta_step_extras_vs_kd']:.2f}x KD's peak.")


def _timing_words(options: dict[str, Any]) -> str:
    rounds = options.get("rounds", 1) or 1
    if rounds == 1:
        return f"warm-up {options['warmup']} steps, median of {options['repeats']} timed steps"
    return (f"{rounds} interleaved rounds (every configuration and the floor, then again), each in a fresh "
            f"worker with {options['warmup']} warm-up step(s) and {options['repeats']} timed step(s); median of "
            f"the {rounds * options['repeats']} timed steps, memory of the largest round")


def render_chart(report: dict[str, Any], path: Path) -> bool:
    """The PNG (first setting on CPU; every setting, one figure each stacked, on CUDA).

    Returns False (and says so) when matplotlib is missing: ``--replot`` redraws it from the JSON.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}; redraw it elsewhere with "
              f"`python -m bench.meta_step --replot {path.with_suffix('.json')}`", flush=True)
        return False
    env = report["environment"]
    mem_key = "step_memory_vs_kd" if env["device"] == "cpu" else "peak_vs_kd"
    mem_title = ("step memory (peak RSS - RSS before steps), x KD" if mem_key == "step_memory_vs_kd"
                 else "peak GPU memory, x KD")
    settings = report["settings"] if env["device"] == "cuda" else report["settings"][:1]
    labels, times, mems = [], [], []
    for s in settings:
        ok = [r for r in s["steps"] if _ok(r)]
        prefix = f"{s['label']}: " if len(settings) > 1 else ""
        labels += [prefix + row_name(r) for r in ok]
        times += [r["time_vs_kd"] for r in ok]
        mems += [r[mem_key] for r in ok]
    if not labels:
        return False
    title_setting = settings[0]["label"] if len(settings) == 1 else f"{len(settings)} settings"
    common.bar_chart_ratios(
        path, labels,
        [("median step time, x plain KD", times), (mem_title, mems)],
        title=f"fastmeta.meta_step, {title_setting} on {env['device']} ({env['device_name']})",
        footnote=f"{env['date_utc']}; torch {env['versions']['torch']}; "
                 + ("shared machine, timings noisy" if env.get("shared_machine") else ""),
    )
    return True


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
    p.add_argument("--peers", nargs="*", default=["higher", "torchopt"],
                   help="peer libraries whose MetaDistil step is a row of every setting (bench/peers.py; "
                        "default: higher torchopt; none: --peers with no name). A peer that is not installed "
                        "is reported as skipped (not installed), never faked")
    p.add_argument("--student-tangents", nargs="*", default=["double_vjp"],
                   help="the exact rows of metadistil and lgtm again with each of these student_tangent values "
                        "(default: double_vjp; none: --student-tangents with no value)")
    p.add_argument("--teacher-graphs", nargs="*", default=["recompute"],
                   help="the exact row of metadistil again with each of these teacher_graph values "
                        "(default: recompute; none: --teacher-graphs with no value)")
    p.add_argument("--combined-variants", action=argparse.BooleanOptionalAction, default=True,
                   help="also the exact metadistil row with each student tangent AND each teacher graph above "
                        "together (e.g. double_vjp with the teacher recomputed: the tangent's speed, the "
                        "recompute's memory); default on")
    p.add_argument("--rounds", type=int, default=None,
                   help="run every configuration this many times, interleaved, each in a fresh worker (default 2 "
                        "on CPU, 1 on CUDA); medians pool the rounds' timed steps")
    p.add_argument("--priority", nargs="+", default=None, metavar="ALG[/HYPERGRAD]",
                   help="run these configurations (e.g. kd metadistil/exact metadistil/autograd peer/higher) for every "
                        "setting first, then the rest (default: setting by setting)")
    p.add_argument("--warmup", type=int, default=None, help="default 1 on CPU, 2 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per round (default 2 on CPU, 5 on CUDA)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--teacher-lr", type=float, default=2e-5)
    p.add_argument("--student-lr", type=float, default=5e-5)
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dropout", type=float, default=None,
                   help="override the models' dropout (default: the config's, 0.1)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per worker (default on CPU 1: on the shared 2-core machine two "
                        "OpenMP threads stalled at barriers, 2-3x slower and far noisier; on CUDA torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="after the timed steps, one more (untimed) step of each fastmeta row records the peak "
                        "memory inside each of its phases (row field phase_peak_bytes; default: on CUDA only, "
                        "where max_memory_allocated makes it exact)")
    p.add_argument("--tensor-memory", action="store_true",
                   help="CPU: after the timed steps, two more (untimed) steps of every row, the second measured as "
                        "live tensors under torch.profiler (bench.common.phase_tensor_peaks: what "
                        "max_memory_allocated is on CUDA; row field tensor_memory) beside the RSS columns")
    p.add_argument("--isolation", choices=["subprocess", "inprocess"], default=None,
                   help="subprocess: one fresh process per configuration (clean CPU peaks; the CPU default); "
                        "inprocess: one process, models built once (the CUDA default: the peak of "
                        "torch.cuda.max_memory_allocated is reset per configuration, and fresh processes "
                        "would pay CUDA start-up each time)")
    p.add_argument("--worker-timeout", type=float, default=900)
    p.add_argument("--deadline", type=float, default=None,
                   help="time.time() after which nothing new starts: what is left is reported as "
                        "skipped (time), what ran is kept (the JSON/markdown are rewritten after each item)")
    p.add_argument("--time-budget-s", type=float, default=None, help="the same, relative to the start")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--tag", default=None, help="result file stem (default meta_step_<device>)")
    p.add_argument("--shared-machine", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only redraw the markdown and PNG of an existing result JSON (e.g. one measured "
                        "on a GPU machine without matplotlib), next to it")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.warmup is None:
        args.warmup = 2 if cuda else 1
    if args.repeats is None:
        args.repeats = 5 if cuda else 2
    if args.rounds is None:
        args.rounds = 1 if cuda else 2
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.isolation is None:
        args.isolation = "inprocess" if cuda else "subprocess"
    if args.threads is None and not cuda:
        args.threads = 1
    if args.tensor_memory and args.isolation == "inprocess":
        raise SystemExit("--tensor-memory needs --isolation subprocess: in one process every CPU tensor Python "
                         "can reach counts, the other rows' models (the in-process model cache) included")
    return args


def _peer_info(name: str) -> dict[str, Any]:
    from bench import peers

    return peers.availability(name)


def _memory_note(args) -> str:
    return _memory_source(args) + (" Every row's loop frees .grad after each step (zero_grad(set_to_none=True) "
                                   "on both optimizers, the peers' rows too), as a training loop does.")


def _memory_source(args) -> str:
    if args.device == "cuda":
        return ("GPU memory: torch.cuda.max_memory_allocated, reset right before the warm-up and timed "
                "steps of each configuration (models, inputs and optimizer state included, everything of "
                "the previous configuration freed first); 'step mem' = peak minus allocated before the steps.")
    if args.isolation == "subprocess":
        return ("CPU memory: peak RSS (VmHWM) of one fresh subprocess per configuration, "
                "reset after model set-up; 'step mem' = that peak minus the RSS just before "
                "the first step.")
    return "In-process run (tests): peaks are process-wide and not comparable."


def replot(json_path: str) -> None:
    common.replot(json_path, render_markdown, render_chart)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    if args.replot:
        replot(args.replot)
        return {}
    common.require_device(args.device)
    common.quiet_transformers()
    shared = {"auto": None, "yes": True, "no": False}[args.shared_machine]
    env = common.environment_info(args.device, shared_machine=shared)
    env["worker_threads"] = args.threads or env["torch_threads"]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    deadline = common.resolve_deadline(args.deadline, args.time_budget_s)
    out_dir = Path(args.out_dir)
    stem = args.tag or f"meta_step_{args.device}"
    settings_list = settings_for(args)

    def report_for(settings) -> dict[str, Any]:
        skipped = sum(1 for s in settings for r in s["steps"] + [s["floor"]] if r.get("skipped") == "time")
        report = {
            "benchmark": "meta_step",
            "environment": env,
            "models": MODELS[settings_list[0]["model"]]["desc"],
            "options": {k: v for k, v in vars(args).items() if k != "worker"},
            "memory_note": _memory_note(args),
            "settings": settings,
            "goals": {s["label"]: goals(s) for s in settings},
            "peers": {name: _peer_info(name) for name in (args.peers or ())},
            "total_wall_s": time.perf_counter() - t0,
        }
        if skipped:
            report["incomplete"] = f"{skipped} item(s) skipped (time): the deadline passed before they started"
        return report

    def partial(settings) -> None:  # after each item: a run cut short keeps what it measured
        report = report_for(settings)
        report["partial"] = True
        common.write_json(out_dir / f"{stem}.json", report)

    settings = run_all(args, settings_list, log, deadline=deadline,
                       on_progress=partial if deadline is not None or args.device == "cuda" else None)
    env["load_average_at_end"] = common.load_average()
    report = report_for(settings)
    common.write_json(out_dir / f"{stem}.json", report)
    md = render_markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    drew = render_chart(report, out_dir / f"{stem}.png")
    print(md)
    print(f"wrote {out_dir / stem}.{{json,md{',png' if drew else ''}}} in {report['total_wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
