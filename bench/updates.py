"""The optimizer updates of a MetaDistil step, taken apart: ``python -m bench.updates [--device cuda]``.

A ``meta_step`` spends two phases on parameter updates that the floor prices as one optimizer
step each (``bench.meta_step.FLOOR_ITEMS``): ``meta_gradient.pilot_update`` (the pilot point
``θS'`` and, in the reverse sweep, the update's Jacobian product ``a = −(∂L/∂g)/η``, both by the
fused pilot op) against the student's AdamW step, and ``teacher_update`` (the teacher's AdamW step
through ``Transaction.apply``, with the undo snapshot of ``atomic=True``) against the teacher's.
On the H200 (2026-11-28) both phases took 3-5x their floor item; this prices every part of them
alone, on the bench's own models, optimizers and their state:

* student: the AdamW step as configured (the floor's ``student_update``), for-loop, foreach and
  fused; the engine's pilot (``OptimizerUpdate.pilot``) and adjoint (``OptimizerUpdate.adjoint``),
  each by the fused op (as the engine runs them) and by its plain-PyTorch twin; both again over
  the student's parameters outside its ``nn.Embedding`` tables (side ``student_dense``): what a
  row-sparse pilot, which would update only the rows a quiz batch reads, could not avoid (not built);
* teacher: the AdamW step as configured (the floor's ``teacher_update``); the finite check of
  the meta-gradient; ``optimizer.state_dict()`` alone (host work only); the undo snapshot alone
  (parameters + optimizer state copied, then released); ``Transaction.apply`` with and without
  ``atomic`` (the first is what the ``teacher_update`` phase runs).

Every row carries the bytes it must at least read + write (fp32: the parameters, gradients,
states and outputs it touches once) and, against the device's copy bandwidth measured in the
same run, the fraction of it reached.  Rows are timed in interleaved rounds (every row once per
round, a shared machine's load slows them alike; CUDA events on a GPU), medians reported.
``bench.profile_step`` runs the same rows (``update_rows``) on copies of its models.

Defaults: bench.meta_step's models (``--model``: minilm on cpu, bert-base on cuda; random
gradients of scale 1e-3, both optimizers after one real step).  ``--json PATH`` writes the rows.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

# row -> (side, bytes moved at least, in units of the side's parameter bytes)
ROWS = {
    "student: AdamW step, as configured (floor's student_update)": ("student", 7),
    "student: AdamW step, for-loop": ("student", 7),
    "student: AdamW step, foreach": ("student", 7),
    "student: AdamW step, fused": ("student", 7),
    "pilot: θ' (engine pilot, fused op)": ("student", 5),
    "pilot: θ' (twin)": ("student", 5),
    "pilot: adjoint a (engine adjoint, fused op)": ("student", 6),
    "pilot: adjoint a (twin)": ("student", 6),
    "pilot: θ' without the embedding tables (fused op)": ("student_dense", 5),
    "pilot: adjoint a without the embedding tables (fused op)": ("student_dense", 6),
    "teacher: AdamW step, as configured (floor's teacher_update)": ("teacher", 7),
    "teacher: finite check of the meta-gradient": ("teacher", 1),
    "teacher: optimizer.state_dict() (host only)": ("teacher", 0),
    "teacher: undo snapshot alone (copy + release)": ("teacher", 6),
    "teacher: Transaction.apply, atomic (teacher_update phase)": ("teacher", 13),
    "teacher: Transaction.apply, atomic=False": ("teacher", 7),
}
# what each row moves: student rows read θ, g, m, s (+ v for the adjoint) and write θ', m', s' (AdamW), θ'
# (pilot) or a (adjoint); the snapshot reads and writes θ, m, s; the atomic apply is the snapshot + the step


def update_rows(teacher, student, teacher_opt, student_opt, *, device: str, seed: int = 0
                ) -> dict[str, Callable[[], Any] | str]:
    """``{row: fn, or the reason it cannot run}`` for every row of :data:`ROWS`, on COPIES of the models and
    optimizers (``teacher_opt``/``student_opt`` with state, AdamW): the originals are left as found."""
    import torch

    from bench import common
    from fastmeta.algorithms._common import Transaction, _Snapshot, check_finite_grads, trainable
    from fastmeta.engine.optimizer import optimizer_update
    
    t_copy, s_copy = copy.deepcopy(teacher), copy.deepcopy(student)
    t_named, s_named = dict(trainable(t_copy)), dict(trainable(s_copy))
    gen = torch.Generator().manual_seed(seed + 13)

    def noise(named):
        return {n: (torch.randn(p.shape, generator=gen) * 1e-3).to(device=device, dtype=p.dtype)
                for n, p in named.items()}

    s_grads, s_vectors, t_grads = noise(s_named), noise(s_named), noise(t_named)
    rows: dict[str, Callable[[], Any] | str] = {}

    def stepper(optimizer, named, grads):
        pairs = [(p, grads[n]) for n, p in named.items()]

        def fn():
            for p, g in pairs:
                p.grad = g
            optimizer.step()

        fn.params, fn.optimizer = [p for p, _ in pairs], optimizer  # what it steps, and how (tests read them)
        return fn

    s_opt = common.copy_optimizer(student_opt, student, s_copy)
    rows["student: AdamW step, as configured (floor's student_update)"] = stepper(s_opt, s_named, s_grads)
    for label, flags in (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                         ("fused", dict(fused=True))):
        name = f"student: AdamW step, {label}"
        try:
            replica = copy.deepcopy(student)
            opt = common.copy_optimizer(student_opt, student, replica, **flags)
            fn = stepper(opt, dict(trainable(replica)), s_grads)
            fn()  # fused/foreach refuse some devices and dtypes at the first step
            rows[name] = fn
        except (RuntimeError, TypeError, ValueError) as exc:
            rows[name] = f"{type(exc).__name__}: {exc}"[:200]

    update = optimizer_update(s_named, s_opt, inner_lr=None)
    theta = {n: p.detach() for n, p in s_named.items()}
    states = update.states

    # the engine's calls (pilot_update's two parts) by the fused op ("auto") and by its twin ("torch"), returning
    # what the engine uses: {name: θ'}, {name: a}
    def pilot(backend):
        return lambda: update.pilot(theta, s_grads, states, backend=backend)[0]

    def adjoint(backend):
        return lambda: update.adjoint(theta, s_grads, states, s_vectors, full=False, backend=backend)[1]

    rows["pilot: θ' (engine pilot, fused op)"] = pilot("auto")
    rows["pilot: θ' (twin)"] = pilot("torch")
    rows["pilot: adjoint a (engine adjoint, fused op)"] = adjoint("auto")
    rows["pilot: adjoint a (twin)"] = adjoint("torch")
    dense = dense_parameters(s_copy)
    dense_update = optimizer_update(dense, s_opt, inner_lr=None)
    theta_d, grads_d, vectors_d = ({n: d[n] for n in dense} for d in (theta, s_grads, s_vectors))
    rows["pilot: θ' without the embedding tables (fused op)"] = \
        lambda: dense_update.pilot(theta_d, grads_d, dense_update.states)[0]
    rows["pilot: adjoint a without the embedding tables (fused op)"] = \
        lambda: dense_update.adjoint(theta_d, grads_d, dense_update.states, vectors_d, full=False)[1]

    t_opt = common.copy_optimizer(teacher_opt, teacher, t_copy)
    t_params = list(t_named.items())
    rows["teacher: AdamW step, as configured (floor's teacher_update)"] = stepper(t_opt, t_named, t_grads)
    rows["teacher: finite check of the meta-gradient"] = lambda: check_finite_grads(t_grads, "teacher meta-gradient")
    rows["teacher: optimizer.state_dict() (host only)"] = t_opt.state_dict
    rows["teacher: undo snapshot alone (copy + release)"] = lambda: _Snapshot(list(t_named.values()), t_opt).release()

    def apply(atomic: bool):
        def fn():
            transaction = Transaction(atomic=atomic)
            transaction.apply(t_opt, t_params, t_grads)
            transaction.finish()
        return fn

    rows["teacher: Transaction.apply, atomic (teacher_update phase)"] = apply(True)
    rows["teacher: Transaction.apply, atomic=False"] = apply(False)
    assert list(rows) == list(ROWS)
    return rows


def dense_parameters(model) -> dict:
    """``{name: parameter}`` of the trainable parameters that are not the weight of an ``nn.Embedding``."""
    import torch

    from fastmeta.algorithms._common import trainable

    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {n: p for n, p in trainable(model) if id(p) not in tables}


def time_rows(rows: dict[str, Callable[[], Any] | str], *, device: str, rounds: int, warmup: int = 1
              ) -> dict[str, list[float] | str]:
    """Seconds of every runnable row in ``rounds`` interleaved rounds (after ``warmup`` calls each)."""
    from bench import common

    runnable = {name: fn for name, fn in rows.items() if callable(fn)}
    for fn in runnable.values():
        common.time_calls(fn, repeats=1, warmup=warmup, device=device)
    times: dict[str, list[float]] = {name: [] for name in runnable}
    for _ in range(rounds):
        for name, fn in runnable.items():
            times[name] += common.time_calls(fn, repeats=1, warmup=0, device=device)
    return {name: times.get(name, fn) for name, fn in rows.items()}


def report_rows(times: dict[str, list[float] | str], *, teacher_bytes: int, student_bytes: int,
                copy_bytes_per_s: float | None, student_dense_bytes: int) -> list[dict[str, Any]]:
    """One dict per row: median, minimum bytes, GB/s, fraction of copy bandwidth, x the optimizer step of its side
    (``student_dense`` rows: x the whole student's step; their bytes from ``student_dense_bytes``, the
    student's parameters outside its embedding tables)."""
    from bench import common

    side_bytes = {"teacher": teacher_bytes, "student": student_bytes, "student_dense": student_dense_bytes}
    reference = {"student": "student: AdamW step, as configured (floor's student_update)",
                 "teacher": "teacher: AdamW step, as configured (floor's teacher_update)"}
    reference["student_dense"] = reference["student"]
    medians = {name: common.median(t) for name, t in times.items() if not isinstance(t, str)}
    out = []
    for name, t in times.items():
        side, units = ROWS[name]
        row: dict[str, Any] = {"row": name, "side": side, "bytes_min": units * side_bytes[side]}
        if isinstance(t, str):
            out.append(dict(row, skipped=t))
            continue
        seconds = medians[name]
        row.update(times_s=t, median_s=seconds, gb_per_s=row["bytes_min"] / seconds / 1e9)
        row["pct_copy_bw"] = 100 * row["bytes_min"] / seconds / copy_bytes_per_s if copy_bytes_per_s else None
        ref = medians.get(reference[side])
        row["x_optimizer_step"] = seconds / ref if ref else None
        out.append(row)
    return out


def measure(teacher, student, teacher_opt, student_opt, *, device: str, rounds: int, seed: int = 0
            ) -> dict[str, Any]:
    """The rows (:func:`report_rows`) and what they are measured against."""
    from bench import common

    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    dense_bytes = sum(p.numel() * p.element_size() for p in dense_parameters(student).values())

    rows = update_rows(teacher, student, teacher_opt, student_opt, device=device, seed=seed)
    times = time_rows(rows, device=device, rounds=rounds)
    del rows  # the copies
    copy_bw = common.copy_bandwidth(device, lambda fn: common.median(
        common.time_calls(fn, repeats=max(rounds, 3), warmup=1, device=device)))
    return {"rounds": rounds, "teacher_param_bytes": nbytes(teacher), "student_param_bytes": nbytes(student),
            "student_dense_param_bytes": dense_bytes, "copy_bandwidth_bytes_per_s": copy_bw,
            "rows": report_rows(times, teacher_bytes=nbytes(teacher), student_bytes=nbytes(student),
                                copy_bytes_per_s=copy_bw, student_dense_bytes=dense_bytes)}


def format_rows(result: dict[str, Any]) -> str:
    bw = result["copy_bandwidth_bytes_per_s"]
    lines = [f"copy bandwidth {bw / 1e9:.1f} GB/s; teacher {result['teacher_param_bytes'] / 2**20:.0f} MiB, "
             f"student {result['student_param_bytes'] / 2**20:.0f} MiB of trainable parameters "
             f"({result.get('student_dense_param_bytes', 0) / 2**20:.0f} MiB outside its embedding tables); median of "
             f"{result['rounds']} interleaved rounds",
             f"  {'row':62s} {'ms':>9s} {'x step':>7s} {'GB/s':>7s} {'% copy':>7s}"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"  {r['row']:62s} skipped: {r['skipped']}")
            continue
        x = f"{r['x_optimizer_step']:7.2f}" if r["x_optimizer_step"] else f"{'-':>7s}"
        pct = f"{r['pct_copy_bw']:7.1f}" if r["pct_copy_bw"] is not None and r["bytes_min"] else f"{'-':>7s}"
        lines.append(f"  {r['row']:62s} {r['median_s'] * 1e3:9.3f} {x} {r['gb_per_s']:7.1f} {pct}")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.updates", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, choices=["minilm", "tiny", "bert-base"],
                   help="default: minilm on cpu, bert-base on cuda (bench.meta_step's settings)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default 1 on cpu; unset on cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from bench import common, meta_step

    common.device_defaults(args)
    teacher, student = meta_step.build_models(args.model, seed=args.seed, attn="sdpa", dropout=None)
    teacher.to(args.device)
    student.to(args.device)
    teacher_opt = torch.optim.AdamW(teacher.parameters(), lr=2e-5)  # bench.meta_step's optimizers
    student_opt = torch.optim.AdamW(student.parameters(), lr=5e-5)
    for model, opt in ((teacher, teacher_opt), (student, student_opt)):  # one step: the state exists
        for q in model.parameters():
            q.grad = torch.full_like(q, 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    result = measure(teacher, student, teacher_opt, student_opt, device=args.device, rounds=args.rounds,
                     seed=args.seed)
    where = args.device if args.device == "cpu" else f"cuda: {torch.cuda.get_device_name()}"
    print(f"== optimizer updates of a MetaDistil step, {args.model} ({where}, "
          f"{args.threads or torch.get_num_threads()} thread(s))")
    print(format_rows(result))
    report = {"config": vars(args), "environment": common.environment_info(args.device), **result}
    if args.json:
        common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
