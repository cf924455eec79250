"""grad_sync: the engine's hook for data parallelism (pilot and quiz gradients averaged in place)."""
import pytest
import torch

from fastmeta import engine


class MLP(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)


def _setup():
    torch.manual_seed(0)
    teacher, student = MLP(16).double(), MLP(8).double()
    batch = {"x": torch.randn(6, 5, dtype=torch.float64), "labels": torch.randint(0, 3, (6,))}
    quiz = {"x": torch.randn(4, 5, dtype=torch.float64), "labels": torch.randint(0, 3, (4,))}
    return teacher, student, batch, quiz


@pytest.mark.parametrize("hypergrad", ["exact", "finite_diff"])
def test_grad_sync_sees_pilot_then_quiz_gradient_and_identity_changes_nothing(hypergrad):
    teacher, student, batch, quiz = _setup()
    n_params = len(list(student.parameters()))
    calls = []
    ref = engine.meta_gradient(teacher, student, batch, quiz, inner_lr=0.1, hypergrad=hypergrad)
    got = engine.meta_gradient(teacher, student, batch, quiz, inner_lr=0.1, hypergrad=hypergrad,
                               grad_sync=lambda tensors: calls.append([t.shape for t in tensors]))
    assert [len(c) for c in calls] == [n_params, n_params]
    assert calls[0] == [p.shape for p in student.parameters()]
    for name in ref.teacher_grads:
        if hypergrad == "exact":
            assert torch.equal(ref.teacher_grads[name], got.teacher_grads[name]), name
        else:  # the first call restored the student's parameters to within 2 ulp, not bitwise
            torch.testing.assert_close(got.teacher_grads[name], ref.teacher_grads[name], rtol=1e-6, atol=1e-12)


def test_grad_sync_result_is_the_meta_gradient_of_the_synced_gradients():
    """Doubling the synced pilot gradient moves θS' as a pilot step of 2η would; doubling the quiz
    gradient v doubles u = J_S v.  So −η·w·J_Tᵀ c(2v) at θS'(2η) = −2η·w·J_Tᵀ c(v) at θS'(2η): exactly the
    plain engine's meta-gradient with inner_lr = 2η."""
    teacher, student, batch, quiz = _setup()

    def double(tensors):
        for t in tensors:
            t.mul_(2.0)

    got = engine.meta_gradient(teacher, student, batch, quiz, inner_lr=0.1, grad_sync=double)
    ref = engine.meta_gradient(teacher, student, batch, quiz, inner_lr=0.2)
    for name in ref.teacher_grads:
        torch.testing.assert_close(got.teacher_grads[name], ref.teacher_grads[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kwargs", [{"hypergrad": "autograd"}, {"inner_steps": 2}, {"grad_sync_value": 3}])
def test_grad_sync_unsupported_settings_raise(kwargs):
    teacher, student, batch, quiz = _setup()
    sync = kwargs.pop("grad_sync_value", lambda tensors: None)
    with pytest.raises(NotImplementedError, match="grad_sync"):
        engine.meta_gradient(teacher, student, batch, quiz, inner_lr=0.1, grad_sync=sync, **kwargs)
