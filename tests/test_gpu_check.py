"""``make gpu-check``'s dry run (``GPU_CHECK_DRY_RUN=1``: the same steps on CPU at tiny sizes).

The GPU run happens on a lent machine for a few minutes, once: its plumbing (steps,
subprocesses, deadlines, summaries, the tarball, the copies to ``GPU_CHECK_OUT``) is
checked here, end to end, so that it works the first time there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from bench import gpu_check

REPO = Path(__file__).resolve().parent.parent


def _run(tmp_path, **env):
    out = tmp_path / "out"
    full_env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_OUT": str(out), **env}
    full_env.pop("GPU_CHECK_TESTS_DEADLINE", None)
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=400)
    return proc, out


def _cpu_results_state():
    return {p.name: p.stat().st_mtime for p in (REPO / "bench" / "results").glob("*") if p.is_file()}


def test_dry_run_end_to_end(tmp_path):
    before = _cpu_results_state()
    proc, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert _cpu_results_state() == before  # bench/results untouched by a dry run
    report = json.loads((out / "gpu_check_cpu.json").read_text())
    assert report["gpu_check"] == gpu_check.SCHEMA_VERSION and report["dry_run"] is True
    assert report["device"] == "cpu" and report["wall_s"] > 0 and report["budget_s"] == 240
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == list(gpu_check.STEP_NAMES)
    for s in report["steps"]:
        assert s["status"] == "ok", (s["name"], s.get("log_tail"))
        assert s["seconds"] > 0 and s["cap_s"] > 0 and s["estimate_s"] > 0 and s["log"].startswith("logs/")
    info = steps["info"]["summary"]
    assert info["torch"] and info["cuda_available"] is False and info["fastmeta"]["triton_kernels_import"]
    assert steps["extension"]["summary"]["disabled"] is True  # the dry run compiles nothing
    tests = steps["tests"]["summary"]
    assert tests["tests"] == tests["passed"] == 10 and tests["failed"] == tests["errors"] == 0
    assert tests["shards"] == 2 and tests["log_counts"]["PASSED"] == 10  # two pytest processes, merged
    assert set(tests["by_file"]) == {"test_meta_step", "test_functional"}
    meta = steps["meta_step"]["summary"]
    # 12 configurations + the 2 peers, x fp32/bf16, + the 2 double_vjp rows and the double_vjp+teacher_recompute
    # row in fp32 + the teacher_recompute row in both (a peer missing here would be "not_installed", not "ok")
    n_peers = sum(1 for p in ("higher", "torchopt") if importlib.util.find_spec(p) is not None)
    assert meta["counts"] == {"ok": 24 + 2 + 1 + 2 + 2 * n_peers, "failed": 0, "skipped": 0, "not_installed": 4 - 2 * n_peers}
    assert set(meta["settings"]) == {"tiny bs2 seq8 fp32", "tiny bs2 seq8 bf16"}
    for setting in meta["settings"].values():
        assert setting["floor_s"] > 0
        assert {"kd", "metadistil/exact", "metadistil/autograd", "ikd/first_order", "peer/higher",
                "peer/torchopt", "metadistil/exact+teacher_recompute"} <= set(setting["steps"])
        assert setting["peak_bound_x_kd"] > 1.0
    # the variant rows keep their own names (they used to overwrite the default row of the same method)
    fp32 = meta["settings"]["tiny bs2 seq8 fp32"]["steps"]
    assert {"metadistil/exact+double_vjp", "lgtm/exact+double_vjp", "metadistil/exact+double_vjp+teacher_recompute"} \
        <= set(fp32)
    assert len({round(fp32[k]["median_s"], 12) for k in ("metadistil/exact", "metadistil/exact+double_vjp",
                                                          "metadistil/exact+teacher_recompute")}) == 3
    assert steps["kernels"]["summary"]["fwd_bwd"] and not steps["kernels"]["summary"]["not_measured"]
    # the launch-configuration sweep (--sweep): its row, in the summary and the markdown
    assert "kernels 16x4" in steps["kernels"]["summary"]["fwd"]["8x33 fp32"]
    assert {"hvp/backward", "mixed/exact"} <= set(steps["hvp"]["summary"])
    # 4 tiny cells x 8 methods (kd, exact, autograd, finite_diff, exact+double_vjp, exact+teacher_recompute, 2 peers)
    growth = steps["growth"]["summary"]
    assert growth["counts"] == {"ok": 24 + 4 * n_peers, "failed": 0, "skipped": 0, "not_installed": 8 - 4 * n_peers}
    assert {"kd", "metadistil/exact", "metadistil/autograd", "metadistil/finite_diff"} <= set(growth["largest_cell"])
    assert growth["largest_cell"]["kd"]["batch_size"] == 4 and growth["largest_cell"]["kd"]["seq_len"] == 16
    # GPU_CHECK_OUT: the tarball, summary, full log and the main result files, at most 8 loose files
    loose = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(loose) <= 8 and report["copied_to_out"] == [n for n in report["copied_to_out"] if n in loose]
    assert {"gpu_check_results.tar.gz", "gpu_check_cpu.json", "gpu_check.log", "gpu_check_cpu.md",
            "meta_step_cpu.json", "meta_step_cpu.png"} <= set(loose)
    with tarfile.open(out / "gpu_check_results.tar.gz") as tar:
        names = tar.getnames()
    for expected in ("gpu_check_cpu/results/meta_step_cpu.md", "gpu_check_cpu/results/profile_step_cpu.json",
                     "gpu_check_cpu/results/kernels_cpu.json",
                     "gpu_check_cpu/results/growth_cpu.json", "gpu_check_cpu/results/growth_cpu.png",
                     "gpu_check_cpu/results/hvp_cpu.md", "gpu_check_cpu/info.json", "gpu_check_cpu/pytest_cpu_0.xml",
                     "gpu_check_cpu/logs/2_tests.log", "gpu_check_cpu/gpu_check.log"):
        assert expected in names, names
    log = (out / "gpu_check.log").read_text()
    assert "=== meta_step (ok) ===" in log and "passed" in log
    md = (out / "gpu_check_cpu.md").read_text()
    assert "launch configurations, forward, 8x33 fp32: 16x4 " in md
    assert "| meta_step | ok |" in md and "| growth | ok |" in md and "## Key figures" in md
    assert "the larger of KD + teacher optimizer state" in md and "with both optimizers' states" in md
    assert "growth: " in md and "peers: " in md
    assert "profile (metadistil/exact tiny bs2): step " in md and "largest gaps: " in md
    assert "student tangent: step: student_jvp phase " in md and "torch.func.jvp " in md  # forward AD vs functorch
    assert "whole step with the phases' CUDA syncs " in md  # profile_step --sync-ab
    # the update phases taken apart (bench.updates, inside the profile step): every row that ran, in the summary
    from bench import updates

    taken_apart = steps["profile"]["summary"]["updates"]
    assert set(taken_apart) <= set(updates.ROWS) and len(taken_apart) >= len(updates.ROWS) - 1  # fused may be refused
    assert "teacher: Transaction.apply, atomic (teacher_update phase): " in md
    # stdout ends with the compact summary: the step table and where everything is
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("summary: ") and any(line.startswith("| **total** |") for line in tail[-4:])
    assert "metadistil/exact" in proc.stdout[-6000:]


def test_dry_run_out_of_time_skips_the_rest_and_keeps_what_ran(tmp_path):
    proc, out = _run(tmp_path, GPU_CHECK_BUDGET_S="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check_cpu.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status["info"] == "ok"  # always runs (cheap, and says what the machine is)
    assert all(status[n] == "skipped (time)" for n in gpu_check.STEP_NAMES[1:]), status
    assert report["steps"][0]["summary"]["torch"]
    assert "SKIPPED (time): extension, tests, meta_step, profile, kernels, hvp, growth" in proc.stdout
    assert (out / "gpu_check_results.tar.gz").is_file()


def test_gpu_commands_name_cuda_and_work_without_pytest_benchmark(tmp_path):
    ctx = gpu_check.Context(dry_run=False, device="cuda", suffix="cuda", results_dir=tmp_path, work=tmp_path,
                            out=None, python="python3", budget_s=450, t0=0.0, deadline=450.0)
    shards = gpu_check._tests_cmd(ctx, 100.0)
    assert len(shards) == 3  # pytest processes side by side (the CUDA cases are bound by Python overhead)
    for tests in shards:
        assert tests[tests.index("-k") + 1] == "cuda" and "addopts=" in tests and "bench._pytest_deadline" in tests
    files = gpu_check.test_files()
    for name in ("tests/test_engine.py", "tests/test_meta_step.py", "tests/test_algorithms.py",
                 "tests/test_functional.py", "tests/test_mixed_precision.py", "tests/test_kd_loss.py"):
        assert name in files
    in_shards = [f for tests in shards for f in tests if f.startswith("tests/")]
    assert sorted(in_shards) == sorted(files)
    meta = gpu_check._meta_step_cmd(ctx, 123.0)
    assert meta[meta.index("--device") + 1] == "cuda" and "--deadline" in meta and "--model" not in meta
    hvp = gpu_check._hvp_cmd(ctx, 123.0)
    assert hvp[hvp.index("--teacher") + 1] == "bert-base" and "minilm" not in " ".join(hvp)
    growth = gpu_check._growth_cmd(ctx, 123.0)
    assert growth[growth.index("--device") + 1] == "cuda" and "--model" not in growth and "--deadline" in growth
    assert [s.name for s in gpu_check.make_steps(False)][-1] == "growth"  # low priority: last
    assert "peer/higher" in meta and "peer/torchopt" in meta  # the peers among meta_step's first rows
    assert sum(s.estimate_s for s in gpu_check.make_steps(False)) <= 540  # fits the default budget


def test_vendor_peers_and_peers_path(tmp_path, monkeypatch):
    """``--vendor-peers``: the installed peer packages copied (TorchOpt without its compiled ``_C``), and put on
    the steps' PYTHONPATH, after the checkout."""
    copied = gpu_check.vendor_peers(tmp_path / "peers")
    names = [c.split()[0] for c in copied]
    for name in names:
        assert (tmp_path / "peers" / name / "__init__.py").is_file()
    if "torchopt" in names:
        assert not list((tmp_path / "peers" / "torchopt").glob("_C*.so"))
    monkeypatch.setenv("GPU_CHECK_PEERS_PATH", str(tmp_path / "peers"))
    ctx = gpu_check.Context(dry_run=True, device="cpu", suffix="cpu", results_dir=tmp_path, work=tmp_path,
                            out=None, python=sys.executable, budget_s=10, t0=0.0, deadline=10.0)
    path = gpu_check.base_env(ctx)["PYTHONPATH"].split(os.pathsep)
    assert path[0] == str(REPO) and str(tmp_path / "peers") in path


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4" time="3.5">'
        '<testcase classname="tests.test_a" name="test_x[cuda]" time="1.0"/>'
        '<testcase classname="tests.test_a" name="test_y[cuda]" time="2.0"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_z[cuda]" time="0.1">'
        '<skipped message="gpu-check time cap reached before this test started"/></testcase>'
        '<testcase classname="tests.test_b" name="test_w[cuda]" time="0.1"><error message="boom"/></testcase>'
        '</testsuite></testsuites>')
    s = gpu_check.parse_junit(xml)
    assert (s["tests"], s["passed"], s["failed"], s["errors"], s["skipped"], s["skipped_time_cap"]) == (4, 1, 1, 1, 1, 1)
    assert s["failures"][0] == "tests.test_a::test_y[cuda]: assert 1 == 2"
    assert s["by_file"]["test_a"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert s["junit_seconds"] == 3.5 and gpu_check.parse_junit(tmp_path / "missing.xml") is None


def test_pytest_deadline_plugin_skips_late_tests_and_drops_shared_ones(tmp_path):
    (tmp_path / "conftest.py").write_text("import pytest\n@pytest.fixture\ndef shared_dir():\n    return '/nowhere'\n")
    (tmp_path / "test_t.py").write_text("def test_a():\n    pass\n\ndef test_b(shared_dir):\n    pass\n")
    env = {**os.environ, "GPU_CHECK_TESTS_DEADLINE": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-o", "addopts=", "-p", "no:cacheprovider",
                           "-p", "bench._pytest_deadline", "-rs", "--rootdir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped, 1 deselected" in proc.stdout and "gpu-check time cap" in proc.stdout


def test_meta_step_deadline_reports_skipped_and_writes(tmp_path):
    """A benchmark past its deadline writes its files with every item marked skipped (time)."""
    from bench import meta_step

    report = meta_step.main(["--model", "tiny", "--isolation", "inprocess", "--warmup", "0", "--repeats", "1",
                             "--algorithms", "kd", "metadistil", "--hypergrads", "exact", "--time-budget-s", "0",
                             "--out-dir", str(tmp_path)])
    assert "skipped (time)" in report["incomplete"]
    (setting,) = report["settings"]
    assert setting["floor"]["skipped"] == "time" and all(r["skipped"] == "time" for r in setting["steps"])
    md = (tmp_path / "meta_step_cpu.md").read_text()
    assert "Incomplete run" in md and "skipped (time)" in md
