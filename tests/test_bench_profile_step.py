"""``python -m bench.profile_step`` at tiny sizes: every part of its report is produced."""
from __future__ import annotations

import json

import torch

from bench import common, profile_step


def test_profile_step_smoke(tmp_path, capsys):
    out = tmp_path / "profile.json"
    report = profile_step.main(["--model", "tiny", "--steps", "2", "--warmup", "0", "--floor-repeats", "1",
                                "--memory", "--profile", "--sync-ab", "--walks-ab", "--row-limit", "5",
                                "--json", str(out)])
    # the step's phases, the engine's inside meta_gradient
    phases = report["phases"]
    assert {"meta_gradient", "meta_gradient.student_jvp", "teacher_update", "student_update", "total"} <= set(phases)
    assert phases["meta_gradient.student_jvp"] < phases["meta_gradient"] < phases["total"]
    # the floor's passes, each alone, and the step against their sum
    counts = profile_step.floor_counts()  # bench.meta_step's floor items, the one definition
    assert set(counts) == {"teacher_forward_backward", "teacher_forward", "student_forward_backward_train",
                           "student_forward_backward_quiz", "student_jvp", "teacher_update", "student_update"}
    assert set(counts) <= set(report["floor_medians"]) and counts["student_forward_backward_train"] == 2
    assert report["floor_s"] == sum(report["floor_medians"][k] * c for k, c in counts.items())
    assert "diag: student tangent by double VJP" in report["floor_medians"]
    assert "diag: student JVP by torch.func.jvp" in report["floor_medians"]
    assert any(row[0] == "meta_gradient.student_jvp" for row in report["gaps"])
    # --memory: a peak for every phase that ran (the engine's named meta_gradient.<phase>)
    assert {"meta_gradient.student_jvp", "teacher_update", "(between phases)"} <= set(report["phase_peak_mib"])
    # ... and on CPU the fresh pages each phase touched per step (page faults)
    fresh = report["phase_fresh_pages_mib_per_step"]
    assert "meta_gradient.student_forward_backward" in fresh and all(v >= 0 for v in fresh.values())
    # ... and the live tensors' peak per phase: the teacher's graph is alive from its forward to its backward
    tensors = report["phase_tensor_peak_mib"]
    assert tensors["meta_gradient.student_jvp"] > tensors["meta_gradient.teacher_forward"] > 0
    assert report["tensors_before_mib"] > 0
    # --profile: the phases as record_function ranges, the step's classes put back afterwards
    assert "fastmeta.meta_gradient.student_jvp" in report["profile"] and "fastmeta.teacher_update" in report["profile"]
    from fastmeta.algorithms._common import StepContext
    from fastmeta.engine.trajectory import Timer

    assert StepContext.phase.__qualname__ == "StepContext.phase" and Timer.phase.__qualname__ == "Timer.phase"
    # --sync-ab: whole steps with and without the phases' syncs, alternating
    ab = report["sync_ab"]
    assert len(ab["with_phase_syncs_s"]) == len(ab["without_phase_syncs_s"]) == 2
    assert ab["without_vs_with"] == ab["median_without_s"] / ab["median_with_s"] > 0
    # --walks-ab: whole steps walking each model once and at every use, alternating
    wk = report["walks_ab"]
    assert len(wk["walked_once_s"]) == len(wk["walked_every_time_s"]) == 2 and wk["median_once_s"] > 0
    pairs = [b - a for a, b in zip(wk["walked_once_s"], wk["walked_every_time_s"])]
    assert abs(wk["paired_difference_median_s"] - (pairs[0] + pairs[1]) / 2) < 1e-12
    assert json.loads(out.read_text())["floor_s"] == report["floor_s"]
    assert report["teacher_checkpointing_active"] is False
    # the update phases taken apart (bench.updates), every row timed or saying why not
    from bench import updates

    assert [r["row"] for r in report["updates"]["rows"]] == list(updates.ROWS)
    assert all(r.get("median_s", 0) > 0 or "skipped" in r for r in report["updates"]["rows"])
    out_text = capsys.readouterr().out
    assert "step vs floor" in out_text and "the optimizer updates taken apart" in out_text


