"""fastmeta._walks: each model is walked once per public call (the host cost of a step at small batch)."""
import collections

import pytest
import torch

import fastmeta
from fastmeta import _walks
from fastmeta.engine import meta_gradient

WALKS = ("named_parameters", "named_buffers", "modules", "parameters", "buffers", "named_modules")


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


class _Counted:
    """Counts the walk methods called on the given modules (the modules themselves, not their children)."""

    def __init__(self, *modules):
        self.ids = {id(m): i for i, m in enumerate(modules)}
        self.counts = collections.Counter()

    def __enter__(self):
        self.saved = {name: getattr(torch.nn.Module, name) for name in WALKS}
        for name, fn in self.saved.items():
            def counted(module, *args, _fn=fn, _name=name, **kwargs):
                if id(module) in self.ids and not args and not kwargs:
                    self.counts[(self.ids[id(module)], _name)] += 1
                return _fn(module, *args, **kwargs)
            setattr(torch.nn.Module, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.nn.Module, name, fn)


def test_a_module_is_walked_once_inside_the_block_and_every_time_outside():
    net = _net()
    with _Counted(net) as c:
        first = _walks.named_parameters(net)
        second = _walks.named_parameters(net)
    assert c.counts[(0, "named_parameters")] == 2 and first == second
    with _Counted(net) as c:
        with _walks.walked_once():
            first = _walks.named_parameters(net)
            with _walks.walked_once():  # a nested block shares the outer one's walks
                second = _walks.named_parameters(net)
            buffers = _walks.named_buffers(net)
            assert _walks.named_buffers(net) is buffers
        after = _walks.named_parameters(net)  # the block is gone: walked again
    assert c.counts[(0, "named_parameters")] == 2 and c.counts[(0, "named_buffers")] == 1
    assert first is second and after == first
    assert [n for n, _ in first] == [n for n, _ in net.named_parameters()]
    assert [n for n, _ in buffers] == [n for n, _ in net.named_buffers()]


def test_the_block_ends_on_an_exception():
    net = _net()
    with pytest.raises(RuntimeError):
        with _walks.walked_once():
            _walks.named_parameters(net)
            raise RuntimeError("boom")
    assert _walks._KEPT.get() is None


def test_requires_grad_is_read_at_each_use():
    """What is kept is which parameters a module has; freezing one inside the block is still seen."""
    net = _net()
    with _walks.walked_once():
        assert len(fastmeta.functional.trainable_parameters(net)) == 6
        net[0].weight.requires_grad_(False)
        assert "0.weight" not in fastmeta.functional.trainable_parameters(net)


def _bert_pair():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(config)
    student = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    def batch():
        return {"input_ids": torch.randint(5, 50, (3, 8), generator=g), "labels": torch.randint(0, 2, (3,), generator=g)}
    return teacher, student, batch(), batch()


@pytest.mark.parametrize("hypergrad", ["exact", "finite_diff", "autograd"])
def test_meta_step_walks_each_model_at_most_once_per_kind(hypergrad):
    teacher, student, batch, quiz = _bert_pair()
    opt_t = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-3)
    with _Counted(teacher, student) as c:
        fastmeta.meta_step(teacher, student, batch, quiz, opt_t, opt_s, algorithm="metadistil", hypergrad=hypergrad)
    ours = {key: n for key, n in c.counts.items() if key[1] in ("named_parameters", "named_buffers", "modules")}
    assert ours and max(ours.values()) == 1, ours


def test_meta_gradient_walks_each_model_at_most_once_per_kind():
    teacher, student, batch, quiz = _bert_pair()
    opt_s = torch.optim.Adam(student.parameters(), lr=1e-3)
    with _Counted(teacher, student) as c:
        meta_gradient(teacher, student, batch, quiz, inner_lr=None, student_optimizer=opt_s)
    ours = {key: n for key, n in c.counts.items() if key[1] in ("named_parameters", "named_buffers", "modules")}
    assert ours and max(ours.values()) == 1, ours


class _Tied(torch.nn.Module):
    """An embedding and an output projection sharing one weight, a buffer registered twice, and a
    parameter also registered as a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight
        scale = torch.ones(4)
        self.register_buffer("scale", scale)
        self.head.register_buffer("scale_again", scale)
        self.mix = torch.nn.Linear(4, 4, bias=False)
        self.register_buffer("mix_copy", self.mix.weight)  # a parameter tied to a buffer

    def forward(self, ids):
        h = self.mix(self.embed(ids) * self.scale * self.head.scale_again)
        return self.head(h @ self.mix_copy)


def test_tied_names_list_every_name_of_a_tied_tensor():
    tied = _Tied()
    assert [n for n, _ in tied.named_parameters()] == ["embed.weight", "mix.weight"]  # listed once each
    assert _walks.tied_names(tied) == [("embed.weight", "head.weight"), ("mix.weight", "mix_copy"),
                                       ("scale", "head.scale_again")]
    assert _walks.tied_names(_net()) == []
    with _walks.walked_once():
        first = _walks.tied_names(tied)
        assert _walks.tied_names(tied) is first  # walked once inside the block


def _by_hand(new_embed, new_mix, ids):
    """_Tied's forward written out with both uses of each tied weight replaced."""
    return ((new_embed[ids] @ new_mix.T) @ new_mix) @ new_embed.T


@pytest.mark.parametrize("keys", ["listed", "aliases", "both"])
def test_functional_logits_replaces_every_name_of_a_tied_tensor(keys):
    """The replacement given under any name of a tied tensor reaches all its names (the output projection,
    the buffer copy of a parameter too), as ``functional_call``'s own re-tying does; the module keeps its
    own tensors."""
    tied = _Tied()
    ids = torch.tensor([[1, 2, 3]])
    new_embed, new_mix = torch.randn(7, 4), torch.randn(4, 4)
    given = {"listed": {"embed.weight": new_embed, "mix.weight": new_mix},
             "aliases": {"head.weight": new_embed, "mix_copy": new_mix},
             "both": {"embed.weight": new_embed, "head.weight": new_embed, "mix.weight": new_mix}}[keys]
    got = fastmeta.functional.functional_logits(tied, given, ids)
    expected = torch.func.functional_call(tied, given, (ids,), tie_weights=True)
    assert torch.equal(got, expected) and torch.allclose(got, _by_hand(new_embed, new_mix, ids))
    assert tied.head.weight is tied.embed.weight and not torch.equal(tied.embed.weight, new_embed)
    assert tied.mix_copy is tied.mix.weight


def test_functional_logits_refuses_two_tensors_for_one_tied_weight():
    tied = _Tied()
    with pytest.raises(ValueError, match="'embed.weight' and 'head.weight' name one tied tensor"):
        fastmeta.functional.functional_logits(
            tied, {"embed.weight": torch.randn(7, 4), "head.weight": torch.randn(7, 4)}, torch.tensor([[1]]))
