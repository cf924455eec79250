"""``python -m bench.growth``: how a training step's time and memory grow with batch size and sequence length.

The grid: batch size 4 / 16 / 32 x sequence length 128 / 256, and per cell the steps of

- ``kd``                    plain distillation (``fastmeta.meta_step(algorithm="kd")``);
- ``metadistil/exact``      fastmeta's exact meta-gradient;
- ``metadistil/autograd``   fastmeta's double backward (the reference);
- ``metadistil/finite_diff`` fastmeta's in-place central differences;
- ``metadistil/exact+double_vjp``  exact with ``student_tangent="double_vjp"`` (the tangent through the
  pilot's kept graph);
- ``metadistil/exact+teacher_recompute``  exact with ``teacher_graph="recompute"`` (no teacher graph
  through the student's passes, one more teacher forward);
- ``peer/higher``, ``peer/torchopt``  the MetaDistil step written with higher / TorchOpt
  (``bench/peers.py``; a peer that is not installed is reported, never faked).

Each (method, cell) is ``bench.meta_step``'s own worker (same models, batches, optimizers, KD loss,
timing and memory accounting): median wall time of ``--repeats`` steps after ``--warmup``, and the
step memory (CPU: peak RSS of a fresh process per configuration minus its RSS before the first step;
CUDA: ``max_memory_allocated`` minus the memory allocated before the steps, one process, everything
of the previous configuration freed).  Cells run from the smallest (batch x seq) to the largest, so a
run cut short by ``--deadline`` / ``--time-budget-s`` keeps every method at the small sizes.

Sizes:

- ``--device cpu`` (default): teacher all-MiniLM-L6-v2 (6L/384) -> its first 2 layers, fp32, one
  intra-op thread per worker, warm-up 1, 2 timed steps: about 25 minutes on 2 idle cores (36
  configurations; the bs 32 x seq 256 cell is most of it).
- ``--device cuda``: BERT-base shape (random init) -> 6 layers, fp32, warm-up 1, 3 timed steps, one
  process (``make gpu-check`` runs it after ``bench.meta_step``).
- ``--model tiny``: tests and the gpu-check dry run.

Results: ``bench/results/growth_<device>.{json,md,png}``: one row per (method, batch, seq); the
markdown has a time table and a step-memory table per sequence length and each method's growth from
the smallest to the largest cell; the PNG has two panels (step time, step memory against batch size;
one line per method and sequence length).  ``--replot JSON`` redraws the markdown and PNG.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import common, meta_step

METHODS = ("kd", "metadistil/exact", "metadistil/autograd", "metadistil/finite_diff", "metadistil/exact+double_vjp",
           "metadistil/exact+teacher_recompute", "peer/higher", "peer/torchopt")


def cells(args) -> list[tuple[int, int]]:
    """(batch size, seq len), smallest batch x seq first."""
    grid = [(b, s) for s in args.seq_lens for b in args.batch_sizes]
    return sorted(grid, key=lambda c: (c[0] * c[1], c[1], c[0]))


def _runner(args):
    ns = argparse.Namespace(isolation=args.isolation, worker_timeout=args.worker_timeout, threads=args.threads)
    return meta_step._runner(ns)


def run_grid(args, log, deadline: float | None = None, on_progress=None) -> list[dict[str, Any]]:
    base = dict(device=args.device, seed=args.seed, attn=args.attn, dropout=None, optimizer="adamw",
                teacher_lr=args.teacher_lr, student_lr=args.student_lr, inner_lr=None,
                temperature=args.temperature, kd_weight=args.kd_weight, warmup=args.warmup,
                repeats=args.repeats, threads=args.threads, cache_models=args.isolation == "inprocess",
                model=args.model, dtype=args.dtype, kind="step")
    runner = _runner(args)
    methods = [meta_step.parse_conf_name(m) for m in args.methods]
    rows: list[dict[str, Any]] = []
    for bs, seq in cells(args):
        for alg, hg, peer, variant in methods:
            name = meta_step.conf_name(alg, hg, peer, variant)  # the method names parse_conf_name reads
            row: dict[str, Any] = {"method": name, "algorithm": alg, "hypergrad": hg, "peer": peer,
                                   "variant": variant, "batch_size": bs, "seq_len": seq}
            if deadline is not None and time.time() >= deadline:
                rows.append(dict(row, skipped="time"))
                continue
            spec = dict(base, batch_size=bs, seq_len=seq, algorithm=alg, hypergrad=hg, peer=peer, variant=variant)
            t0 = time.perf_counter()
            try:
                res = runner(spec)
            except Exception as exc:  # noqa: BLE001 - OOM, a failing peer: recorded, the grid goes on
                row["error"] = meta_step._error_text(exc)
                log(f"[bs{bs} seq{seq}] {name}: FAILED\n{row['error']}")
            else:
                if "skipped" in res:
                    row["skipped"] = res["skipped"]
                    log(f"[bs{bs} seq{seq}] {name}: skipped ({res['skipped']})")
                else:
                    mem = res["memory"]
                    row.update(median_s=res["median_s"], times_s=res["times_s"], peak_bytes=mem["peak_bytes"],
                               step_memory_bytes=mem["step_memory_bytes"], memory=mem,
                               parameters_finite_after=res["parameters_finite_after"],
                               peer_version=res.get("peer_version"))
                    log(f"[bs{bs} seq{seq}] {name}: {res['median_s']:.3f} s, step memory "
                        f"{common.fmt_bytes(mem['step_memory_bytes'])} ({time.perf_counter() - t0:.0f} s)")
            rows.append(row)
            if on_progress is not None:
                on_progress(rows)
    add_ratios(rows)
    return rows


def _ok(r: dict[str, Any]) -> bool:
    return "median_s" in r


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per cell: time and step memory over plain KD's and over fastmeta exact's."""
    for r in rows:
        if not _ok(r):
            continue
        same = [o for o in rows if _ok(o) and o["batch_size"] == r["batch_size"] and o["seq_len"] == r["seq_len"]]
        for ref_name, key in (("kd", "kd"), ("metadistil/exact", "exact")):
            ref = next((o for o in same if o["method"] == ref_name), None)
            r[f"time_vs_{key}"] = r["median_s"] / ref["median_s"] if ref else None
            r[f"step_memory_vs_{key}"] = (r["step_memory_bytes"] / ref["step_memory_bytes"]
                                          if ref and ref["step_memory_bytes"] > 0 else None)