def test_floor_passes_leave_the_models_and_optimizers_as_found():
    """The floor's updates step COPIES: the models, and both optimizers' moments and step counts, are untouched
    (load_state_dict alone shares the state's tensors: the copies' steps used to advance the originals')."""
    import argparse

    import torch

    args = argparse.Namespace(model="tiny", seed=0, attn="eager", dropout=None, device="cpu",
                              teacher_checkpointing=False, batch_size=2, seq_len=8, optimizer="adamw",
                              teacher_lr=1e-3, student_lr=1e-3, floor_repeats=1)
    models = profile_step.setup(args)
    teacher, student, _, _, teacher_opt, student_opt = models
    for model, opt in ((teacher, teacher_opt), (student, student_opt)):  # state present, as after a step
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def snapshot():
        return [t.clone() for m in (teacher, student) for t in m.parameters()] + [
            v.clone() for opt in (teacher_opt, student_opt) for st in opt.state.values() for v in st.values()]

    before = snapshot()
    times = profile_step.floor_passes(models, args)
    assert times["teacher_update"] and times["student_update"]
    after = snapshot()
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def test_profile_step_device_cuda(tmp_path):
    """``--device cuda``: bench.meta_step's CUDA setting; without a GPU a clear refusal, not a CPU run."""
    import pytest
    import torch

    args = ["--device", "cuda", "--model", "tiny", "--steps", "1", "--warmup", "0", "--floor-repeats", "1",
            "--memory", "--profile", "--row-limit", "5"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device"):
            profile_step.main(args)
        return
    report = profile_step.main(args)
    assert report["config"]["device"] == "cuda" and report["phases"]["total"] > 0
    assert "by GPU self time" in report["profile"] and report["phase_peak_mib"]["meta_gradient.student_jvp"] > 0


def test_profile_step_teacher_checkpointing():
    """``--teacher-checkpointing``: the teacher's layers run under HF activation checkpointing (its
    backward recomputes them), and the step still runs and reports its phases and peaks."""
    report = profile_step.main(["--model", "tiny", "--steps", "1", "--warmup", "0", "--no-floor", "--memory",
                                "--teacher-checkpointing", "--option", 'teacher_graph="recompute"'])
    assert report["teacher_checkpointing_active"] and report["phases"]["total"] > 0
    assert "meta_gradient.teacher_recompute" in report["phases"] and report["memory_before_mib"] > 0


def test_phase_tensor_peaks_counts_live_tensor_bytes_per_phase():
    """Exact bytes: the largest sum of live tensors inside each phase, relative to the measured part's start
    (a tensor the warm-up allocated and the measured part frees is seen going)."""
    from fastmeta.engine.trajectory import Timer

    timer = Timer(torch.device("cpu"))
    keep: list = []

    def warmup():
        keep.append(torch.ones(1000))  # 4000 bytes, freed by the measured part

    def measured():
        keep.clear()
        with timer.phase("a"):
            x = torch.empty(2**20, dtype=torch.uint8)
            y = torch.empty(3 * 2**20, dtype=torch.uint8)
            del x, y
        with timer.phase("b"):
            keep.append(torch.empty(2**19, dtype=torch.uint8))
            with timer.phase("inner"):
                torch.empty(2**18, dtype=torch.uint8)  # freed at once

    peaks, before = common.phase_tensor_peaks(warmup, measured)
    assert peaks["meta_gradient.a"] == 4 * 2**20 - 4000
    assert peaks["meta_gradient.b"] == 2**19 - 4000
    assert peaks["meta_gradient.inner"] == 2**19 + 2**18 - 4000
    assert before >= 4000  # the warm-up's tensor was alive then


def test_phases_without_sync_time_the_host_and_never_synchronise(monkeypatch):
    """On CUDA meta_step's phases synchronise on entry and exit; inside phases_without_sync they do not (a
    synchronize that raises proves it: the shipped phase calls it), and the classes are put back after."""
    from fastmeta.algorithms._common import StepContext
    from fastmeta.engine.trajectory import Timer

    def no_sync(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize called")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    timer = Timer(torch.device("cuda"))  # a CUDA timer: its own phase synchronises
    try:
        with timer.phase("a"):
            pass
    except AssertionError:
        pass
    else:
        raise AssertionError("the shipped phase did not synchronise: this test checks nothing")
    with common.phases_without_sync():
        with timer.phase("b"):
            pass
    assert timer.timings["b"] >= 0.0
    assert StepContext.phase.__qualname__ == "StepContext.phase" and Timer.phase.__qualname__ == "Timer.phase"


def test_walks_every_time_walks_at_each_use_and_is_undone():
    """Inside walks_every_time a meta_step walks a model at every use again (what --walks-ab compares)."""
    from fastmeta import _walks

    net = torch.nn.Linear(2, 2)
    calls = []
    original = torch.nn.Module.named_parameters

    def counted(module, *args, **kwargs):
        if module is net and not args and not kwargs:
            calls.append(1)
        return original(module, *args, **kwargs)

    torch.nn.Module.named_parameters = counted
    try:
        @_walks.walking_once
        def use_twice():
            _walks.named_parameters(net)
            _walks.named_parameters(net)

        use_twice()
        assert len(calls) == 1
        with common.walks_every_time():
            use_twice()
        assert len(calls) == 3
        use_twice()
        assert len(calls) == 4 and _walks.walked_once.__name__ == "walked_once"
    finally:
        torch.nn.Module.named_parameters = original
