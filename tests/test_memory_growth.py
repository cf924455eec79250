"""fastmeta's training step does not leak: memory does not grow step after step.

Memory that grows with every step is the problem users of the peer libraries report most (a graph
kept alive through the differentiable optimizer's state, fast weights kept across steps).  Here:
200 ``fastmeta.meta_step(algorithm="metadistil", hypergrad="exact")`` calls with AdamW on both models
(a tiny BERT and batches of fixed shapes, cycled) and three measures after every step:

* CUDA: ``torch.cuda.memory_allocated()`` (exact: every live tensor's bytes);
* CPU, where torch has no allocator statistics: the process's resident set size after
  ``gc.collect()`` and glibc's ``malloc_trim(0)`` (freed heap pages returned to the OS, so the RSS
  follows what is live; it moves by tens of KiB from step to step here);
* both: the live ``torch.Tensor`` objects the Python collector tracks, created since the set-up
  (``gc.freeze()`` after it: the scans only see new objects and stay cheap).

What may legitimately grow happens in the first steps: the optimizers' state (created at step 1),
first-call caches of torch/functorch and fastmeta's lazily built pieces.  So steps 0..9 are the
warm-up; the reference is the maximum over steps 10..19; no later step may exceed it by more than
``SLACK_BYTES`` (1 MiB), and the number of live tensors at steps 20..199 equals that at step 10.
A control run shows the CPU measure sees a real leak of that size: one retained teacher graph per
step (what a loop that keeps its un-detached losses does) is flagged within 60 steps.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc

import pytest
import torch

pytest.importorskip("transformers")

import fastmeta  # noqa: E402
from bench import common  # noqa: E402
from bench.meta_step import build_models, random_batch  # noqa: E402

STEPS = 200
WARMUP = 10  # steps 0..9: optimizer state, caches
REFERENCE = (10, 20)  # the reference window
SLACK_BYTES = 2**20  # 1 MiB
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also holds freed heap pages (the slack covers it)
        return lambda: None


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin at barriers (several times slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@contextlib.contextmanager
def _frozen_gc():
    """Move every object alive now to the collector's permanent generation: later scans see only new objects."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _live_new_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _problem(device):
    teacher, student = build_models("tiny", seed=0, attn="sdpa", dropout=None)  # dropout on, as in training
    teacher.to(device)
    student.to(device)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(1000, 4, 16, generator=g, device=device) for _ in range(3)]
    quizzes = [random_batch(1000, 4, 16, generator=g, device=device) for _ in range(3)]
    teacher_opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    student_opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    return teacher, student, batches, quizzes, teacher_opt, student_opt


def _measure(device, steps, leak=None, student_tangent="jvp"):
    """(memory after every step, live new tensors at every 10th step) over ``steps`` meta steps."""
    teacher, student, batches, quizzes, teacher_opt, student_opt = _problem(device)
    trim = _malloc_trim()
    memory, tensors = [], []
    kept = []
    with _frozen_gc():
        for i in range(steps):
            b, q = batches[i % 3], quizzes[i % 3]
            out = fastmeta.meta_step(teacher, student, b, q, teacher_opt, student_opt, algorithm="metadistil",
                                     hypergrad="exact", temperature=2.0, kd_weight=0.5,
                                     student_tangent=student_tangent)
            assert torch.isfinite(out.student_loss)
            del out
            if leak is not None:
                kept.append(leak(teacher, b))
            gc.collect()
            if device == "cuda":
                torch.cuda.synchronize()
                memory.append(int(torch.cuda.memory_allocated()))
            else:
                trim()
                memory.append(common.current_rss_bytes())
            if i % 10 == 0:
                tensors.append(_live_new_tensors())
    return memory, tensors


def _growth(memory) -> int:
    reference = max(memory[REFERENCE[0]:REFERENCE[1]])
    return max(memory[REFERENCE[1]:]) - reference


@pytest.mark.parametrize("student_tangent", ["jvp", "double_vjp"])  # double_vjp keeps the pilot's graph a while
@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d for d in DEVICES])
def test_meta_step_memory_does_not_grow(device, student_tangent):
    memory, tensors = _measure(device, STEPS, student_tangent=student_tangent)
    growth = _growth(memory)
    kind = "torch.cuda.memory_allocated" if device == "cuda" else "RSS after gc + malloc_trim"
    print(f"{device}: {kind}: steps 10..19 max {max(memory[10:20]) / 2**20:.2f} MiB, steps 20..199 max "
          f"{max(memory[20:]) / 2**20:.2f} MiB (growth {growth / 1024:+.0f} KiB); live new tensors every 10 steps: "
          f"{tensors}")
    assert growth <= SLACK_BYTES, f"memory grew by {growth / 2**20:.2f} MiB after step {REFERENCE[1]} ({kind})"
    assert tensors[1:] == [tensors[1]] * len(tensors[1:]), f"live tensors grew: {tensors}"
    if device == "cuda":
        assert growth <= 64 * 1024  # exact accounting: nothing at all may accumulate


def test_the_cpu_measure_sees_a_leak_of_one_graph_per_step():
    """Control: keeping one teacher forward's graph per step (a loop that stores un-detached losses) is flagged."""
    def leak(teacher, batch):
        return teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits.sum()  # graph kept alive

    memory, tensors = _measure("cpu", 60, leak=leak)
    assert _growth(memory) > SLACK_BYTES, [m // 1024 for m in memory[::10]]
    assert tensors[-1] > tensors[1]  # the retained outputs are live tensors too
