"""``python -m bench.profile_step``: where one ``fastmeta.meta_step`` configuration spends its time.

For ONE configuration (algorithm, hypergrad, batch size) this, in ONE process:

1. runs ``--warmup`` + ``--steps`` training steps of ``fastmeta.meta_step`` and prints
   the median seconds of every phase the step reports (``StepOutput.timings``:
   ``validate``, ``meta_gradient`` with the engine's ``meta_gradient.<phase>``,
   ``teacher_update``, ``student_step.*``, ``student_update``, ``total``), plus
   ``(untimed)`` = ``total`` minus the step's phases (the engine's ``meta_gradient.*`` are
   inside ``meta_gradient``);
2. times the floor's passes ALONE on the same models and batches (a MetaDistil step
   cannot do less): teacher forward+backward, teacher forward (no graph, the real
   step's), student forward+backward (pilot and real step: x2), quiz forward+backward,
   one student JVP (forward-mode AD on dual tensors, math attention), the teacher's and the
   student's optimizer updates (one each) -- and diagnostics that are not in the floor
   (the student forward+backward under math attention, the double-VJP tangent);
3. prints, per phase, the step's median, the floor pass it corresponds to, and the gap, and
   takes the two update phases apart (``bench.updates``: the optimizer steps, the pilot op and its
   twin, the undo snapshot, ``Transaction.apply``; each alone, with its bytes and bandwidth;
   ``--no-updates`` skips it);
4. with ``--profile``: the timed steps again under ``torch.profiler`` (CPU activity;
   CUDA too on a GPU), the top ``--row-limit`` ops by self time and the phases
   (``record_function`` ranges named ``fastmeta.<phase>``) by total time;
   ``--trace PATH`` also writes a Chrome trace;
5. with ``--memory``: the timed steps again, with the peak resident set size reached inside
   each phase (VmHWM read and reset at every phase boundary) and, on CPU, the fresh pages each
   phase touched (minor page faults: memory the step grows into every time) and, on CPU again,
   the peak bytes of live tensors inside each phase (``common.phase_tensor_peaks``: torch.profiler's
   allocation events, what ``max_memory_allocated`` is on CUDA, independent of glibc);
6. with ``--sync-ab``: whole steps timed with and without the ``torch.cuda.synchronize`` that
   ``meta_step`` does around each timed phase on CUDA, alternating (what the syncs cost);
   with ``--walks-ab``: whole steps as shipped and with the walks over the models' parameters,
   buffers and submodules repeated at every use (what walking once saves), alternating.

Defaults are bench.meta_step's CPU setting (teacher all-MiniLM-L6-v2 -> its first 2
layers, seq 128, AdamW for both, 1 intra-op thread); ``--device cuda``: its CUDA setting
(BERT-base shape, random weights -> 6 layers; passes timed with CUDA events, the step's phases
synchronised by ``meta_step`` itself, ``--memory`` by ``max_memory_allocated``, ``--profile`` adds
the ops by GPU self time).  Examples::

    python -m bench.profile_step --algorithm metadistil --hypergrad exact --batch-size 4
    python -m bench.profile_step --algorithm lgtm --hypergrad finite_diff --batch-size 32 --profile
    python -m bench.profile_step --model tiny --steps 2 --no-floor          # smoke test
    python -m bench.profile_step --device cuda --batch-size 4 --profile --memory
    python -m bench.profile_step --model bert-base-thin --steps 100 --walks-ab   # host overhead, CPU

``--json PATH`` writes everything printed as JSON.  Timings on a shared machine are
noisy: compare figures from the same run (the gap column), repeat, take medians.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
from pathlib import Path
from typing import Any

# phase of StepOutput.timings -> (floor item of bench.meta_step.FLOOR_ITEMS, how many of it the phase needs)
FLOOR_OF_PHASE = {
    "meta_gradient.teacher_forward": ("teacher_forward_backward", 1),  # + meta_gradient.teacher_backward
    "meta_gradient.student_forward_backward": ("student_forward_backward_train", 1),
    "meta_gradient.quiz_forward_backward": ("student_forward_backward_quiz", 1),
    "meta_gradient.student_jvp": ("student_jvp", 1),
    "teacher_update": ("teacher_update", 1),
    "student_step.teacher_forward": ("teacher_forward", 1),
    "student_step.forward_backward": ("student_forward_backward_train", 1),
    "student_update": ("student_update", 1),
}


def floor_counts() -> dict[str, int]:
    """name -> count in the floor (``bench.meta_step.FLOOR_ITEMS``, the one definition)."""
    from bench.meta_step import FLOOR_ITEMS

    return {name: count for name, (count, _) in FLOOR_ITEMS.items()}


def _median(values):
    return float(statistics.median(values)) if values else float("nan")


def setup(args):
    """Teacher, student, batch, quiz batch and both optimizers (bench.meta_step's models)."""
    import torch

    from bench import meta_step

    torch.manual_seed(args.seed)
    teacher, student = meta_step.build_models(args.model, seed=args.seed, attn=args.attn, dropout=args.dropout)
    teacher.to(args.device)
    student.to(args.device)
    if args.teacher_checkpointing:  # HF activation checkpointing of the teacher's layers (the engine supports it)
        teacher.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = teacher.config.vocab_size
    seq = args.seq_len or meta_step.MODELS[args.model]["seq_len"]
    batch = meta_step.random_batch(vocab, args.batch_size, seq, generator=gen, device=args.device)
    quiz = meta_step.random_batch(vocab, args.batch_size, seq, generator=gen, device=args.device)
    opt_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[args.optimizer]
    teacher_opt = opt_cls(teacher.parameters(), lr=args.teacher_lr)
    student_opt = opt_cls(student.parameters(), lr=args.student_lr)
    return teacher, student, batch, quiz, teacher_opt, student_opt


def step_kwargs(args) -> dict:
    kwargs: dict[str, Any] = dict(algorithm=args.algorithm, temperature=args.temperature, kd_weight=args.kd_weight)
    if args.algorithm != "kd":
        kwargs["hypergrad"] = args.hypergrad
    if args.inner_lr is not None:
        kwargs["inner_lr"] = args.inner_lr
    for item in args.option or []:
        key, _, value = item.partition("=")
        kwargs[key] = json.loads(value)
    return kwargs


def run_steps(models, args, n: int) -> list[dict]:
    """``n`` meta_steps; their ``timings`` dicts (with ``(untimed)``)."""
    import fastmeta
    from bench import common

    teacher, student, batch, quiz, teacher_opt, student_opt = models
    kwargs = step_kwargs(args)
    records = []
    for _ in range(n):
        out = fastmeta.meta_step(teacher, student, batch, quiz, teacher_opt, student_opt, **kwargs)
        common.free_grads(teacher_opt, student_opt)  # as a training loop does after each step
        t = {k: float(v) for k, v in out.timings.items() if isinstance(v, (int, float))}
        top = sum(v for k, v in t.items() if not k.startswith("meta_gradient.") and k != "total")
        t["(untimed)"] = t.get("total", 0.0) - top
        records.append(t)
    return records


def _alternating(models, args, variant) -> tuple[list[float], list[float]]:
    """``args.steps`` whole steps as shipped and as many inside ``variant()`` (a context manager),
    alternating (the order flips every pair, so neither always runs second)."""
    import fastmeta
    from bench import common

    teacher, student, batch, quiz, teacher_opt, student_opt = models
    kwargs = step_kwargs(args)

    def step():
        fastmeta.meta_step(teacher, student, batch, quiz, teacher_opt, student_opt, **kwargs)
        common.free_grads(teacher_opt, student_opt)

    def varied():
        with variant():
            step()

    shipped, other = [], []
    for i in range(args.steps):
        for fn, out in ((step, shipped), (varied, other))[:: 1 if i % 2 == 0 else -1]:
            out += common.time_calls(fn, repeats=1, warmup=0, device=args.device)
    return shipped, other


def sync_ab(models, args) -> dict[str, Any]:
    """The whole step's time with the phases' CUDA synchronisations (as shipped) and without them
    (``common.phases_without_sync``), ``args.steps`` of each, alternating; medians and their ratio."""
    from bench import common

    synced, free = _alternating(models, args, common.phases_without_sync)
    a, b = _median(synced), _median(free)
    return {"with_phase_syncs_s": synced, "without_phase_syncs_s": free, "median_with_s": a,
            "median_without_s": b, "without_vs_with": b / a}


def walks_ab(models, args) -> dict[str, Any]:
    """The whole step's time as shipped (each model's parameters, buffers and submodules walked once per
    ``meta_step``: ``fastmeta._walks``) and with every walk done again at each use
    (``common.walks_every_time``, as before 2026-11-28), alternating: medians, and the median of the
    paired differences (each pair ran back to back, so a slow stretch of a shared machine hits both)."""
    from bench import common

    once, every = _alternating(models, args, common.walks_every_time)
    diffs = [b - a for a, b in zip(once, every)]
    return {"walked_once_s": once, "walked_every_time_s": every, "median_once_s": _median(once),
            "median_every_time_s": _median(every), "paired_difference_median_s": _median(diffs),
            "every_time_vs_once": _median(every) / _median(once)}


def floor_passes(models, args) -> dict[str, list[float]]:
    """Every floor item (``bench.meta_step.floor_items``, on copies of the models and optimizers: its
    updates move what they step) and the diagnostics timed alone; the models are left as found."""
    import copy

    import torch

    from bench import common
    from bench.meta_step import floor_items
    from fastmeta.functional import as_split_inputs, math_attention, student_jvp

    teacher, student, batch, quiz, teacher_opt, student_opt = models
    device = args.device
    t_copy, s_copy = copy.deepcopy(teacher), copy.deepcopy(student)
    t_opt = common.copy_optimizer(teacher_opt, teacher, t_copy)
    s_opt = common.copy_optimizer(student_opt, student, s_copy)
    passes, clear, tangents = floor_items(t_copy, s_copy, batch, quiz, t_opt, s_opt, device=device, dtype="fp32",
                                          seed=args.seed)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    s_named = {n: p for n, p in s_copy.named_parameters() if p.requires_grad}
    s_params = list(s_named.values())

    def student_fwd_bwd_math():
        with math_attention():
            logits = s_copy(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits, labels)
        torch.autograd.grad(loss, s_params, allow_unused=True)

    def double_vjp():
        with math_attention():
            logits = s_copy(**inputs).logits
            dummy = torch.zeros_like(logits, requires_grad=True)
            grads = torch.autograd.grad(logits, s_params, dummy, create_graph=True, allow_unused=True)
            pairs = [(g, tangents[n]) for g, n in zip(grads, s_named) if g is not None]
            torch.autograd.grad([g for g, _ in pairs], dummy, [t for _, t in pairs])

    split_inputs = as_split_inputs(inputs)

    def func_jvp():  # the floor's JVP through torch.func.jvp (fastmeta's until 2026-11-28): its transform layer
        student_jvp(s_copy, split_inputs, tangents, dual=False)

    # diagnostics (not in the floor)
    passes["diag: student_forward_backward_train, math attention"] = student_fwd_bwd_math
    passes["diag: student tangent by double VJP"] = double_vjp
    passes["diag: student JVP by torch.func.jvp"] = func_jvp
    out = {}
    for name, fn in passes.items():
        out[name] = common.time_calls(fn, repeats=args.floor_repeats, warmup=1, device=device)
        clear()
    # the pilot's pass runs while the teacher's graph (its activations) is alive: on a CPU the student's
    # tensors then land in memory the allocator has to map afresh (glibc: page faults), on CUDA in the
    # caching allocator's blocks.  The same pass timed right after a teacher forward whose graph it holds,
    # as in the step (a fresh graph each time: one held through repeats would let the allocator reuse):
    alive = []
    for _ in range(args.floor_repeats):
        with torch.enable_grad():
            held = t_copy(**inputs).logits
        alive += common.time_calls(passes["student_forward_backward_train"], repeats=1, warmup=0, device=device)
        del held
        clear()
    out["diag: student_forward_backward_train, teacher graph alive"] = alive
    return out


def gap_table(phases: dict[str, float], floor: dict[str, float]) -> list[tuple[str, float, str, float, float]]:
    """Rows ``(phase, step median, floor pass, floor s, gap s)``; the teacher forward/backward pair shares one pass."""
    rows = []
    phases = dict(phases)
    if "meta_gradient.teacher_forward" in phases:  # one floor pass for the pair
        phases["meta_gradient.teacher_forward"] += phases.pop("meta_gradient.teacher_backward", 0.0)
    for phase, value in phases.items():
        if phase == "total" or phase == "meta_gradient":
            continue
        if phase.startswith("meta_gradient.") and phase.split(".", 1)[1] == "total":
            continue
        name, count = FLOOR_OF_PHASE.get(phase, (None, 0))
        reference = floor.get(name, 0.0) * count if name else 0.0
        label = phase + ("+backward" if phase == "meta_gradient.teacher_forward" else "")
        rows.append((label, value, name or "-", reference, value - reference))
    # the engine's own untimed remainder
    if "meta_gradient" in phases:
        inner = sum(v for k, v in phases.items() if k.startswith("meta_gradient.") and not k.endswith(".total"))
        rows.append(("meta_gradient (untimed inside)", phases["meta_gradient"] - inner, "-", 0.0,
                     phases["meta_gradient"] - inner))
    return rows


def profile_steps(models, args) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    from bench import common

    ranges = common.wrapped_phases(lambda name: torch.profiler.record_function(f"fastmeta.{name}"))
    with ranges, profile(activities=activities, record_shapes=args.record_shapes) as prof:
        run_steps(models, args, args.steps)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    averages = prof.key_averages(group_by_input_shape=args.record_shapes)
    ops = averages.table(sort_by="self_cpu_time_total", row_limit=args.row_limit)
    if ProfilerActivity.CUDA in activities:  # the GPU's own time too (torch < 2.4 names it "cuda")
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                ops += "\n\nby GPU self time:\n" + averages.table(sort_by=key, row_limit=args.row_limit)
                break
            except (AttributeError, KeyError, ValueError):
                continue
    phases = [e for e in averages if e.key.startswith("fastmeta.")]
    phases.sort(key=lambda e: -e.cpu_time_total)
    lines = ["", f"phases (record_function ranges, totals over {args.steps} steps):"]
    for e in phases:
        lines.append(f"  {e.key:55s} {e.cpu_time_total / 1e6 / args.steps:9.4f} s/step  x{e.count // args.steps}")
    return ops + "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--algorithm", default="metadistil")
    p.add_argument("--hypergrad", default="exact")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--model", default=None, choices=["minilm", "tiny", "bert-base", "bert-base-thin"],
                   help="default: minilm on cpu, bert-base on cuda (bench.meta_step's settings)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=3, help="timed steps (median per phase)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--floor-repeats", type=int, default=3)
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--no-updates", action="store_true",
                   help="skip the optimizer updates taken apart (bench.updates; run by default with the floor)")
    p.add_argument("--profile", action="store_true", help="also run the timed steps under torch.profiler")
    p.add_argument("--sync-ab", action="store_true",
                   help="also time whole steps with and without the CUDA synchronisation around each timed phase "
                        "(alternating; what the syncs cost; on CPU there are none)")
    p.add_argument("--walks-ab", action="store_true",
                   help="also time whole steps as shipped (each model walked once per meta_step) and with every walk "
                        "over the models' parameters, buffers and submodules repeated at each use, alternating")
    p.add_argument("--record-shapes", action="store_true")
    p.add_argument("--memory", action="store_true",
                   help="also the peak memory reached inside each phase (CUDA: max_memory_allocated; CPU: RSS, Linux)")
    p.add_argument("--row-limit", type=int, default=25)
    p.add_argument("--trace", default=None, help="Chrome trace path (with --profile)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default 1 on cpu; unset on cuda)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--teacher-lr", type=float, default=2e-5)
    p.add_argument("--student-lr", type=float, default=5e-5)
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-checkpointing", action="store_true",
                   help="the teacher's layers under activation checkpointing (gradient_checkpointing_enable): "
                        "its backward recomputes each layer instead of keeping the activations")
    p.add_argument("--option", action="append", metavar="KEY=JSON",
                   help="extra meta_step option, e.g. --option atomic=false --option inner_steps=2")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from bench import common

    common.device_defaults(args)
    models = setup(args)
    records = run_steps(models, args, args.warmup + args.steps)[args.warmup:]
    keys = list(dict.fromkeys(k for r in records for k in r))
    phases = {k: _median([r[k] for r in records if k in r]) for k in keys}
    report: dict[str, Any] = {"config": vars(args), "phases": phases, "steps": records,
                              "teacher_checkpointing_active": bool(getattr(models[0], "is_gradient_checkpointing",
                                                                           False))}
    name = f"{args.algorithm}/{args.hypergrad} bs{args.batch_size}"
    where = args.device if args.device == "cpu" else f"cuda: {torch.cuda.get_device_name()}"
    print(f"== {name}: step phases, median of {args.steps} ({where}, {args.threads or torch.get_num_threads()} "
          f"thread(s))")
    for k, v in phases.items():
        print(f"  {k:55s} {v:9.4f} s")
    if not args.no_floor:
        floor_times = floor_passes(models, args)
        floor = {k: _median(v) for k, v in floor_times.items()}
        counts = floor_counts()
        floor_sum = sum(floor[k] * c for k, c in counts.items())
        report.update(floor_passes=floor_times, floor_medians=floor, floor_s=floor_sum)
        print(f"== floor passes, each alone (median of {args.floor_repeats})")
        for k, v in floor.items():
            count = counts.get(k)
            print(f"  {k:55s} {v:9.4f} s" + (f"  x{count}" if count else ""))
        print(f"  {'floor (sum)':55s} {floor_sum:9.4f} s")
        print(f"== step vs floor: {phases['total']:.4f} s / {floor_sum:.4f} s = {phases['total'] / floor_sum:.3f}x")
        rows = gap_table(phases, floor)
        report["gaps"] = rows
        print(f"  {'phase':45s} {'step s':>8s}  {'floor pass':32s} {'floor s':>8s} {'gap s':>8s}")
        for phase, value, fname, ref, gap in rows:
            print(f"  {phase:45s} {value:8.4f}  {fname:32s} {ref:8.4f} {gap:8.4f}")
    if not args.no_floor and not args.no_updates:  # the two update phases taken apart (bench.updates)
        from bench import updates

        teacher, student, _, _, teacher_opt, student_opt = models
        result = updates.measure(teacher, student, teacher_opt, student_opt, device=args.device,
                                 rounds=args.floor_repeats, seed=args.seed)
        report["updates"] = result
        print("== the optimizer updates taken apart (bench.updates, on copies of the models)")
        print(updates.format_rows(result))
    if args.sync_ab:
        ab = sync_ab(models, args)
        report["sync_ab"] = ab
        print(f"== whole step with the phases' CUDA syncs {ab['median_with_s']:.4f} s, without "
              f"{ab['median_without_s']:.4f} s (x{ab['without_vs_with']:.3f}; median of {args.steps} each, alternating)")
    if args.walks_ab:
        ab = walks_ab(models, args)
        report["walks_ab"] = ab
        print(f"== whole step walking each model once {ab['median_once_s']:.4f} s, every time "
              f"{ab['median_every_time_s']:.4f} s (paired difference {ab['paired_difference_median_s'] * 1e3:.2f} ms; "
              f"median of {args.steps} each, alternating)")
    if args.memory:
        cuda = args.device == "cuda"
        base = torch.cuda.memory_allocated() if cuda else common.current_rss_bytes()
        faults = contextlib.nullcontext({}) if cuda else common.phase_page_faults()
        with common.phase_peaks(args.device) as peaks, faults as fresh:
            run_steps(models, args, args.steps)
        record = {name: (peak - base) / 2**20 for name, peak in peaks.items()}
        report["phase_peak_mib"] = record
        report["memory_before_mib"] = base / 2**20  # absolute peak = this + a phase's figure
        if not cuda:  # fresh pages per step (minor page faults x page size): memory each phase grew into
            page = resource.getpagesize()
            report["phase_fresh_pages_mib_per_step"] = {k: n * page / 2**20 / args.steps for k, n in fresh.items()}
        what = ("max_memory_allocated", "memory allocated") if cuda else ("RSS", "RSS")
        print(f"== peak {what[0]} per phase over {args.steps} steps (MiB above the {what[1]} before them: "
              f"{base / 2**20:.1f} MiB)")
        for k, v in sorted(record.items(), key=lambda kv: -kv[1]):
            print(f"  {k:55s} {v:9.1f}")
        if not cuda:
            print("== fresh pages touched per step, per phase (minor page faults; MiB)")
            for k, v in sorted(report["phase_fresh_pages_mib_per_step"].items(), key=lambda kv: -kv[1]):
                print(f"  {k:55s} {v:9.1f}")
            # live tensors (torch.profiler's allocation events): CUDA's max_memory_allocated, on CPU
            tensor_peaks, tensors_before = common.phase_tensor_peaks(lambda: run_steps(models, args, 1),
                                                                     lambda: run_steps(models, args, args.steps))
            report["phase_tensor_peak_mib"] = {k: v / 2**20 for k, v in tensor_peaks.items()}
            report["tensors_before_mib"] = tensors_before / 2**20
            print(f"== peak bytes of live tensors per phase over {args.steps} steps (MiB above the tensors "
                  f"alive before them: {tensors_before / 2**20:.1f} MiB; torch.profiler's allocation events, after one "
                  f"step under it)")
            for k, v in sorted(report["phase_tensor_peak_mib"].items(), key=lambda kv: -kv[1]):
                print(f"  {k:55s} {v:9.1f}")
    if args.profile:
        text = profile_steps(models, args)
        report["profile"] = text
        print(f"== torch.profiler over {args.steps} steps")
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
