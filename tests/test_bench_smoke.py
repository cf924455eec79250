"""Fast smoke tests of the benchmark harnesses (tiny random models, tiny data, seconds).

They run the code paths of ``python -m bench.meta_step`` and ``python -m bench.table4``
end to end (in-process, to stay fast; one test covers the fresh-subprocess worker
path) and check the JSON / markdown / PNG outputs and their schema.
"""
import json
import math

import pytest
import torch

from bench import common


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
    assert set(floor["passes"]) == {"teacher_forward_backward", "teacher_forward", "student_forward_backward_train",
                                    "student_forward_backward_quiz", "student_jvp"}
    assert floor["passes"]["student_forward_backward_train"]["count"] == 2
    assert math.isclose(floor["floor_s"], sum(p["median_s"] * p["count"] for p in floor["passes"].values()))
    steps = {(r["algorithm"], r["hypergrad"]): r for r in setting["steps"]}
    assert ("kd", None) in steps
    for r in steps.values():
        assert "error" not in r, r.get("error")
        assert r["median_s"] > 0 and r["parameters_finite_after"]
        assert math.isclose(r["time_vs_kd"], r["median_s"] / steps[("kd", None)]["median_s"])
        assert math.isclose(r["time_vs_floor"], r["median_s"] / floor["floor_s"])
        assert r["memory"]["peak_bytes"] > 0
    md = (out_dir / "meta_step_cpu.md").read_text()
    assert "| step | median s | x KD | x autograd | x floor |" in md and "floor (sum)" in md
    assert (out_dir / "meta_step_cpu.png").read_bytes()[:4] == b"\x89PNG"
    return steps


def test_meta_step_smoke(tmp_path):
    from bench import meta_step

    meta_step.main(["--model", "tiny", "--isolation", "inprocess", "--warmup", "0", "--repeats", "1",
                    "--algorithms", "kd", "metadistil", "--hypergrads", "exact", "autograd",
                    "--out-dir", str(tmp_path)])
    steps = _check_meta_step_report(None, tmp_path)
    assert set(steps) == {("kd", None), ("metadistil", "exact"), ("metadistil", "autograd")}
    assert math.isclose(steps[("metadistil", "autograd")]["time_vs_autograd"], 1.0)


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

    args = meta_step.parse_args(["--device", "cuda", "--priority", "kd", "metadistil/exact", "metadistil/autograd"])
    assert (args.isolation, args.warmup, args.repeats, args.threads) == ("inprocess", 2, 5, None)
    settings = meta_step.settings_for(args)
    assert [(s["batch_size"], s["dtype"]) for s in settings] == [(4, "fp32"), (4, "bf16"), (32, "fp32"), (32, "bf16")]
    assert all(s["model"] == "bert-base" and s["seq_len"] == 128 for s in settings)
    items = meta_step.plan(args, settings)
    confs = meta_step.configurations(args.algorithms, args.hypergrads)
    assert len(confs) == 12 and len(items) == 4 * 13
    first = items[:16]
    assert [(i, k) for i, k, _, _ in first[::4]] == [(0, "floor"), (1, "floor"), (2, "floor"), (3, "floor")]
    assert {(a, h) for _, k, a, h in first if k == "step"} == {("kd", None), ("metadistil", "exact"),
                                                              ("metadistil", "autograd")}
    assert ("metadistil", "finite_diff") in {(a, h) for _, _, a, h in items[16:]}
    with pytest.raises(SystemExit, match="--priority"):
        meta_step.plan(meta_step.parse_args(["--priority", "magic/exact"]), settings)
    cpu = meta_step.parse_args([])
    assert (cpu.isolation, cpu.warmup, cpu.repeats, cpu.threads) == ("subprocess", 1, 3, 1)


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
