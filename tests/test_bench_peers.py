"""The benchmark's peers (``bench/peers.py``) compute what fastmeta computes.

The MetaDistil step written with ``higher`` and with TorchOpt (the rows ``"peer": "higher" |
"torchopt"`` of ``bench.meta_step`` / ``bench.growth``) is checked here against fastmeta on a tiny
BERT (the benchmark's own ``--model tiny`` builder, HF dict batches), in float64, dropout off:

* the teacher's meta-gradient of one step against ``fastmeta.meta_grad(..., hypergrad="exact",
  student_optimizer=...)``;
* three whole steps (meta-gradient, teacher update, real student step) against
  ``fastmeta.meta_step(algorithm="metadistil", hypergrad="exact")``: both models' parameters after.

Configuration points (tests/test_engine_peers.py measured them): higher's Adam/AdamW adds ``eps``
before the bias correction (torch < 1.3), so higher's AdamW is compared at ``eps = 0`` (the two
coincide there), with a warmed optimizer (at the first Adam step with ``eps = 0`` the update is
``lr·sign(g)``, whose derivative is 0) and the student's embeddings frozen (rows no batch touches
have ``v = 0``: ``0/0`` with ``eps = 0``, in torch as in higher).  The student's attention key biases are
frozen in every case (their gradient is 0 in exact arithmetic, an exact 0 on some CPUs:
``_freeze_key_biases``).  The float64 default dtype gives torch's step counters float64 (higher copies them) and TorchOpt's ``1 − β^t`` float64, and TorchOpt
runs with ``eps_root=0`` (torch's arithmetic).  In the benchmark the peers run as users run them
(eps 1e-8, fp32 counters, TorchOpt's ``eps_root=1e-16`` against NaN meta-gradients): same cost,
slightly different numbers.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

pytest.importorskip("transformers")

from bench import peers  # noqa: E402
from bench.meta_step import build_models, random_batch  # noqa: E402

TAU, W = 2.0, 0.5


@contextlib.contextmanager
def _float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _problem(seed=0):
    teacher, student = build_models("tiny", seed=seed, attn="sdpa", dropout=0.0)
    teacher.double()
    student.double()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [random_batch(1000, 3, 8, generator=g, device="cpu") for _ in range(4)]
    quizzes = [random_batch(1000, 3, 8, generator=g, device="cpu") for _ in range(4)]
    return teacher, student, batches, quizzes


def _freeze_embeddings(model):
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)


def _freeze_key_biases(model):
    """The attention key biases: softmax is invariant to the constant ``q·b_k`` it adds to a query's scores,
    so their gradient is zero in exact arithmetic, and computed as an exact 0 or as rounding noise depending
    on the CPU's kernels (exact zeros on an AMD EPYC, noise on an Intel Xeon).  Where it is an exact 0,
    Adam's ``v`` stays 0, and the arithmetic these comparisons need (``eps = 0``, TorchOpt's ``eps_root = 0``)
    divides 0 by 0."""
    for layer in model.bert.encoder.layer:
        layer.attention.self.key.bias.requires_grad_(False)


def _warm(student, optimizer, batch, steps):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(student(**inputs).logits, batch["labels"]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    assert den > 0
    return num / den


def _exact_arithmetic(name):
    """TorchOpt with eps_root=0 (torch's arithmetic; the benchmark's 1e-16 guards exact-zero gradients)."""
    return {"eps_root": 0.0} if name == "torchopt" else {}


# (peer, student optimizer, freeze the student's embeddings, warm-up steps of the student optimizer)
CASES = {
    "torchopt-adamw": ("torchopt", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), False, 0),
    "torchopt-sgd_momentum": ("torchopt", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), False, 0),
    "higher-sgd_momentum": ("higher", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                            False, 2),
    "higher-adamw_eps0": ("higher", lambda p: torch.optim.AdamW(p, lr=1e-2, eps=0.0, weight_decay=0.01), True, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peer_meta_gradient_matches_fastmeta_exact(case):
    name, make_opt, freeze, warm_steps = CASES[case]
    pytest.importorskip(name, reason=f"optional peer library {name} (pip install .[bench])")
    import fastmeta

    with _float64():
        teacher, student, batches, quizzes = _problem()
        if freeze:
            _freeze_embeddings(student)
        _freeze_key_biases(student)
        student_opt = make_opt([p for p in student.parameters() if p.requires_grad])
        teacher_opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
        _warm(student, student_opt, quizzes[1], warm_steps)
        ours = fastmeta.meta_grad(teacher, student, batches[0], quizzes[0], inner_lr=None, temperature=TAU,
                                  kd_weight=W, hypergrad="exact", student_optimizer=student_opt)
        peer = peers.make_peer(name, teacher, student, teacher_opt, student_opt, temperature=TAU, kd_weight=W,
                               **_exact_arithmetic(name))
        if name == "torchopt" and warm_steps:
            pytest.fail("TorchOpt keeps its own state: compare it from a fresh optimizer")
        grads, losses = peer.meta_gradient(batches[0], quizzes[0])
    names = [n for n, p in teacher.named_parameters() if p.requires_grad]
    assert set(ours) == set(names)
    err = _rel(grads, [ours[n] for n in names])
    print(f"{case}: meta-gradient rel. error {err:.2e}")
    assert err <= 1e-10
    assert torch.isfinite(losses["quiz_loss"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_peer_steps_match_fastmeta_meta_step(case):
    """Three whole MetaDistil steps: both models end where fastmeta's meta_step leaves them."""
    name, make_opt, freeze, warm_steps = CASES[case]
    pytest.importorskip(name, reason=f"optional peer library {name} (pip install .[bench])")
    import fastmeta

    with _float64():
        teacher, student, batches, quizzes = _problem(1)
        if freeze:
            _freeze_embeddings(student)
        _freeze_key_biases(student)
        if name != "torchopt":  # TorchOpt starts its own optimizer state: both start fresh there
            opt = make_opt([p for p in student.parameters() if p.requires_grad])
            _warm(student, opt, quizzes[3], warm_steps)
        models = {}
        for who in ("fastmeta", name):
            t, s = copy.deepcopy(teacher), copy.deepcopy(student)
            s_opt = make_opt([p for p in s.parameters() if p.requires_grad])
            if name != "torchopt":
                s_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            t_opt = torch.optim.AdamW(t.parameters(), lr=1e-3)
            stepper = None if who == "fastmeta" else peers.make_peer(name, t, s, t_opt, s_opt, temperature=TAU,
                                                                     kd_weight=W, **_exact_arithmetic(name))
            for b, q in zip(batches[:3], quizzes[:3]):
                if stepper is None:
                    fastmeta.meta_step(t, s, b, q, t_opt, s_opt, algorithm="metadistil", hypergrad="exact",
                                       temperature=TAU, kd_weight=W)
                else:
                    stepper.step(b, q)
            models[who] = (t, s)
    for k in (0, 1):  # the displacements from the start, so that the error is relative to what moved
        start = [p.detach() for p in (teacher, student)[k].parameters()]
        ours = [p.detach() - s0 for p, s0 in zip(models["fastmeta"][k].parameters(), start)]
        theirs = [p.detach() - s0 for p, s0 in zip(models[name][k].parameters(), start)]
        err = _rel(theirs, ours)  # (asserts that something moved)
        which = ("teacher", "student")[k]
        print(f"{case}: {which} displacement after 3 steps, rel. error {err:.2e}")
        assert err <= 1e-9, which


