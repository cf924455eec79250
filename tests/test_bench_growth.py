"""``python -m bench.growth`` (step time and memory against batch size and sequence length), at tiny sizes."""
from __future__ import annotations

import json
import math

import pytest

from bench import growth, meta_step


def test_methods_cells_and_defaults():
    assert meta_step.parse_conf_name("kd") == ("kd", None, None, None)
    assert meta_step.parse_conf_name("metadistil/finite_diff") == ("metadistil", "finite_diff", None, None)
    assert meta_step.parse_conf_name("peer/torchopt") == ("metadistil", "autograd", "torchopt", None)
    assert meta_step.parse_conf_name("metadistil/exact+double_vjp") == ("metadistil", "exact", None, "double_vjp")
    assert meta_step.parse_conf_name("metadistil/exact+teacher_recompute") == ("metadistil", "exact", None,
                                                                         "teacher_recompute")
    for name in ("metadistil/exact+double_vjp+teacher_recompute", "metadistil/exact+teacher_recompute+double_vjp"):
        assert meta_step.parse_conf_name(name) == ("metadistil", "exact", None, "double_vjp+teacher_recompute")
    for bad in ("peer/jax", "magic", "metadistil", "metadistil/exact+teacher_drop", "metadistil/exact+jvp2",
                "metadistil/exact+jvp", "metadistil/exact+teacher_keep", "metadistil/autograd+double_vjp",
                "metadistil/exact+double_vjp+double_vjp", "metadistil/exact+teacher_recompute+teacher_recompute",
                "metadistil/exact+double_vjp+jvp", "metadistil/exact+double_vjp+teacher_keep"):
        with pytest.raises(SystemExit):
            meta_step.parse_conf_name(bad)
    args = growth.parse_args([])
    assert (args.model, args.batch_sizes, args.seq_lens, args.warmup, args.repeats, args.isolation, args.threads) == \
        ("minilm", [4, 16, 32], [128, 256], 1, 1, "subprocess", 1)
    assert args.methods == list(growth.METHODS) and len(args.methods) == 8
    # smallest batch x seq first, so a deadline keeps every method at the small sizes
    assert growth.cells(args) == [(4, 128), (4, 256), (16, 128), (32, 128), (16, 256), (32, 256)]
    cuda = growth.parse_args(["--device", "cuda"])
    assert (cuda.model, cuda.repeats, cuda.isolation, cuda.threads) == ("bert-base", 3, "inprocess", None)


def test_growth_smoke(tmp_path):
    report = growth.main(["--model", "tiny", "--batch-sizes", "2", "4", "--seq-lens", "8", "--warmup", "0",
                          "--repeats", "1", "--isolation", "inprocess", "--methods", "kd", "metadistil/exact",
                          "metadistil/exact+teacher_recompute", "peer/higher", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "growth_cpu.json").read_text())
    assert data["benchmark"] == "growth" and len(data["rows"]) == 8
    recompute = [r for r in data["rows"] if r["method"] == "metadistil/exact+teacher_recompute"]
    assert len(recompute) == 2 and all(r["variant"] == "teacher_recompute" and r["median_s"] > 0 for r in recompute)
    for r in data["rows"]:
        assert {"method", "algorithm", "hypergrad", "peer", "batch_size", "seq_len"} <= set(r)
        if r["peer"] and "skipped" in r:
            assert r["skipped"].startswith("not installed")
            continue
        assert "error" not in r, r.get("error")
        assert r["median_s"] > 0 and r["parameters_finite_after"] and "step_memory_bytes" in r
        kd = next(o for o in data["rows"] if o["method"] == "kd" and o["batch_size"] == r["batch_size"])
        assert math.isclose(r["time_vs_kd"], r["median_s"] / kd["median_s"])
    assert set(report["growth"]) >= {"kd seq8", "metadistil/exact seq8"}
    md = (tmp_path / "growth_cpu.md").read_text()
    assert "## seq 8: step time" in md and "## seq 8: step memory" in md and "| bs 2 | bs 4 |" in md
    assert (tmp_path / "growth_cpu.png").read_bytes()[:4] == b"\x89PNG"
    growth.main(["--replot", str(tmp_path / "growth_cpu.json")])


def test_growth_deadline_skips_and_keeps(tmp_path):
    report = growth.main(["--model", "tiny", "--batch-sizes", "2", "--seq-lens", "8", "--methods", "kd",
                          "--isolation", "inprocess", "--time-budget-s", "0", "--out-dir", str(tmp_path)])
    assert report["rows"][0]["skipped"] == "time" and "skipped (time)" in report["incomplete"]
    assert "skipped (time)" in (tmp_path / "growth_cpu.md").read_text()
