"""pytest-benchmark micro-benchmarks: fastmeta.meta_grad exact vs autograd, influence, at tiny size.

The default test run passes ``--benchmark-disable`` (pyproject addopts): each case then
runs once, untimed, as a correctness check (exact must match autograd).  Time them with::

    python -m pytest tests/test_bench_micro.py --benchmark-enable -q
"""
import pytest
import torch

import fastmeta
from bench.meta_step import build_models, random_batch


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    teacher, student = build_models("tiny", seed=0, attn="eager", dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(1000, 4, 16, generator=gen, device="cpu")
    quiz = random_batch(1000, 4, 16, generator=gen, device="cpu")
    return teacher, student, batch, quiz


@pytest.mark.parametrize("hypergrad", ["exact", "autograd", "finite_diff"])
def test_meta_grad_micro(benchmark, tiny_setup, hypergrad):
    teacher, student, batch, quiz = tiny_setup
    benchmark.group = "meta_grad tiny BERT (2L/32 -> 1L), bs 4, seq 16"
    kwargs = dict(inner_lr=1e-2, temperature=2.0, kd_weight=0.5)
    grads = benchmark.pedantic(
        lambda: fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad=hypergrad, **kwargs),
        rounds=3, iterations=1, warmup_rounds=1,
    )
    reference = fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="autograd", **kwargs)
    assert set(grads) == set(reference)
    num = sum(float((grads[k] - reference[k]).pow(2).sum()) for k in grads) ** 0.5
    den = sum(float(reference[k].pow(2).sum()) for k in grads) ** 0.5
    assert den > 0
    # float32: exact/autograd agree to rounding; finite differences to O(eps^2) + rounding
    assert num / den <= (1e-4 if hypergrad != "finite_diff" else 2e-2), num / den


def test_influence_micro(benchmark, tiny_setup):
    teacher, student, batch, quiz = tiny_setup
    benchmark.group = "influence tiny BERT, bs 4, seq 16"
    w = benchmark.pedantic(
        lambda: fastmeta.influence(teacher, student, batch, quiz, inner_lr=1e-2, temperature=2.0),
        rounds=3, iterations=1, warmup_rounds=1,
    )
    assert w.shape == (4,) and torch.isfinite(w).all()
