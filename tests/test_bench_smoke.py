"""Fast smoke tests of the benchmark harnesses (tiny random models, tiny data, seconds).

They run the code paths of ``python -m bench.meta_step`` and ``python -m bench.table4``
end to end (in-process, to stay fast; one test covers the fresh-subprocess worker
path) and check the JSON / markdown / PNG outputs and their schema.
"""
import json
import math

import pytest
import torch

from bench import common, meta_step
from conftest import DEVICES


# --------------------------------------------------------------------------- common
def test_markdown_table_and_fmt():
    md = common.markdown_table(["a", "b"], [[1, None], ["x|y", 2.5]])
    lines = md.strip().splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2] == "| 1 | — |" and lines[3] == "| x\\|y | 2.5 |"
    with pytest.raises(ValueError, match="expected 2"):
        common.markdown_table(["a", "b"], [[1]])
    assert common.fmt(None) == "—" and common.fmt(float("nan")) == "—" and common.fmt(1.234, 1, "x") == "1.2x"


def test_time_calls_and_median():
    calls = []
    times = common.time_calls(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        common.median([])
    with pytest.raises(ValueError, match="repeats"):
        common.time_calls(lambda: None, repeats=0, warmup=0)


def test_peak_rss_sees_an_allocation():
    common.reset_peak_rss()
    before = common.peak_rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    block.add_(1)
    after = common.peak_rss_bytes()
    del block
    assert after - before >= 48 * 2**20
    assert common.current_rss_bytes() > 0


def test_require_device_refuses_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path cannot be exercised")
    with pytest.raises(SystemExit, match=r"is_available\(\) is False"):
        common.require_device("cuda")
    with pytest.raises(SystemExit, match="cpu"):
        common.require_device("tpu")
    assert common.require_device("cpu") == "cpu"


def test_environment_info_fields():
    env = common.environment_info("cpu", shared_machine=True)
    for key in ("date_utc", "command", "device", "device_name", "cpu_model", "cpu_cores", "versions",
                "shared_machine", "note"):
        assert key in env
    assert set(env["versions"]) >= {"python", "torch", "triton", "transformers"}
    assert "shared with other jobs" in env["note"]


def test_environment_info_records_the_allocator_environment(monkeypatch):
    """GLIBC_TUNABLES & co. change CPU step times and peak RSS: a run under them says so in its command."""
    for key in common.ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    plain = common.environment_info("cpu", shared_machine=False)
    assert plain["allocator_env"] == {} and "=" not in plain["command"].split()[0]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    env = common.environment_info("cpu", shared_machine=False)
    assert env["allocator_env"] == {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    assert env["command"].startswith("GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 ")


class _FakeMeter:
    """A process memory meter for common.phase_peaks on CPU: glibc may serve a big block from pages it
    kept, so the real RSS cannot be relied on in a test; this one counts exactly what it is told."""

    def __init__(self):
        self.current = self.peak = 1000

    def alloc(self, n):
        self.current += n
        self.peak = max(self.peak, self.current)

    def read(self):
        return self.peak

    def reset(self):
        self.peak = self.current
        return True


@pytest.mark.parametrize("device", DEVICES)
def test_phase_peaks_attributes_each_peak_to_its_phase(device, monkeypatch):
    """A 256 MiB tensor alive only inside one phase: that phase's peak holds it, the phases around it
    do not; nested phases (meta_step's around the engine's) get their own."""
    from fastmeta.engine.trajectory import Timer

    size = 256 * 2**20
    if device == "cpu":
        meter = _FakeMeter()
        monkeypatch.setattr(common, "peak_rss_bytes", meter.read)
        monkeypatch.setattr(common, "reset_peak_rss", meter.reset)
        base = meter.current

        def hold(n):
            meter.alloc(n)
            meter.alloc(-n)
    else:
        base = torch.cuda.memory_allocated()

        def hold(n):
            torch.ones(n // 4, device=device)  # freed at once

    timer = Timer(torch.device(device))
    with common.phase_peaks(device) as peaks:
        with timer.phase("small"):
            hold(4096)
        with timer.phase("outer"):
            with timer.phase("big"):
                hold(size)
            hold(size // 2)
        with timer.phase("after"):
            pass
    assert set(peaks) == {"meta_gradient.small", "meta_gradient.outer", "meta_gradient.big", "meta_gradient.after",
                          "(between phases)"}
    assert peaks["meta_gradient.big"] - base == size  # the tensor and nothing else
    assert peaks["meta_gradient.outer"] - base == size // 2
    assert peaks["meta_gradient.small"] - base == 4096
    assert peaks["meta_gradient.after"] == peaks["(between phases)"] == base


def test_phase_page_faults_counts_the_fresh_pages_of_each_phase():
    """A 64 MiB tensor created and written inside one phase: that phase touched >= 64 MiB of fresh pages
    (a fresh mapping: glibc maps tensors that large), the empty phases next to it almost none, and the
    outer phase only what it touched itself (the innermost open phase gets the faults)."""
    import resource

    from fastmeta.engine.trajectory import Timer

    page = resource.getpagesize()
    timer = Timer(torch.device("cpu"))
    with common.phase_page_faults() as faults:
        with timer.phase("outer"):
            with timer.phase("big"):
                torch.ones(16 * 2**20)  # 64 MiB, written, freed at once
        with timer.phase("empty"):
            pass
    assert set(faults) >= {"meta_gradient.outer", "meta_gradient.big", "meta_gradient.empty"}
    assert faults["meta_gradient.big"] * page >= 64 * 2**20
    assert faults["meta_gradient.outer"] * page < 4 * 2**20
    assert faults["meta_gradient.empty"] * page < 4 * 2**20


def test_bar_chart_png(tmp_path):
    path = common.bar_chart_ratios(tmp_path / "c.png", ["a", "b"], [("t", [1.0, 2.0]), ("m", [None, 1.5])],
                                   title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_student_from_teacher_copies_first_layers():
    from bench.meta_step import build_models

    teacher, student = build_models("tiny", seed=0, attn="eager", dropout=0.0)
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    for key in s:
        assert torch.equal(s[key], t[key]), key
    assert student.bert.encoder.layer[0].output.dense.weight.data_ptr() != \
        teacher.bert.encoder.layer[0].output.dense.weight.data_ptr()


# --------------------------------------------------------------------------- meta_step
def _check_meta_step_report(report, out_dir):
    data = json.loads((out_dir / "meta_step_cpu.json").read_text())
    assert data["benchmark"] == "meta_step"
    assert data["environment"]["device"] == "cpu"
    (setting,) = data["settings"]
    floor = setting["floor"]
    # the floor: the necessary passes + the necessary optimizer updates (teacher x1, student x1), each timed alone
    assert set(floor["passes"]) == {"teacher_forward_backward", "teacher_forward", "student_forward_backward_train",
                                    "student_forward_backward_quiz", "student_jvp", "teacher_update",
                                    "student_update"}
    assert floor["passes"]["student_forward_backward_train"]["count"] == 2
    assert floor["passes"]["teacher_update"]["count"] == floor["passes"]["student_update"]["count"] == 1
    assert {p["kind"] for p in floor["passes"].values()} == {"pass", "optimizer update"}
    assert math.isclose(floor["floor_s"], sum(p["median_s"] * p["count"] for p in floor["passes"].values()))
    assert floor["floor_passes_only_s"] < floor["floor_s"] and "optimizer update" in floor["definition"]
    steps = {(r["algorithm"], r["hypergrad"], r["peer"]) + ((meta_step.row_variant(r),) if meta_step.row_variant(r) else ()): r
             for r in setting["steps"]}
    assert ("kd", None, None) in steps
    for r in steps.values():
        assert "error" not in r, r.get("error")
        if "skipped" in r:  # only a peer that is not installed
            assert r["peer"] and r["skipped"].startswith("not installed")
            continue
        assert r["median_s"] > 0 and r["parameters_finite_after"]
        # every loop, the peers' included, frees .grad after each step (common.free_grads), as a training loop does
        assert r["grad_bytes_between_steps"] == 0, r
        assert math.isclose(r["time_vs_kd"], r["median_s"] / steps[("kd", None, None)]["median_s"])
        assert math.isclose(r["time_vs_floor"], r["median_s"] / floor["floor_s"])
        assert r["memory"]["peak_bytes"] > 0
    # the memory floor: byte counts of the teacher's AdamW state (exp_avg + exp_avg_sq, fp32, and one fp32 step
    # counter per parameter on the CPU), gradient and parameters, against the tiny teacher's parameter count
    from bench.meta_step import build_models

    teacher, _ = build_models("tiny", seed=0, attn="eager", dropout=0.0)
    n, tensors = sum(p.numel() for p in teacher.parameters()), len(list(teacher.parameters()))
    mf = setting["memory_floor"]
    assert mf["teacher_optimizer_state_bytes"] == 8 * n + 4 * tensors
    assert mf["teacher_grad_bytes"] == mf["teacher_param_bytes"] == 4 * n
    kd_peak = steps[("kd", None, None)]["memory"]["peak_bytes"]
    assert mf["kd_peak_bytes"] == kd_peak and mf["kd_plus_state_bytes"] == kd_peak + 8 * n + 4 * tensors
    assert math.isclose(mf["kd_plus_state_vs_kd"], (kd_peak + 8 * n + 4 * tensors) / kd_peak)
    # the teacher forward+backward with both optimizers' states alive, measured alone in the floor worker
    teacher_bwd = floor["memory_items"]["teacher_backward_peak_bytes"]
    # (alive through it: the teacher's parameters, its optimizer's state and the gradient it makes)
    assert teacher_bwd >= mf["teacher_param_bytes"] + mf["teacher_optimizer_state_bytes"] + mf["teacher_grad_bytes"]
    assert mf["teacher_backward_peak_bytes"] == teacher_bwd
    assert math.isclose(mf["teacher_backward_vs_kd"], teacher_bwd / kd_peak)
    assert mf["bound_bytes"] == max(kd_peak + 8 * n + 4 * tensors, teacher_bwd)
    assert math.isclose(mf["bound_vs_kd"], mf["bound_bytes"] / kd_peak)
    assert mf["with_meta_step_extras_bytes"] == kd_peak + 2 * (8 * n + 4 * tensors) + 2 * 4 * n
    goal = data["goals"][setting["label"]]["peak_memory_vs_kd"]
    assert goal["bound"] == mf["bound_vs_kd"]
    md = (out_dir / "meta_step_cpu.md").read_text()
    assert "so it cannot peak below" in md and "floor is the larger of the two" in md
    assert "(see Memory floor)" in md
    assert "| step | median s | x KD | x autograd | x floor |" in md and "floor (sum)" in md
    assert "teacher optimizer update x1 + student optimizer update x1" in md
    assert (out_dir / "meta_step_cpu.png").read_bytes()[:4] == b"\x89PNG"
    return steps


def test_meta_step_smoke(tmp_path):
    from bench import meta_step

    meta_step.main(["--model", "tiny", "--isolation", "inprocess", "--warmup", "0", "--repeats", "1",
                    "--rounds", "2", "--algorithms", "kd", "metadistil", "--hypergrads", "exact", "autograd",
                    "--phase-memory", "--out-dir", str(tmp_path)])
    steps = _check_meta_step_report(None, tmp_path)
    # --phase-memory: every fastmeta row's phases (engine phases too), none for a peer (it has no phases)
    for key, r in steps.items():
        if "skipped" in r:
            continue
        assert (key[2] is None) == ("phase_peak_bytes" in r), key
    assert {"meta_gradient.student_jvp", "meta_gradient.teacher_backward", "teacher_update",
            "student_step.forward_backward"} <= set(steps[("metadistil", "exact", None)]["phase_peak_bytes"])
    assert "meta_gradient.teacher_recompute" in steps[("metadistil", "exact", None, "teacher_recompute")]["phase_peak_bytes"]
    assert "Where the peak is" in (tmp_path / "meta_step_cpu.md").read_text()
    assert set(steps) == {("kd", None, None), ("metadistil", "exact", None), ("metadistil", "autograd", None),
                          ("metadistil", "exact", None, "double_vjp"), ("metadistil", "exact", None, "teacher_recompute"),
                          ("metadistil", "exact", None, "double_vjp+teacher_recompute"),
                          ("metadistil", "autograd", "higher"), ("metadistil", "autograd", "torchopt")}
    both = steps[("metadistil", "exact", None, "double_vjp+teacher_recompute")]
    assert both["student_tangent"] == "double_vjp" and both["teacher_graph"] == "recompute"
    assert "meta_gradient.teacher_recompute" in both["phase_medians_s"]
    # two interleaved rounds of one timed step each: pooled
    exact = steps[("metadistil", "exact", None)]
    assert exact["rounds"] == 2 and len(exact["times_s"]) == 2 and len(exact["memory"]["rounds_peak_bytes"]) == 2
    assert exact["student_tangent"] is None and exact["teacher_graph"] is None
    recompute = steps[("metadistil", "exact", None, "teacher_recompute")]
    assert recompute["teacher_graph"] == "recompute" and recompute["student_tangent"] is None
    # the worker ran meta_step with the option: its phases include the replayed teacher forward
    assert recompute["phase_medians_s"]["meta_gradient.teacher_recompute"] > 0
    assert "meta_gradient.teacher_recompute" not in exact["phase_medians_s"]
    md = (tmp_path / "meta_step_cpu.md").read_text()
    assert "metadistil / exact (double_vjp)" in md and "metadistil / exact (teacher recomputed)" in md
    assert "metadistil / exact (double_vjp, teacher recomputed)" in md
    assert "2 interleaved rounds" in md
    auto = steps[("metadistil", "autograd", None)]
    assert math.isclose(auto["time_vs_autograd"], 1.0)
    assert math.isclose(steps[("metadistil", "exact", None, "double_vjp")]["time_vs_autograd"],
                        steps[("metadistil", "exact", None, "double_vjp")]["median_s"] / auto["median_s"])
    for peer in ("higher", "torchopt"):
        r = steps[("metadistil", "autograd", peer)]
        if "skipped" in r:
            continue
        # a peer's ratio to autograd is against fastmeta's own double backward, not against itself
        assert math.isclose(r["time_vs_autograd"], r["median_s"] / auto["median_s"])
        assert r["peer_version"]
    md = (tmp_path / "meta_step_cpu.md").read_text()
    assert "MetaDistil with higher (peer)" in md and "time_vs_higher" in md


def test_meta_step_tensor_memory(tmp_path):
    """--tensor-memory (CPU, one worker process per row): every row, the peers' too, as live tensors."""
    from bench import meta_step

    with pytest.raises(SystemExit, match="--tensor-memory needs --isolation subprocess"):
        meta_step.main(["--model", "tiny", "--isolation", "inprocess", "--tensor-memory", "--out-dir", str(tmp_path)])
    meta_step.main(["--model", "tiny", "--isolation", "subprocess", "--warmup", "0", "--repeats", "1",
                    "--rounds", "1", "--algorithms", "kd", "metadistil", "--hypergrads", "exact", "autograd",
                    "--student-tangents", "--teacher-graphs", "--tensor-memory", "--out-dir", str(tmp_path)])
    steps = {(r["algorithm"], r["hypergrad"], r.get("peer")): r
             for r in json.loads((tmp_path / "meta_step_cpu.json").read_text())["settings"][0]["steps"]}
    for key, r in steps.items():
        if "skipped" in r:
            continue
        m = r["tensor_memory"]
        assert m["peak_bytes"] == m["before_bytes"] + m["step_bytes"] and m["step_bytes"] > 0, key
        assert (key[2] is None) == (set(m["phase_peak_bytes"]) != {"(between phases)"}), key  # a peer has no phases
    exact_t, autograd_t = (steps[("metadistil", h, None)]["tensor_memory"] for h in ("exact", "autograd"))
    assert exact_t["step_bytes"] < autograd_t["step_bytes"]  # the double backward keeps the pilot's graph
    assert "Live tensors (two more, untimed steps per row" in (tmp_path / "meta_step_cpu.md").read_text()


def test_meta_step_missing_peer_is_reported_not_faked(tmp_path, monkeypatch):
    import sys

    from bench import meta_step

    monkeypatch.setitem(sys.modules, "torchopt", None)  # as when TorchOpt is not installed
    report = meta_step.main(["--model", "tiny", "--isolation", "inprocess", "--warmup", "0", "--repeats", "1",
                             "--rounds", "1", "--algorithms", "kd", "--peers", "torchopt", "--out-dir", str(tmp_path)])
    (setting,) = report["settings"]
    row = next(r for r in setting["steps"] if r.get("peer") == "torchopt")
    assert row["skipped"].startswith("not installed") and "median_s" not in row
    assert "incomplete" not in report and report["peers"]["torchopt"]["available"] is False
    assert "skipped (not installed" in (tmp_path / "meta_step_cpu.md").read_text()


def test_meta_step_worker_subprocess(tmp_path):
    """One configuration through the fresh-process worker (the default isolation)."""
    res = common.run_worker("bench.meta_step", dict(
        kind="step", device="cpu", seed=0, attn="eager", dropout=0.0, optimizer="sgd", teacher_lr=1e-3,
        student_lr=1e-3, inner_lr=None, temperature=2.0, kd_weight=0.5, warmup=0, repeats=1, threads=1,
        model="tiny", batch_size=2, seq_len=8, dtype="fp32", algorithm="kd", hypergrad=None))
    assert res["kind"] == "step" and res["median_s"] > 0
    assert res["memory"]["peak_bytes"] >= res["memory"]["rss_before_steps_bytes"]


def test_meta_step_priority_plan_and_cuda_defaults():
    """--priority: those configurations of every setting first (after its floor), then the rest."""
    from bench import meta_step

    args = meta_step.parse_args(["--device", "cuda", "--priority", "kd", "metadistil/exact", "metadistil/autograd",
                                 "peer/higher", "peer/torchopt"])
    assert (args.isolation, args.warmup, args.repeats, args.threads) == ("inprocess", 2, 5, None)
    settings = meta_step.settings_for(args)
    assert [(s["batch_size"], s["dtype"]) for s in settings] == [(4, "fp32"), (4, "bf16"), (32, "fp32"), (32, "bf16")]
    assert all(s["model"] == "bert-base" and s["seq_len"] == 128 for s in settings)
    items = meta_step.plan(args, settings)
    confs = meta_step.configurations(args.algorithms, args.hypergrads)
    # 12 own rows + the exact rows of metadistil and lgtm with student_tangent="double_vjp" + the exact row of
    # metadistil with teacher_graph="recompute" + that row with both + 2 peers
    assert len(confs) == 12 and len(meta_step.keys(args)) == 18 and len(items) == 4 * 19 - 2 * 3  # no bf16 tangent rows
    assert ("lgtm", "exact", None, "double_vjp") in meta_step.keys(args)
    assert ("metadistil", "exact", None, "double_vjp+teacher_recompute") in meta_step.keys(args)
    assert ("metadistil", "exact", None, "teacher_recompute") in {c for _, _, c in items if c and c[3]} and \
        sum(1 for i, _, c in items if c and c[3] == "teacher_recompute") == 4  # in bf16 settings too
    first = items[:24]
    assert [(i, k) for i, k, _ in first[::6]] == [(0, "floor"), (1, "floor"), (2, "floor"), (3, "floor")]
    assert {c for _, k, c in first if k == "step"} == {
        ("kd", None, None, None), ("metadistil", "exact", None, None), ("metadistil", "autograd", None, None),
        ("metadistil", "autograd", "higher", None), ("metadistil", "autograd", "torchopt", None)}
    assert ("metadistil", "finite_diff", None, None) in {c for _, _, c in items[24:]}
    with pytest.raises(SystemExit, match="--priority"):
        meta_step.plan(meta_step.parse_args(["--priority", "magic/exact"]), settings)
    with pytest.raises(SystemExit, match="unknown peer"):
        meta_step.keys(meta_step.parse_args(["--peers", "jax"]))
    assert meta_step.keys(meta_step.parse_args(["--peers"]))[-1][2] is None  # --peers alone: no peer rows
    assert len(meta_step.keys(meta_step.parse_args(["--student-tangents"]))) == 15  # no combined row either
    assert len(meta_step.keys(meta_step.parse_args(["--teacher-graphs"]))) == 16
    assert len(meta_step.keys(meta_step.parse_args(["--no-combined-variants"]))) == 17
    with pytest.raises(SystemExit, match="unknown teacher graph"):
        meta_step.keys(meta_step.parse_args(["--teacher-graphs", "keep"]))
    cpu = meta_step.parse_args([])
    assert (cpu.isolation, cpu.warmup, cpu.repeats, cpu.threads, cpu.rounds) == ("subprocess", 1, 2, 1, 2)
    assert args.rounds == 1
    # rounds: the whole plan again, interleaved
    assert meta_step.plan(cpu, settings) == meta_step.plan(meta_step.parse_args(["--rounds", "1"]), settings) * 2
    assert cpu.peers == ["higher", "torchopt"]


def test_kernels_deadline_skips_and_writes(tmp_path):
    from bench import kernels

    assert kernels.main(["--device", "cpu", "--sizes", "tiny", "--out-dir", str(tmp_path), "--time-budget-s", "0"]) == 0
    data = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert data["results"] and all(r["skipped"] == "time" for r in data["results"])
    assert "skipped (time)" in (tmp_path / "kernels_cpu.md").read_text()
    order = kernels.plan_cases(kernels.SIZES["full"], ["bf16", "fp32"], ["fastmeta", "eager", "compile"])
    assert [c[3] for c in order[-4:]] == ["compile"] * 4 and "compile" not in [c[3] for c in order[:-4]]


def test_meta_step_cuda_refuses_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from bench import meta_step

    with pytest.raises(SystemExit, match="no GPU figures"):
        meta_step.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- table4
def _write_mrpc(folder, n_train, n_dev):
    words = "the cat sat on a mat while dogs ran far away from home and people said it rained".split()
    folder.mkdir()
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = []
        for i in range(n):
            a = " ".join(words[(i + j) % len(words)] for j in range(6 + i % 5))
            b = " ".join(words[(2 * i + j) % len(words)] for j in range(5 + i % 3))
            rows.append(f"{i % 2}\t{i}\t{i + 1000}\t{a} .\t{b} .\n")
        (folder / name).write_text(header + "".join(rows))


def test_table4_smoke(tmp_path):
    from bench import table4

    data_dir = tmp_path / "MRPC"
    _write_mrpc(data_dir, 24, 8)
    out = tmp_path / "out"
    table4.main(["--model", "tiny", "--isolation", "inprocess", "--data-dir", str(data_dir),
                 "--methods", "kd", "metadistil_fastmeta", "reptile", "--train-examples", "20",
                 "--steps", "2", "--eval-every", "1", "--teacher-finetune-steps", "1",
                 "--teacher-finetune-batch-size", "4", "--max-seq-length", "32", "--out-dir", str(out)])
    data = json.loads((out / "table4_cpu.json").read_text())
    assert data["benchmark"] == "table4" and "Scaled-down CPU reproduction" in data["scale_note"]
    assert data["data"]["sizes"] == {"train": 18, "quiz": 2, "dev": 8, "full_train": 24}
    assert set(data["methods"]) == {"kd", "metadistil_fastmeta", "reptile"}
    for name, res in data["methods"].items():
        assert "error" not in res, res.get("error")
        assert [h["step"] for h in res["history"]] == [0, 1, 2]
        times = [h["train_time_s"] for h in res["history"]]
        assert times == sorted(times) and times[0] == 0.0
        s = data["summary"][name]
        assert s["best_score"] == max(h["score"] for h in res["history"])
        assert 0.0 <= s["best_accuracy"] <= 1.0 and s["peak_bytes"] > 0
    kd_best = data["summary"]["kd"]["best_score"]
    assert data["summary"]["kd"]["time_to_match_kd_best_s"] == data["summary"]["kd"]["time_to_best_s"]
    for s in data["summary"].values():
        if s["time_to_match_kd_best_s"] is None:
            assert s["best_score"] < kd_best
    md = (out / "table4_cpu.md").read_text()
    assert "| method | time to best (ours) | paper |" in md
    assert "| plain KD |" in md and "10 min" in md and "90.0/86.5" in md
    assert "Scaled-down CPU reproduction" in md
    assert (out / "table4_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_table4_summary_time_to_match_kd():
    from bench.table4 import summarise

    def hist(scores):
        return [dict(step=i, train_time_s=float(i), accuracy=s, f1=s, score=s) for i, s in enumerate(scores)]

    mem = {"peak_bytes": 10, "step_memory_bytes": 2}
    methods = {
        "kd": dict(history=hist([0.5, 0.7, 0.6]), train_time_s=2.0, median_step_s=1.0, memory=mem),
        "reptile": dict(history=hist([0.5, 0.6, 0.8, 0.8]), train_time_s=3.0, median_step_s=2.0, memory=mem),
        "lgtm_fastmeta": dict(history=hist([0.5, 0.6]), train_time_s=1.0, median_step_s=1.0, memory=mem),
        "metadistil_official": {"error": "boom"},
    }
    s = summarise(methods)
    assert s["kd"]["time_to_best_s"] == 1.0 and s["kd"]["time_to_match_kd_best_s"] == 1.0
    assert s["reptile"]["time_to_best_s"] == 2.0 and s["reptile"]["best_step"] == 2
    assert s["reptile"]["time_to_match_kd_best_s"] == 2.0 and s["reptile"]["median_step_vs_kd"] == 2.0
    assert s["lgtm_fastmeta"]["time_to_match_kd_best_s"] is None
    assert s["metadistil_official"] == {"error": "boom"}


def test_table4_rows_say_what_they_are_and_one_class_scores_are_flagged(tmp_path):
    """fastmeta's double backward is labelled so; the higher row is the official recipe's stand-in; a score
    reached while predicting one class for every dev example is printed as that, not as the method's."""
    from bench import table4

    assert table4.METHODS["metadistil_double_backward"][0] == "MetaDistil, double backward (fastmeta)"
    assert "closest stand-in for the official recipe" in table4.METHODS["metadistil_higher"][0]
    assert "metadistil_higher" in table4.PAPER and "metadistil_double_backward" not in table4.PAPER
    assert table4.parse_args(["--methods", "metadistil_official"]).methods == ["metadistil_double_backward"]

    def h(step, score, single=None):
        return dict(step=step, train_time_s=float(step), accuracy=score, f1=score, score=score, single_class=single)

    mem = {"peak_bytes": 10, "step_memory_bytes": 2}
    methods = {
        # majority class at step 0 (0.75), both classes later with a LOWER score (0.7): the method's score is 0.7
        "kd": dict(history=[h(0, 0.75, 1), h(1, 0.7), h(2, 0.72)], train_time_s=2.0, median_step_s=1.0, memory=mem),
        # never leaves the majority class: its score is the majority class's, flagged
        "reptile": dict(history=[h(0, 0.75, 1), h(1, 0.75, 1)], train_time_s=1.0, median_step_s=1.0, memory=mem),
        "ikd": dict(history=[h(0, 0.3, 0)], train_time_s=1.0, median_step_s=1.0, memory=mem),
    }
    s = table4.summarise(methods)
    assert s["kd"]["best_score"] == 0.72 and s["kd"]["best_step"] == 2 and s["kd"]["best_single_class"] is None
    assert s["kd"]["left_one_class_at_step"] == 1
    assert s["reptile"]["best_single_class"] == 1 and s["reptile"]["left_one_class_at_step"] is None
    assert s["reptile"]["time_to_match_kd_best_s"] is None  # KD's best has both classes: a one-class 0.75 is no match
    assert table4.score_cell(s["reptile"], 1) == "majority class (acc 75.0%)"
    assert table4.score_cell(s["ikd"], 1) == "one class only: 0 (acc 30.0%)"
    assert table4.score_cell(s["kd"], 1) == "72.0/72.0"


def test_table4_preset_scores_defaults_and_overrides():
    from bench import table4

    args = table4.parse_args(["--preset", "scores"])
    assert (args.train_examples, args.steps, args.batch_size, args.parallel) == (0, 400, 8, 2)
    assert args.methods == ["kd", "metadistil_fastmeta", "metadistil_higher", "reptile", "lgtm_fastmeta", "ikd"]
    assert args.method_time_cap_s == 720.0 and args.teacher_finetune_steps == 400
    args = table4.parse_args(["--preset", "scores", "--steps", "10", "--methods", "kd"])
    assert (args.steps, args.methods, args.batch_size) == (10, ["kd"], 8)  # the command line wins
    quick = table4.parse_args([])
    assert (quick.steps, quick.train_examples, quick.parallel, quick.method_time_cap_s) == (30, 800, 1, 0.0)


def test_table4_parallel_peer_cap_and_teacher_reuse(tmp_path):
    """Two worker processes side by side, the higher row, the time cap and a reused teacher, end to end."""
    pytest.importorskip("higher")
    from bench import table4

    data_dir = tmp_path / "MRPC"
    _write_mrpc(data_dir, 24, 8)
    state = tmp_path / "teacher" / "t.pt"
    common_args = ["--model", "tiny", "--data-dir", str(data_dir), "--train-examples", "20", "--steps", "3",
                   "--eval-every", "1", "--teacher-finetune-steps", "1", "--teacher-finetune-batch-size", "4",
                   "--max-seq-length", "32", "--teacher-state", str(state)]
    out = tmp_path / "out"
    report = table4.main(common_args + ["--methods", "kd", "metadistil_higher", "--parallel", "2",
                                        "--method-time-cap-s", "1e-9", "--preset", "scores", "--out-dir", str(out)])
    assert state.is_file() and (out / "table4_scores_cpu.json").is_file()
    for name in ("kd", "metadistil_higher"):
        res = report["methods"][name]
        assert "error" not in res, res.get("error")
        assert res["steps_done"] == 1 and "cap" in res["stopped_early"]  # capped after its first step
    md = (out / "table4_scores_cpu.md").read_text()
    assert "closest stand-in for the official recipe" in md and "stopped by the time cap" in md
    again = table4.main(common_args + ["--methods", "kd", "--isolation", "inprocess", "--out-dir", str(out)])
    assert again["teacher"]["reused_from"] == str(state)


def test_kernels_sweep_parsing_and_order():
    from bench import kernels

    assert kernels.parse_sweep("4096x8, 8192X16,") == [(4096, 8), (8192, 16)]
    for bad, why in (("4096", "BLOCK_VxWARPS"), ("1000x8", "power of two"), ("8x4", "power of two"),
                     ("4096x3", "warps must be")):
        with pytest.raises(ValueError, match=why):
            kernels.parse_sweep(bad)
    with pytest.raises(SystemExit):
        kernels.parse_args(["--sweep", "4096x12"])
    order = kernels.plan_cases(kernels.SIZES["full"], ["bf16", "fp32"], ["fastmeta", "eager", "compile"],
                               [(8192, 16)], ["bf16"])
    impls = [c[3] for c in order]
    assert impls[-4:] == ["compile"] * 4 and impls[8:10] == ["kernels 8192x16"] * 2
    assert [c[2] for c in order if c[3] == "kernels 8192x16"] == ["bf16", "bf16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run interprets the kernels (TRITON_INTERPRET=1)")
def test_kernels_sweep_rows_are_checked_against_the_default_configuration(tmp_path):
    """A ``--sweep`` row runs the launchers in its configuration; its outputs agree with the default
    configuration's (a different reduction order only), and a configuration whose outputs differ is
    reported, not timed."""
    from bench import kernels

    assert kernels.main(["--device", "cpu", "--sizes", "tiny", "--impls", "eager", "--out-dir", str(tmp_path),
                         "--warmup", "0", "--repeats", "1", "--sweep", "16x4,64x2", "--sweep-dtypes", "fp32"]) == 0
    data = json.loads((tmp_path / "kernels_cpu.json").read_text())
    swept = [r for r in data["results"] if r["impl"].startswith("kernels ")]
    assert {(r["impl"], r["rows"], r["mode"]) for r in swept} == {
        (f"kernels {c}", n, m) for c in ("16x4", "64x2") for n in (8, 4) for m in kernels.MODES}
    assert all(r["dtype_name"] == "fp32" and 0.0 <= r["max_rel_diff_vs_default"] < 1e-6 for r in swept)
    assert "rel. diff vs default config" in (tmp_path / "kernels_cpu.md").read_text()
    # the check itself: a loss 0.1% off is caught (the launchers' own output passes above)
    launched = kernels.launched_kd_loss("kl", 2.0, 16, 4)
    diffs = kernels.check_against_default(lambda zs, zt: launched(zs, zt) * 1.001, "kl", 2.0, 4, 33,
                                          torch.float32, "cpu")
    assert 5e-4 < diffs["loss"] < 2e-3 and 5e-4 < diffs["gradients"] < 2e-3 and diffs["loss_vs_public"] < 1e-6
    assert not kernels.default_agreement(diffs, torch.float32)
    ok = {"loss": 1e-7, "loss_vs_public": 1e-7, "gradients": 1e-7}
    assert kernels.default_agreement(ok, torch.float32)
    assert not kernels.default_agreement({**ok, "gradients": 1e-3}, torch.float32)  # gradients 0.1% off
    assert kernels.default_agreement({**ok, "gradients": 7e-3, "loss_vs_public": 3e-3}, torch.bfloat16)  # rounding
    assert not kernels.default_agreement({**ok, "gradients": 5e-2}, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run interprets the kernels (TRITON_INTERPRET=1)")
def test_kernels_sweep_wrapper_is_checked_against_the_public_loss(monkeypatch):
    """The sweep's wrapper (``launched_kd_loss``) is checked against ``fastmeta.kd_loss``, not only against
    itself in the default configuration, and launches the configuration it is given, forward and backward."""
    from bench import kernels
    from fastmeta.kernels import kd_loss as kernel_module

    import inspect

    seen = []
    for name in ("kd_loss_forward", "kd_loss_backward"):
        real = getattr(kernel_module, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            bound = inspect.signature(_real).bind(*args, **kwargs).arguments
            seen.append((_name, bound.get("block_v"), bound.get("num_warps")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel_module, name, recording)
    diffs = kernels.check_against_default(kernels.launched_kd_loss("kl", 2.0, 32, 2), "kl", 2.0, 4, 33,
                                          torch.float32, "cpu")
    assert kernels.default_agreement(diffs, torch.float32), diffs
    assert ("kd_loss_forward", 32, 2) in seen and ("kd_loss_backward", 32, 2) in seen
    # a wrapper that forgets batchmean's 1/n: the default configuration, run by the same wrapper, then
    # disagrees with the public loss, which the check reports (a comparison with itself alone would not)
    real_launched = kernels.launched_kd_loss

    def forgets_the_mean(kind, temperature, block, warps):
        launched = real_launched(kind, temperature, block, warps)
        return lambda zs, zt: launched(zs, zt) * zs.shape[0]

    monkeypatch.setattr(kernels, "launched_kd_loss", forgets_the_mean)
    broken = kernels.check_against_default(forgets_the_mean("kl", 2.0, 32, 2), "kl", 2.0, 4, 33, torch.float32, "cpu")
    assert broken["loss"] < 1e-6 and broken["loss_vs_public"] > 1.0 and broken["gradients"] > 1.0
    assert not kernels.default_agreement(broken, torch.float32)