@pytest.mark.parametrize("name", peers.PEERS)
def test_benchmark_peers_give_finite_meta_gradients_in_fp32(name):
    """As the benchmark runs them (fp32, eps 1e-8, TorchOpt's eps_root): on this tiny BERT, whose pilot gradient
    has exact zeros (the key bias), TorchOpt with eps_root=0 returns a NaN meta-gradient."""
    pytest.importorskip(name)
    from bench.meta_step import _setup

    spec = dict(device="cpu", seed=0, attn="sdpa", dropout=None, optimizer="adamw", teacher_lr=2e-5,
                student_lr=5e-5, model="tiny", batch_size=2, seq_len=8, cache_models=False)
    teacher, student, batch, quiz, teacher_opt, student_opt = _setup(spec)
    peer = peers.make_peer(name, teacher, student, teacher_opt, student_opt, temperature=TAU, kd_weight=W)
    grads, _ = peer.meta_gradient(batch, quiz)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    peer.step(batch, quiz)
    assert all(bool(torch.isfinite(p).all()) for m in (teacher, student) for p in m.parameters())
    if name == "torchopt":  # the reason for eps_root
        teacher2, student2, batch2, quiz2, t_opt2, s_opt2 = _setup(spec)
        bare = peers.make_peer(name, teacher2, student2, t_opt2, s_opt2, temperature=TAU, kd_weight=W, eps_root=0.0)
        grads, _ = bare.meta_gradient(batch2, quiz2)
        assert not all(bool(torch.isfinite(g).all()) for g in grads)


def test_availability_reports_missing_peers(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "higher", None)  # import higher -> ImportError, as when not installed
    info = peers.availability("higher")
    assert info["available"] is False and info["reason"].startswith("not installed")
    with pytest.raises(ValueError, match="unknown peer"):
        peers.availability("jax")
