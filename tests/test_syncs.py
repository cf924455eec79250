"""Host synchronisations per step: every tensor -> Python conversion that fastmeta's own code makes in one
``meta_step`` is counted (on a GPU each one waits for the device), and the count must not grow with the
number of parameters (a per-parameter ``.item()`` would be one synchronisation per parameter on a GPU)."""
import collections
import os
import traceback

import pytest
import torch

import fastmeta
from fastmeta.ops.torch_optim import step_counts

CONVERSIONS = ("__bool__", "item", "tolist", "__float__", "__int__")
PACKAGE = os.sep + "fastmeta" + os.sep


class _Conversions:
    """Counts the conversions whose caller is a file of the fastmeta package."""

    def __init__(self):
        self.counts = collections.Counter()

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
        for name, fn in self.saved.items():
            def counted(tensor, *args, _fn=fn, _name=name, **kwargs):
                caller = traceback.extract_stack(limit=2)[0]
                if PACKAGE in caller.filename:
                    self.counts[(_name, os.path.basename(caller.filename), caller.name)] += 1
                return _fn(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)

    @property
    def total(self):
        return sum(self.counts.values())


def _mlp(depth, seed):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(6, 6), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(6, 3))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _conversions_per_step(depth, algorithm, hypergrad):
    teacher, student = _mlp(3, 0), _mlp(depth, 1)
    opt_t = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for step in range(2):  # the first step creates the optimizers' state (step counts among it)
        fastmeta.meta_step(teacher, student, _batch(step), _batch(10 + step), opt_t, opt_s, algorithm=algorithm,
                           hypergrad=hypergrad)
    with _Conversions() as seen:
        fastmeta.meta_step(teacher, student, _batch(2), _batch(12), opt_t, opt_s, algorithm=algorithm,
                           hypergrad=hypergrad)
    return seen


@pytest.mark.parametrize("algorithm,hypergrad", [("metadistil", "exact"), ("lgtm", "exact"), ("ikd", "exact")])
def test_conversions_per_step_do_not_grow_with_the_parameters(algorithm, hypergrad):
    small = _conversions_per_step(1, algorithm, hypergrad)
    large = _conversions_per_step(6, algorithm, hypergrad)  # 4 -> 14 student parameter tensors
    assert small.total == large.total, (small.counts, large.counts)
    # finiteness of the logits, losses and gradients, the label checks and the step counts: about a dozen
    # (11 for MetaDistil, 14 for LGTM when written), not one per parameter
    assert 0 < large.total <= 14, large.counts


def test_step_counts_reads_every_kind_of_step():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = torch.optim.Adam(params, lr=0.1)
    params[0].grad, params[1].grad = torch.ones(3), torch.ones(3)
    opt.step()
    opt.step()
    params[1].grad = None
    params[2].grad = torch.ones(3)
    opt.step()
    opt.state[params[3]]["step"] = 5  # an int, as older optimizers and checkpoints keep it
    assert step_counts(opt, params) == [3, 2, 1, 5]
    # tensors of other dtypes and shapes (read in groups of one dtype and shape): a float64 count beyond
    # float32's exact integers, a shape-(1,) one as some checkpoints keep it
    opt.state[params[1]]["step"] = torch.tensor(2.0 ** 24 + 1, dtype=torch.float64)
    opt.state[params[3]]["step"] = torch.tensor([7.0])
    assert step_counts(opt, params) == [3, 2 ** 24 + 1, 1, 7]
    assert len(opt.state) == 4 and step_counts(opt, [torch.nn.Parameter(torch.zeros(1))]) == [0]
    assert len(opt.state) == 4  # a parameter without state is read as 0 and gets no state entry
    opt.state[params[2]]["step"] = torch.tensor([1.0, 2.0])  # not a count: refused, not read as its first entry
    with pytest.raises(ValueError, match="parameter 2 has shape"):
        step_counts(opt, params)
    assert step_counts(opt, []) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_counts_of_fused_adam_on_the_device():
    params = [torch.nn.Parameter(torch.randn(3, device="cuda")) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(4):
        opt.step()
    assert all(opt.state[p]["step"].device.type == "cuda" for p in params)
    assert step_counts(opt, params) == [4, 4, 4]