def growth_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and seq: time and step memory at the largest batch over the smallest."""
    out: dict[str, Any] = {}
    for r in rows:
        if not _ok(r):
            continue
        key = f"{r['method']} seq{r['seq_len']}"
        out.setdefault(key, []).append(r)
    summary = {}
    for key, rs in out.items():
        rs.sort(key=lambda r: r["batch_size"])
        lo, hi = rs[0], rs[-1]
        if lo is hi:
            continue
        summary[key] = {"from_batch": lo["batch_size"], "to_batch": hi["batch_size"],
                        "time_growth": hi["median_s"] / lo["median_s"],
                        "step_memory_growth": (hi["step_memory_bytes"] / lo["step_memory_bytes"]
                                               if lo["step_memory_bytes"] > 0 else None)}
    return summary


# =========================================================================== reports
def render_markdown(report: dict[str, Any]) -> str:
    env, opts = report["environment"], report["options"]
    rows = report["rows"]
    lines = [f"# Step time and memory against batch size and sequence length ({env['device']}: "
             f"{env['device_name']})", "",
             f"Measured {env['date_utc']} with `{env['command']}`; torch {env['versions']['torch']}, "
             f"transformers {env['versions']['transformers']}, python {env['versions']['python']}. {env['note']}", "",
             f"Models: {report['models']}; {opts['dtype']}; AdamW for both models; warm-up {opts['warmup']} "
             f"step(s), median of {opts['repeats']} timed step(s) per configuration. {report['memory_note']}", ""]
    if report.get("incomplete"):
        lines += [f"**Incomplete run**: {report['incomplete']}", ""]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    for seq in sorted({r["seq_len"] for r in rows}):
        for title, fmt_cell in (("step time (s; x plain KD)", _time_cell), ("step memory (x plain KD)", _mem_cell)):
            table = []
            for m in methods:
                cells_ = []
                for b in batches:
                    r = next((x for x in rows if x["method"] == m and x["batch_size"] == b and x["seq_len"] == seq),
                             None)
                    cells_.append(fmt_cell(r))
                table.append([m] + cells_)
            lines += [f"## seq {seq}: {title}", "",
                      common.markdown_table(["method"] + [f"bs {b}" for b in batches], table)]
    g = report.get("growth") or {}
    if g:
        lines += ["## Growth from the smallest to the largest batch", "",
                  common.markdown_table(["method, seq", "batches", "time growth", "step memory growth"],
                                        [[k, f"{v['from_batch']} -> {v['to_batch']}", common.fmt(v["time_growth"], 2, "x"),
                                          common.fmt(v["step_memory_growth"], 2, "x")] for k, v in g.items()])]
    lines += ["Peers (bench/peers.py): " + "; ".join(
        f"{k}: {'version ' + v['version'] if v['available'] else v['reason']}" for k, v in report["peers"].items()), ""]
    return "\n".join(lines)


def _problem(r) -> str | None:
    if r is None:
        return "—"
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    if "error" in r:
        last = r["error"].strip().splitlines()[-1]
        return "failed: " + ("out of memory" if "out of memory" in r["error"].lower() else last[:60])
    return None


def _time_cell(r) -> str:
    p = _problem(r)
    return p if p else f"{r['median_s']:.3f} ({common.fmt(r.get('time_vs_kd'), 2, 'x')})"


def _mem_cell(r) -> str:
    p = _problem(r)
    return p if p else f"{common.fmt_bytes(r['step_memory_bytes'])} ({common.fmt(r.get('step_memory_vs_kd'), 2, 'x')})"


def render_chart(report: dict[str, Any], path: Path) -> bool:
    """ONE figure, two panels: step time and step memory against batch size; a line per method and seq."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (`python -m bench.growth --replot` elsewhere)")
        return False
    rows = [r for r in report["rows"] if _ok(r)]
    if not rows:
        return False
    env = report["environment"]
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    seqs = sorted({r["seq_len"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.2))
    for mi, m in enumerate(methods):
        for si, seq in enumerate(seqs):
            pts = sorted((r["batch_size"], r["median_s"], r["step_memory_bytes"]) for r in rows
                         if r["method"] == m and r["seq_len"] == seq)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            kw = dict(color=colors[mi % len(colors)], linestyle=styles[si % len(styles)],
                      marker=markers[mi % len(markers)], label=f"{m}, seq {seq}")
            axes[0].plot(xs, [p[1] for p in pts], **kw)
            axes[1].plot(xs, [max(p[2], 0) / 2**20 for p in pts], **kw)
    batches = sorted({r["batch_size"] for r in rows})
    for ax, title, unit in ((axes[0], "median step time", "seconds"),
                            (axes[1], "step memory" + (" (peak RSS - RSS before steps)" if env["device"] == "cpu"
                                                       else " (peak allocated - allocated before steps)"), "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Step cost against batch size and sequence length: {report['models_short']} on "
                 f"{env['device']} ({env['device_name']})", fontsize=11)
    fig.text(0.01, 0.005, f"{env['date_utc']}; torch {env['versions']['torch']}"
             + ("; shared machine, timings noisy" if env.get("shared_machine") else ""), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# =========================================================================== main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, choices=["minilm", "bert-base", "tiny"],
                   help="default: minilm on cpu, bert-base on cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per configuration (default 1 on CPU: the sweep's time is mostly the largest "
                        "cell's steps; 3 on CUDA)")
    p.add_argument("--teacher-lr", type=float, default=2e-5)
    p.add_argument("--student-lr", type=float, default=5e-5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per worker (default 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolation", choices=["subprocess", "inprocess"], default=None,
                   help="default: subprocess on CPU (clean peaks), inprocess on CUDA")
    p.add_argument("--worker-timeout", type=float, default=1800)
    p.add_argument("--deadline", type=float, default=None, help="time.time() after which nothing new starts")
    p.add_argument("--time-budget-s", type=float, default=None, help="the same, relative to the start")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--tag", default=None, help="result file stem (default growth_<device>)")
    p.add_argument("--shared-machine", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--replot", metavar="JSON", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.model = args.model or ("bert-base" if cuda else "minilm")
    if args.repeats is None:
        args.repeats = 3 if cuda else 1
    if args.isolation is None:
        args.isolation = "inprocess" if cuda else "subprocess"
    if args.threads is None and not cuda:
        args.threads = 1
    for m in args.methods:
        meta_step.parse_conf_name(m)
    return args


def _memory_note(args) -> str:
    if args.device == "cuda":
        return ("Step memory: torch.cuda.max_memory_allocated over the steps minus the memory allocated just before "
                "them (models and inputs excluded; optimizer state, created at the first step, included).")
    if args.isolation == "subprocess":
        return ("Step memory: peak RSS (VmHWM, reset after set-up) of one fresh process per configuration minus its "
                "RSS just before the first step (models and inputs excluded; optimizer state, created at the first "
                "step, included).")
    return "In-process run (tests): CPU peaks are process-wide and not comparable."


def replot(json_path: str) -> None:
    common.replot(json_path, render_markdown, render_chart)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.replot:
        replot(args.replot)
        return {}
    common.require_device(args.device)
    common.quiet_transformers()
    from bench import peers

    shared = {"auto": None, "yes": True, "no": False}[args.shared_machine]
    env = common.environment_info(args.device, shared_machine=shared)
    env["worker_threads"] = args.threads or env["torch_threads"]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    deadline = common.resolve_deadline(args.deadline, args.time_budget_s)
    out_dir = Path(args.out_dir)
    stem = args.tag or f"growth_{args.device}"
    used_peers = sorted({meta_step.parse_conf_name(m)[2] for m in args.methods} - {None})

    def report_for(rows) -> dict[str, Any]:
        skipped = sum(1 for r in rows if r.get("skipped") == "time")
        report = {
            "benchmark": "growth", "environment": env,
            "models": meta_step.MODELS[args.model]["desc"],
            "models_short": {"minilm": "MiniLM-L6 -> 2 layers", "bert-base": "BERT-base shape -> 6 layers",
                             "tiny": "tiny BERT -> 1 layer"}[args.model],
            "options": {k: v for k, v in vars(args).items()},
            "memory_note": _memory_note(args),
            "peers": {p: peers.availability(p) for p in used_peers},
            "rows": rows, "growth": growth_summary(rows),
            "total_wall_s": time.perf_counter() - t0,
        }
        if skipped:
            report["incomplete"] = f"{skipped} configuration(s) skipped (time): the deadline passed before they started"
        return report

    def partial(rows) -> None:
        rep = report_for([dict(r) for r in rows])
        rep["partial"] = True
        common.write_json(out_dir / f"{stem}.json", rep)

    log(f"growth: {len(cells(args))} cells x {len(args.methods)} methods on {args.device} ({args.model})")
    rows = run_grid(args, log, deadline=deadline, on_progress=partial)
    env["load_average_at_end"] = common.load_average()
    report = report_for(rows)
    common.write_json(out_dir / f"{stem}.json", report)
    md = render_markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    drew = render_chart(report, out_dir / f"{stem}.png")
    print(md)
    print(f"wrote {out_dir / stem}.{{json,md{',png' if drew else ''}}} in {report['total_wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
