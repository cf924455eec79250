"""The models, batches and comparison shared by the fidelity tests (``tests/test_fidelity_*.py``):
a float64 BERT small enough for per-step transcriptions of the papers' official code."""
from __future__ import annotations

import torch


def tiny_bert(layers, seed, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    return BertForSequenceClassification(config).double()


def bert_batch(seed, size=4, length=7, num_labels=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (size,), generator=g)}


def max_rel_diff(a, b):
    """Largest difference over the two models' floating state, relative to max(1, |b|)."""
    worst = 0.0
    for (na, x), (nb, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        if x.is_floating_point():
            worst = max(worst, float((x - y).abs().max()) / max(1.0, float(y.abs().max())))
    return worst
