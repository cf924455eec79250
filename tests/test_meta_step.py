"""``fastmeta.meta_step``: API, bad input and atomicity.

A failing ``meta_step`` -- bad input, or a non-finite loss that only shows up after
one model has already been updated (a poisoned forward) -- must raise a clear
error and leave BOTH models (state_dict and ``.grad``) and BOTH optimizers
(state_dict) exactly as they were, bitwise.

The tests run on each device of ``conftest.DEVICES`` (the ``device`` fixture); rollback
restores saved copies, so "bitwise" holds on CUDA too.  Pure argument validation stays on CPU.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import fastmeta
from fastmeta.step import StepOutput

CASES = [
    ("kd", "exact"),
    ("metadistil", "exact"),
    ("metadistil", "finite_diff"),
    ("metadistil", "autograd"),
    ("lgtm", "exact"),
    ("reptile", "first_order"),
    ("ikd", "exact"),
    ("ikd", "first_order"),
]


class Net(torch.nn.Module):
    """A small MLP whose forward can be poisoned (NaN logits) at a chosen call."""

    def __init__(self, hidden, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.ModuleList([torch.nn.Linear(5, hidden), torch.nn.Linear(hidden, hidden)])
        self.norm = torch.nn.BatchNorm1d(hidden)  # running statistics: buffers a failing step must restore
        self.head = torch.nn.Linear(hidden, classes)
        self.calls = 0
        self.poison_at = None

    def forward(self, x):
        self.calls += 1
        h = x
        for layer in self.layer:
            h = torch.tanh(layer(h))
        z = self.head(self.norm(h))
        if self.poison_at is not None and self.calls == self.poison_at:
            z = z * float("nan")  # NaN in values and in any forward-mode tangent
        return z


def make_batch(seed, size=6, classes=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # generated on CPU, then moved: the same data on every device
    return (torch.randn(size, 5, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, classes, (size,), generator=g).to(device))


def setup(algorithm, hypergrad, classes_t=3, classes_s=3, device="cpu"):
    teacher = Net(8, classes_t, seed=1).double().to(device)
    student = Net(8, classes_s, seed=2).double().to(device)
    opt_t = torch.optim.Adam(teacher.parameters(), lr=0.01)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    if classes_t == classes_s:  # prime both optimizers so that their state is not empty
        fastmeta.meta_step(teacher, student, make_batch(1, device=device), make_batch(2, device=device), opt_t, opt_s,
                           algorithm=algorithm, hypergrad=hypergrad, temperature=2.0)
    return teacher, student, opt_t, opt_s


def snapshot(*objects):
    state = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            state.append(copy.deepcopy(obj.state_dict()))
            state.append([None if p.grad is None else p.grad.detach().clone() for p in obj.parameters()])
        else:
            state.append(copy.deepcopy(obj.state_dict()))
    return state


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def call(teacher, student, opt_t, opt_s, algorithm, hypergrad, batch=None, quiz=None, **kwargs):
    kwargs.setdefault("temperature", 2.0)
    device = next(student.parameters()).device
    return fastmeta.meta_step(
        teacher, student, make_batch(3, device=device) if batch is None else batch,
        make_batch(4, device=device) if quiz is None else quiz,
        opt_t, opt_s, algorithm=algorithm, hypergrad=hypergrad, **kwargs,
    )


@pytest.mark.parametrize("algorithm,hypergrad", CASES)
def test_step_output_and_updates(algorithm, hypergrad, device):
    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad, device=device)
    before_t = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    before_s = {n: p.detach().clone() for n, p in student.named_parameters()}
    out = call(teacher, student, opt_t, opt_s, algorithm, hypergrad)
    assert isinstance(out, StepOutput) and out.algorithm == algorithm
    assert out.student_loss.dim() == 0 and torch.isfinite(out.student_loss) and not out.student_loss.requires_grad
    assert out.timings["total"] > 0 and out.timings["validate"] >= 0
    assert out.teacher_updated == (algorithm != "kd")
    assert (out.quiz_loss is None) == (algorithm in ("kd", "reptile"))
    if algorithm == "lgtm":
        assert out.influences.shape == (6,)
    moved_s = any(not torch.equal(p, before_s[n]) for n, p in student.named_parameters())
    moved_t = any(not torch.equal(p, before_t[n]) for n, p in teacher.named_parameters())
    assert moved_s and moved_t == (algorithm != "kd")
    for p in student.parameters():
        assert p.grad is not None  # the gradient the optimizer used


@pytest.mark.parametrize("algorithm,hypergrad", CASES)
@pytest.mark.parametrize("poisoned", ["teacher", "student"])
@pytest.mark.parametrize("which_call", ["first", "last"])
def test_non_finite_anywhere_leaves_everything_untouched(algorithm, hypergrad, poisoned, which_call, device):
    """NaN logits at the first or last forward of either model in a step: error, nothing changed."""
    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad, device=device)
    model = teacher if poisoned == "teacher" else student
    # count the forwards of one clean step (on copies, the real ones stay as they are)
    t2, s2, ot2, os2 = copy.deepcopy(teacher), copy.deepcopy(student), None, None
    ot2 = torch.optim.Adam(t2.parameters(), lr=0.01)
    ot2.load_state_dict(opt_t.state_dict())
    os2 = torch.optim.SGD(s2.parameters(), lr=0.1, momentum=0.9)
    os2.load_state_dict(opt_s.state_dict())
    m2 = t2 if poisoned == "teacher" else s2
    start = m2.calls
    call(t2, s2, ot2, os2, algorithm, hypergrad)
    count = m2.calls - start
    assert count >= 1
    model.poison_at = model.calls + (1 if which_call == "first" else count)
    saved = snapshot(teacher, student, opt_t, opt_s)
    with pytest.raises(FloatingPointError, match="finite"):
        call(teacher, student, opt_t, opt_s, algorithm, hypergrad)
    assert_same(snapshot(teacher, student, opt_t, opt_s), saved)
    # and the models still train afterwards
    model.poison_at = None
    call(teacher, student, opt_t, opt_s, algorithm, hypergrad)


@pytest.mark.parametrize("algorithm,hypergrad", [("metadistil", "exact"), ("lgtm", "finite_diff")])
def test_kept_snapshot_buffers_survive_repeated_rollbacks(algorithm, hypergrad, device):
    """The undo snapshot copies into buffers kept across steps (on the CPU): clean steps, a failing step (the
    student's last forward, after the teacher's update: the teacher is rolled back), clean steps,
    another failure, clean steps -- every failure leaves everything as it was, and the models end
    bitwise where the same clean steps alone take copies of them."""
    from fastmeta.algorithms import _common

    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad, device=device)
    t2, s2, ot2, os2 = copy.deepcopy((teacher, student, opt_t, opt_s))  # the reference: clean steps only
    t3, s3, ot3, os3 = copy.deepcopy((teacher, student, opt_t, opt_s))  # throwaway copies to count forwards on
    start = s3.calls
    call(t3, s3, ot3, os3, algorithm, hypergrad, batch=make_batch(10, device=device))
    forwards = s3.calls - start  # the student's forwards in one clean step (its last: the real step)
    plan = ["ok", "ok", "fail", "ok", "fail", "fail", "ok"]
    for i, what in enumerate(plan):
        batch = make_batch(11 + i, device=device)
        if what == "ok":
            call(teacher, student, opt_t, opt_s, algorithm, hypergrad, batch=batch)
            call(t2, s2, ot2, os2, algorithm, hypergrad, batch=batch)
            if device.type != "cpu":  # kept on the CPU only: on CUDA every snapshot is fresh, then freed
                assert not _common._KEPT.get(opt_t)
                continue
            buffers = _common._KEPT[opt_t]["params"][1]
            if i == 1:
                kept = buffers[0].data_ptr()
            elif i > 1:
                assert buffers[0].data_ptr() == kept  # the same buffer, reused
            continue
        saved = snapshot(teacher, student, opt_t, opt_s)
        student.poison_at = student.calls + forwards
        with pytest.raises(FloatingPointError, match="finite"):
            call(teacher, student, opt_t, opt_s, algorithm, hypergrad, batch=batch)
        student.poison_at = None
        assert_same(snapshot(teacher, student, opt_t, opt_s), saved)
    for a, b in ((teacher, t2), (student, s2), (opt_t, ot2), (opt_s, os2)):
        assert_same(a.state_dict(), b.state_dict())


def test_kept_snapshot_buffer_is_never_shared_by_two_live_snapshots():
    """A second live snapshot of the same optimizer gets its own copies; a released buffer is reused;
    after a restore the optimizer owns the state copies and they are no longer kept."""
    from fastmeta.algorithms._common import _KEPT, _Snapshot

    teacher, student, opt_t, opt_s = setup("metadistil", "exact")
    params = list(teacher.parameters())
    first = _Snapshot(params, opt_t)
    second = _Snapshot(params, opt_t)
    assert first.data[0].data_ptr() != second.data[0].data_ptr()
    # the copies are taken from the parameters themselves (no .detach() each), without autograd: plain
    # tensors, no history linking them to the parameters; fresh (second) and kept (third, below) alike
    for copies in (first.data, second.data):
        assert all(not c.requires_grad and c.grad_fn is None for c in copies)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    second.release()
    first.restore()  # bitwise back, although `second` existed meanwhile
    assert all(torch.equal(p, d) for p, d in zip(params, second.data))
    third = _Snapshot(params, opt_t)
    assert third.data[0].data_ptr() == first.data[0].data_ptr()  # the kept params buffer, reused
    assert all(not c.requires_grad and c.grad_fn is None for c in third.data)
    state_views = [v for st in opt_t.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    kept_state = _KEPT[opt_t].get("state")
    assert kept_state is None or all(v.data_ptr() != c.data_ptr() for v in state_views for c in kept_state[1])
    third.release()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_undo_snapshot_is_freed_after_the_step_on_cuda():
    """On CUDA nothing of the undo snapshot outlives the step (kept buffers only raise the peak there:
    the caching allocator reuses a freed block for free).  After the same steps from the same start,
    atomic=True leaves exactly the memory atomic=False leaves."""
    left = {}
    for atomic in (None, True, False):  # None: a warm-up round (atomic=False), not measured: CUDA's
        # lazily made workspaces (cuBLAS) would otherwise count in the first measured round only
        gc.collect()  # nothing of the previous round may be freed in the middle of this one
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        teacher, student, opt_t, opt_s = setup("metadistil", "exact", device=torch.device("cuda"))
        for seed in (21, 22, 23):
            call(teacher, student, opt_t, opt_s, "metadistil", "exact",
                 batch=make_batch(seed, device=torch.device("cuda")), atomic=bool(atomic))
        torch.cuda.synchronize()
        left[atomic] = torch.cuda.memory_allocated() - base
        del teacher, student, opt_t, opt_s
    assert left[True] == left[False] > 0


def _bad_inputs(device="cpu"):
    device = torch.device(device)
    x, y = make_batch(5, device=device)

    def mb(seed):
        return make_batch(seed, device=device)

    return {
        "missing labels": (lambda: ({"x": x}, mb(4)), {}, ValueError, "labels"),
        "empty batch": (lambda: ((x[:0], y[:0]), mb(4)), {}, ValueError, "empty"),
        "empty quiz batch": (lambda: (mb(3), (x[:0], y[:0])), {}, ValueError, "empty"),
        "temperature 0": (lambda: (mb(3), mb(4)), {"temperature": 0.0}, ValueError, "temperature"),
        "temperature < 0": (lambda: (mb(3), mb(4)), {"temperature": -1.0}, ValueError, "temperature"),
        "nan input": (lambda: ((torch.full_like(x, float("nan")), y), mb(4)), {}, FloatingPointError, "finite"),
        "batch on another device": (lambda: ((x.to("meta"), y.to("meta")), mb(4)), {}, ValueError,
                                    f"on meta but the models are on {device.type}"),
        "labels out of range": (lambda: ((x, y + 7), mb(4)), {}, ValueError, "outside"),
        "kd_weight > 1": (lambda: (mb(3), mb(4)), {"kd_weight": 1.5}, ValueError, "kd_weight"),
        "unknown option": (lambda: (mb(3), mb(4)), {"no_such_option": 1}, TypeError, "unknown option"),
        "bad kd_loss": (lambda: (mb(3), mb(4)), {"kd_loss": "js"}, ValueError, "kd_loss"),
        "inner_lr <= 0": (lambda: (mb(3), mb(4)), {"inner_lr": 0.0}, ValueError, "inner_lr"),
    }


BAD = _bad_inputs()


# kd and reptile do not read the quiz batch (it may be None for them): no quiz-batch cases there
BAD_CASES = [
    (algorithm, hypergrad, case)
    for algorithm, hypergrad in CASES
    if hypergrad != "autograd" and (algorithm, hypergrad) != ("metadistil", "finite_diff")
    for case in sorted(BAD)
    if not (algorithm in ("kd", "reptile") and "quiz" in case)
]


@pytest.mark.parametrize("algorithm,hypergrad,case", BAD_CASES)
def test_bad_input_raises_and_leaves_everything_untouched(algorithm, hypergrad, case, device):
    make, kwargs, error, match = _bad_inputs(device)[case]
    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad, device=device)
    batch, quiz = make()
    saved = snapshot(teacher, student, opt_t, opt_s)
    with pytest.raises(error, match=match):
        call(teacher, student, opt_t, opt_s, algorithm, hypergrad, batch=batch, quiz=quiz, **kwargs)
    assert_same(snapshot(teacher, student, opt_t, opt_s), saved)


@pytest.mark.parametrize("algorithm,hypergrad", [c for c in CASES if c[0] in ("kd", "reptile")])
@pytest.mark.parametrize("option", [{"pilot": "sgd"}, {"adam_jacobian": "frozen_second_moment"}], ids=str)
def test_engine_pilot_options_refused_where_there_is_no_engine_pilot(algorithm, hypergrad, option):
    """kd and reptile take no engine pilot step: pilot= / adam_jacobian= would be silently ignored."""
    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad)
    saved = snapshot(teacher, student, opt_t, opt_s)
    with pytest.raises(ValueError, match=f"{next(iter(option))}=.*algorithm='{algorithm}' has none"):
        call(teacher, student, opt_t, opt_s, algorithm, hypergrad, **option)
    assert_same(snapshot(teacher, student, opt_t, opt_s), saved)
    # the defaults, given explicitly, are accepted
    call(teacher, student, opt_t, opt_s, algorithm, hypergrad, pilot="optimizer", adam_jacobian="exact")


# engine options that apply to some hypergrads of the engine's algorithms only: (name, value, hypergrads, message)
ENGINE_OPTIONS = [
    ("student_tangent", "double_vjp", ("exact",), "student_tangent='double_vjp' applies to hypergrad='exact'"),
    ("teacher_graph", "recompute", ("exact", "finite_diff"),
     "teacher_graph='recompute' applies to hypergrad 'exact' and 'finite_diff'"),
]


@pytest.mark.parametrize("name,value,algorithm,hypergrad,message", [
    (name, value, alg, hg, message) for name, value, allowed, message in ENGINE_OPTIONS for alg, hg in CASES
    if not (alg in ("metadistil", "lgtm", "ikd") and hg in allowed)])
def test_engine_options_refused_where_they_do_not_apply(name, value, algorithm, hypergrad, message):
    """student_tangent= / teacher_graph= choose how the engine's exact (and finite-difference) step runs;
    elsewhere they are an error, and nothing changes."""
    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad)
    saved = snapshot(teacher, student, opt_t, opt_s)
    with pytest.raises(ValueError, match=message):
        call(teacher, student, opt_t, opt_s, algorithm, hypergrad, **{name: value})
    assert_same(snapshot(teacher, student, opt_t, opt_s), saved)


@pytest.mark.parametrize("algorithm", ["metadistil", "lgtm", "ikd"])
def test_student_tangent_double_vjp_commits_the_same_step(algorithm):
    """meta_step with student_tangent='double_vjp' commits what the default (JVP) commits, to fp64 rounding."""
    results = []
    for tangent in ("jvp", "double_vjp"):
        teacher, student, opt_t, opt_s = setup(algorithm, "exact")
        torch.manual_seed(3)
        call(teacher, student, opt_t, opt_s, algorithm, "exact", student_tangent=tangent)
        results.append([p.detach().clone() for p in list(teacher.parameters()) + list(student.parameters())])
    moved = max(float((a - b).abs().max()) for a, b in zip(*results))
    assert moved <= 1e-12
    with pytest.raises(ValueError, match="student_tangent must be one of"):
        teacher, student, opt_t, opt_s = setup(algorithm, "exact")
        call(teacher, student, opt_t, opt_s, algorithm, "exact", student_tangent="forward")


@pytest.mark.parametrize("algorithm,hypergrad", [("metadistil", "exact"), ("metadistil", "finite_diff"),
                                                 ("lgtm", "exact"), ("ikd", "exact")])
def test_teacher_graph_recompute_commits_the_same_step(algorithm, hypergrad):
    """meta_step with teacher_graph='recompute' commits what the default ('keep') commits: the replayed
    teacher forward is the same computation (bitwise on CPU)."""
    results = []
    for graph in ("keep", "recompute"):
        teacher, student, opt_t, opt_s = setup(algorithm, hypergrad)
        torch.manual_seed(3)
        out = call(teacher, student, opt_t, opt_s, algorithm, hypergrad, teacher_graph=graph)
        results.append([p.detach().clone() for p in list(teacher.parameters()) + list(student.parameters())])
        assert ("meta_gradient.teacher_recompute" in out.timings) == (graph == "recompute")
    assert all(torch.equal(a, b) for a, b in zip(*results))
    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad)
    saved = snapshot(teacher, student, opt_t, opt_s)
    with pytest.raises(ValueError, match="teacher_graph must be one of"):
        call(teacher, student, opt_t, opt_s, algorithm, hypergrad, teacher_graph="offload")
    assert_same(snapshot(teacher, student, opt_t, opt_s), saved)


@pytest.mark.parametrize("algorithm,hypergrad", [c for c in CASES if c[1] != "autograd"])
def test_logits_shape_mismatch(algorithm, hypergrad, device):
    teacher, student, opt_t, opt_s = setup(algorithm, hypergrad, classes_t=4, classes_s=3, device=device)
    saved = snapshot(teacher, student, opt_t, opt_s)
    with pytest.raises(ValueError, match="do not match"):
        call(teacher, student, opt_t, opt_s, algorithm, hypergrad)
    assert_same(snapshot(teacher, student, opt_t, opt_s), saved)


def test_models_on_different_devices(device):
    teacher = Net(8, seed=1).double().to(device)
    student = Net(8, seed=2).double().to("meta")
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
    saved = snapshot(teacher, opt_t)
    with pytest.raises(ValueError, match="different devices"):
        fastmeta.meta_step(teacher, student, make_batch(1, device=device), make_batch(2, device=device), opt_t, opt_s)
    assert_same(snapshot(teacher, opt_t), saved)


def test_argument_errors():
    teacher, student = Net(8, seed=1).double(), Net(8, seed=2).double()
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
    b, q = make_batch(1), make_batch(2)
    with pytest.raises(ValueError, match="algorithm"):
        fastmeta.meta_step(teacher, student, b, q, opt_t, opt_s, algorithm="maml")
    with pytest.raises(ValueError, match="hypergrad"):
        fastmeta.meta_step(teacher, student, b, q, opt_t, opt_s, hypergrad="second_order")
    with pytest.raises(ValueError, match="first_order"):
        fastmeta.meta_step(teacher, student, b, q, opt_t, opt_s, algorithm="metadistil", hypergrad="first_order")
    with pytest.raises(ValueError, match="teacher_optimizer"):
        fastmeta.meta_step(teacher, student, b, q, None, opt_s, algorithm="metadistil")
    with pytest.raises(ValueError, match="quiz_batch"):
        fastmeta.meta_step(teacher, student, b, None, opt_t, opt_s, algorithm="metadistil")
    with pytest.raises(ValueError, match="two different optimizers"):
        fastmeta.meta_step(teacher, student, b, q, opt_s, opt_s)
    with pytest.raises(ValueError, match="influence_objective"):
        fastmeta.meta_step(teacher, student, b, q, opt_t, opt_s, algorithm="lgtm", influence_objective="max")
    with pytest.raises(ValueError, match="layer_strategy"):
        fastmeta.meta_step(teacher, student, b, None, opt_t, opt_s, algorithm="reptile", layer_strategy="middle")
    # kd needs neither a teacher optimizer nor a quiz batch
    out = fastmeta.meta_step(teacher, student, b, None, None, opt_s, algorithm="kd")
    assert out.teacher_updated is False


def test_schedulers_step_once_after_success_only(device):
    teacher, student = Net(8, seed=1).double().to(device), Net(8, seed=2).double().to(device)
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=1, gamma=0.5)
    sched_s = torch.optim.lr_scheduler.StepLR(opt_s, step_size=1, gamma=0.5)
    kw = dict(teacher_scheduler=sched_t, student_scheduler=sched_s)
    fastmeta.meta_step(teacher, student, make_batch(1, device=device), make_batch(2, device=device), opt_t, opt_s, **kw)
    assert opt_t.param_groups[0]["lr"] == 0.05 and opt_s.param_groups[0]["lr"] == 0.05
    bad = (torch.full((6, 5), float("nan"), dtype=torch.float64, device=device), make_batch(1, device=device)[1])
    with pytest.raises(FloatingPointError):
        fastmeta.meta_step(teacher, student, bad, make_batch(2, device=device), opt_t, opt_s, **kw)
    assert opt_t.param_groups[0]["lr"] == 0.05 and opt_s.param_groups[0]["lr"] == 0.05


def test_inner_lr_none_uses_student_lr(device):
    """inner_lr=None is the student optimizer's lr: same result as passing it explicitly (bitwise: the
    two runs launch the same kernels on the same data; the MLP has no atomics-based kernel on CUDA)."""
    results = []
    for inner_lr in (None, 0.1):
        teacher, student = Net(8, seed=1).double().to(device), Net(8, seed=2).double().to(device)
        opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1)
        opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
        fastmeta.meta_step(teacher, student, make_batch(1, device=device), make_batch(2, device=device), opt_t, opt_s,
                           inner_lr=inner_lr)
        results.append([p.detach().clone() for p in teacher.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_frozen_parameters_and_modes_respected(device):
    teacher, student = Net(8, seed=1).double().to(device), Net(8, seed=2).double().to(device)
    teacher.layer[0].weight.requires_grad_(False)
    student.layer[0].weight.requires_grad_(False)
    teacher.eval()
    frozen = (teacher.layer[0].weight.detach().clone(), student.layer[0].weight.detach().clone())
    opt_t = torch.optim.SGD([p for p in teacher.parameters() if p.requires_grad], lr=0.1)
    opt_s = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    for algorithm, hypergrad in CASES:
        fastmeta.meta_step(teacher, student, make_batch(1, device=device), make_batch(2, device=device), opt_t, opt_s,
                           algorithm=algorithm, hypergrad=hypergrad)
    assert torch.equal(teacher.layer[0].weight, frozen[0]) and torch.equal(student.layer[0].weight, frozen[1])
    assert teacher.layer[0].weight.grad is None and student.layer[0].weight.grad is None
    assert not teacher.training and student.training


def test_inner_steps_only_where_the_engine_pilots():
    teacher, student = Net(8, seed=1).double(), Net(8, seed=2).double()
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
    for algorithm, hypergrad in [("kd", "exact"), ("reptile", "first_order"), ("ikd", "first_order")]:
        with pytest.raises(ValueError, match="inner_steps"):
            fastmeta.meta_step(teacher, student, make_batch(1), make_batch(2), opt_t, opt_s,
                               algorithm=algorithm, hypergrad=hypergrad, inner_steps=2)
    out = fastmeta.meta_step(teacher, student, make_batch(1), make_batch(2), opt_t, opt_s,
                             algorithm="metadistil", inner_steps=2)
    assert torch.isfinite(out.quiz_loss)
