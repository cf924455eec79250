"""bench.updates: the update phases of a MetaDistil step taken apart (rows do what they are named)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import updates
from bench.meta_step import build_models
from conftest import DEVICES

CONFIGURED = "student: AdamW step, as configured (floor's student_update)"


def _models(device):
    teacher, student = build_models("tiny", seed=0, attn="eager", dropout=None)
    teacher.to(device)
    student.to(device)
    t_opt = torch.optim.AdamW(teacher.parameters(), lr=2e-5)
    s_opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.1)
    for model, opt in ((teacher, t_opt), (student, s_opt)):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)
    return teacher, student, t_opt, s_opt


def _optimizer_tensors(opt):
    return [v.clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("device", DEVICES)
def test_rows_run_on_copies_and_fused_and_twin_agree(device):
    teacher, student, t_opt, s_opt = _models(device)
    params_before = [p.detach().clone() for m in (teacher, student) for p in m.parameters()]
    states_before = _optimizer_tensors(t_opt) + _optimizer_tensors(s_opt)
    rows = updates.update_rows(teacher, student, t_opt, s_opt, device=device)
    assert list(rows) == list(updates.ROWS)
    # the fused op and its twin give the engine the same pilot point and the same adjoint
    fused, twin = rows["pilot: θ' (engine pilot, fused op)"](), rows["pilot: θ' (twin)"]()
    adj_fused, adj_twin = rows["pilot: adjoint a (engine adjoint, fused op)"](), rows["pilot: adjoint a (twin)"]()
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert set(fused) == set(twin) == set(adj_fused) == set(adj_twin) == set(names)
    for n in names:
        torch.testing.assert_close(fused[n], twin[n], rtol=1e-5, atol=1e-9)  # fp32: a few ulp apart on a GPU
        torch.testing.assert_close(adj_fused[n], adj_twin[n], rtol=1e-5, atol=1e-9)
        assert not torch.equal(fused[n], student.get_parameter(n)), n  # a real step, not the input
    # the AdamW rows run the implementation they name: step() reads foreach/fused from the param groups
    for label, flags in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        fn = rows[f"student: AdamW step, {label}"]
        if not callable(fn):  # only fused may be refused (an old torch, a device without it): it says why
            assert label == "fused" and fn, fn
            continue
        for group in fn.optimizer.param_groups:
            assert all(group[k] is v for k, v in flags.items()), (label, group)
    for name, fn in rows.items():  # every row runs here
        if callable(fn):
            fn()
    # ... on copies: the models, their .grad and both optimizers' states are as they were
    params_after = [p.detach() for m in (teacher, student) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after)), "a row moved an original model"
    assert all(p.grad is None for m in (teacher, student) for p in m.parameters())
    states_after = _optimizer_tensors(t_opt) + _optimizer_tensors(s_opt)
    assert all(torch.equal(a, b) for a, b in zip(states_before, states_after)), "a row stepped an original optimizer"


def test_twin_rows_run_the_twin_and_fused_rows_the_extension(monkeypatch):
    """The twin rows go through the plain-PyTorch twin (backend="torch"), the engine rows through the fused op
    when the extension is built (else through the twin too, as the engine itself would)."""
    import fastmeta.ops.pilot as pilot_ops
    from fastmeta import ops

    calls = []
    real = pilot_ops.adam_twin
    monkeypatch.setattr(pilot_ops, "adam_twin", lambda *a, **k: calls.append(1) or real(*a, **k))
    teacher, student, t_opt, s_opt = _models("cpu")
    rows = updates.update_rows(teacher, student, t_opt, s_opt, device="cpu")
    n = len([p for p in student.parameters() if p.requires_grad])
    for twin in ("pilot: θ' (twin)", "pilot: adjoint a (twin)"):
        calls.clear()
        rows[twin]()
        assert len(calls) == n, twin  # the twin runs tensor by tensor
    if ops.extension_ops_available(torch.device("cpu")):
        for fused in ("pilot: θ' (engine pilot, fused op)", "pilot: adjoint a (engine adjoint, fused op)"):
            calls.clear()
            rows[fused]()
            assert calls == [], fused


def test_copy_optimizer_keeps_groups_frozen_parameters_and_its_own_state():
    """Several param groups (a no-decay split) over a model with a frozen parameter: the copy has the same
    groups over the replica's parameters, equal but separate state, and the flags in every group."""
    import copy

    from bench import common

    _, student, _, _ = _models("cpu")
    frozen = next(student.parameters())
    frozen.requires_grad_(False)
    decay = [p for n, p in student.named_parameters() if p.requires_grad and "bias" not in n]
    rest = [p for n, p in student.named_parameters() if not (p.requires_grad and "bias" not in n)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    for p in decay + rest:
        p.grad = None if p is frozen else torch.randn_like(p)
    opt.step()
    replica = copy.deepcopy(student)
    new = common.copy_optimizer(opt, student, replica, foreach=True)
    assert [g["weight_decay"] for g in new.param_groups] == [g["weight_decay"] for g in opt.param_groups]
    assert all(g["foreach"] is True for g in new.param_groups)
    twin = dict(zip([id(p) for p in student.parameters()], replica.parameters()))
    for g_old, g_new in zip(opt.param_groups, new.param_groups):
        assert [twin[id(p)] for p in g_old["params"]] == g_new["params"]
    for p in decay:
        a, b = opt.state[p]["exp_avg"], new.state[twin[id(p)]]["exp_avg"]
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_pilot_row_is_the_point_of_a_real_adamw_step():
    """The engine pilot row's θ' equals the parameters after one torch.optim.AdamW step with the same gradients
    (the configured-step row steps the very tensors the pilot row reads)."""
    teacher, student, t_opt, s_opt = _models("cpu")
    rows = updates.update_rows(teacher, student, t_opt, s_opt, device="cpu", seed=3)
    theta_new = rows["pilot: θ' (engine pilot, fused op)"]()
    step = rows[CONFIGURED]
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    step()
    assert len(step.params) == len(names)
    for n, p in zip(names, step.params):
        torch.testing.assert_close(theta_new[n], p.detach(), rtol=1e-6, atol=1e-9)


def test_rows_without_the_embedding_tables_are_the_full_rows_restricted():
    """The ``student_dense`` rows step every trainable student parameter except the ``nn.Embedding`` weights,
    with the values the full rows give those parameters."""
    teacher, student, t_opt, s_opt = _models("cpu")
    rows = updates.update_rows(teacher, student, t_opt, s_opt, device="cpu", seed=3)
    tables = {n for n, m in student.named_modules() if isinstance(m, torch.nn.Embedding)}
    embedding_weights = {f"{n}.weight" for n in tables}
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert embedding_weights and embedding_weights <= set(names)
    for full, dense in (("pilot: θ' (engine pilot, fused op)", "pilot: θ' without the embedding tables (fused op)"),
                        ("pilot: adjoint a (engine adjoint, fused op)",
                         "pilot: adjoint a without the embedding tables (fused op)")):
        whole, part = rows[full](), rows[dense]()
        assert set(part) == set(names) - embedding_weights
        for n in part:
            torch.testing.assert_close(part[n], whole[n], rtol=0, atol=0)
    dense_bytes = sum(p.numel() * 4 for n, p in student.named_parameters() if n not in embedding_weights)
    assert sum(p.numel() * 4 for p in updates.dense_parameters(student).values()) == dense_bytes


def test_report_rows_bytes_and_ratios():
    times = {name: [0.002, 0.001, 0.003] for name in updates.ROWS}
    times["student: AdamW step, fused"] = "RuntimeError: not here"
    rows = updates.report_rows(times, teacher_bytes=1000, student_bytes=400, copy_bytes_per_s=1e6,
                               student_dense_bytes=100)
    by = {r["row"]: r for r in rows}
    assert by["pilot: θ' without the embedding tables (fused op)"]["bytes_min"] == 5 * 100
    assert by["teacher: Transaction.apply, atomic (teacher_update phase)"]["bytes_min"] == 13 * 1000
    assert by["pilot: adjoint a (engine adjoint, fused op)"]["bytes_min"] == 6 * 400
    assert by["pilot: θ' (twin)"]["bytes_min"] == 5 * 400
    assert by["student: AdamW step, fused"]["skipped"].startswith("RuntimeError")
    r = by["teacher: undo snapshot alone (copy + release)"]
    assert r["median_s"] == 0.002 and math.isclose(r["gb_per_s"], 6000 / 0.002 / 1e9)
    assert math.isclose(r["pct_copy_bw"], 100 * 6000 / 0.002 / 1e6) and math.isclose(r["x_optimizer_step"], 1.0)


def test_main_writes_every_row(tmp_path):
    out = tmp_path / "u.json"
    report = updates.main(["--model", "tiny", "--rounds", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["row"] for r in data["rows"]] == list(updates.ROWS)
    n_teacher = sum(p.numel() for p in build_models("tiny", seed=0, attn="eager", dropout=None)[0].parameters())
    assert data["teacher_param_bytes"] == 4 * n_teacher and report["student_param_bytes"] < 4 * n_teacher
    assert data["copy_bandwidth_bytes_per_s"] > 0
    for r in data["rows"]:
        assert r.get("median_s", 0) > 0 or "skipped" in r, r
