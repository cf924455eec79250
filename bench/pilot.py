"""Micro benchmark of the pilot step: ``python -m bench.pilot [--device cpu] [--repeats 7]``.

The meta-gradient engine's pilot applies ONE student optimizer update to every
student parameter (``θ'``) and, in the reverse sweep, the product of that update's
Jacobian with the quiz gradient (``adj = −lr·D ⊙ v``).  This times, on a 15.6M
parameter list shaped like the 2-layer all-MiniLM student (one 30522x384 word
embedding + position/type embeddings + 2 BERT layers + pooler; fp32), AdamW
(lr 5e-4, wd 0.01) at step 11 (state present):

* ``torch.optim.AdamW.step()``, ``foreach=True`` and ``foreach=False`` (in place:
  the reference cost, "one optimizer step");
* ``fastmeta.ops.adam_pilot`` with the extension (one fused multi-tensor op) and with
  its plain-PyTorch twin (``backend="torch"``), in the modes the engine uses:
  ``step`` (θ' only: the pilot trajectory), ``vjp`` (adj only: the reverse sweep, last
  step), ``step+vjp`` (both in one pass) and ``step+state`` (θ', m', s': trajectories
  of several steps);
* the engine's own per-parameter Python path (``fastmeta.engine.optimizer``:
  ``OptimizerUpdate.step`` + ``vjp``), when importable.

Median of ``--repeats`` rounds after one warm-up, the candidates timed in turn in
every round (a shared machine's load slows them alike); ratios are to the foreach
AdamW step.  No result file: the table is printed (numbers for the performance work).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def minilm_student_shapes(layers: int = 2, hidden: int = 384, intermediate: int = 1536, vocab: int = 30522):
    shapes = [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(candidates, device, repeats: int) -> list:
    """Median seconds of each ``(name, fn)``, the candidates timed in turn within every round (a
    shared, loaded machine slows all of them alike); one warm-up call each first."""
    for _, fn in candidates:
        fn()
    _sync(device)
    times = [[] for _ in candidates]
    for _ in range(repeats):
        for k, (_, fn) in enumerate(candidates):
            start = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    return [(name, statistics.median(t)) for (name, _), t in zip(candidates, times)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    from fastmeta import ops

    gen = torch.Generator().manual_seed(0)
    shapes = minilm_student_shapes()

    def make(scale=1.0):
        return [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]

    params = [p.requires_grad_(False) for p in make(0.05)]
    grads = make(1e-3)
    vectors = make(1e-3)
    n = sum(p.numel() for p in params)
    hyper = dict(lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    # optimizer state after 10 steps
    optimizers = {}
    for foreach in (True, False):
        ps = [p.clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(ps, foreach=foreach, **hyper)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        for _ in range(10):
            opt.step()
        optimizers[foreach] = (opt, ps)
    opt, ps = optimizers[True]
    state = [opt.state[p] for p in ps]
    m = [s["exp_avg"] for s in state]
    s2 = [s["exp_avg_sq"] for s in state]
    common = dict(lr=hyper["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, step=11,
                  adj_scale=1.0)

    candidates = [("torch.optim.AdamW.step (foreach)", lambda: optimizers[True][0].step()),
                  ("torch.optim.AdamW.step (single-tensor)", lambda: optimizers[False][0].step())]
    have_ext = ops.extension_ops_available(device)
    modes = {
        "step": dict(vectors=None, compute_params=True, compute_state=False),
        "vjp": dict(vectors=vectors, compute_params=False, compute_state=False),
        "step+vjp": dict(vectors=vectors, compute_params=True, compute_state=False),
        "step+state": dict(vectors=None, compute_params=True, compute_state=True),
    }
    for backend in (["extension"] if have_ext else []) + ["torch"]:
        for mode, kw in modes.items():
            def fn(kw=kw, backend=backend):
                return ops.adam_pilot(params, grads, m, s2, None, backend=backend, **kw, **common)

            candidates.append((f"ops.adam_pilot {mode} ({'fused op' if backend == 'extension' else 'twin'})", fn))
    try:
        from fastmeta.engine.optimizer import optimizer_update
    except ImportError:
        optimizer_update = None
    if optimizer_update is not None:
        named = {str(i): p for i, p in enumerate(ps)}
        update = optimizer_update(named, opt, inner_lr=None)
        names = list(named)

        def engine_step():
            with torch.no_grad():
                for name, g in zip(names, grads):
                    update.step(name, named[name].detach(), g, update.initial_state(name))

        def engine_vjp():
            with torch.no_grad():
                for name, g, v in zip(names, grads, vectors):
                    update.vjp(name, named[name].detach(), g, update.initial_state(name), v)

        candidates.append(("engine OptimizerUpdate.step (per tensor)", engine_step))
        candidates.append(("engine OptimizerUpdate.vjp (per tensor)", engine_vjp))
    rows = time_interleaved(candidates, device, args.repeats)
    t_ref = rows[0][1]

    print(f"pilot micro benchmark: {n / 1e6:.2f}M parameters in {len(shapes)} tensors, {args.dtype}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; extension: {have_ext}")
    width = max(len(r[0]) for r in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds * 1e3:9.2f} ms   {seconds / t_ref:5.2f}x AdamW(foreach)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
