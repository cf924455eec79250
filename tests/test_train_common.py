"""Shared helpers for the front-end tests (tiny offline models and GLUE-format data).

No tests here: the other ``test_train*`` / ``test_data*`` / ``test_checkpoint*`` /
``test_ddp*`` / ``test_hf_integration*`` files import these functions.
"""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the cat dog sat ran on a mat big small red blue house car tree man woman saw ate fish "
         "quickly slowly happy sad said that it was not very good bad film movie").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(directory: Path, words=WORDS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(SPECIALS + sorted(set(words)) + list(".,'\"")) + "\n")
    return path


def make_tokenizer(directory: Path, words=WORDS):
    import inspect

    from transformers import BertTokenizerFast

    vocab = write_vocab(directory, words)
    # transformers 5 takes `vocab` (a path or a dict), 4.x takes `vocab_file`
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    assert len(tokenizer) == len(vocab.read_text().split()), "the tiny tokenizer did not load its vocabulary"
    return tokenizer


def make_tiny_model_dir(directory: Path, *, layers=2, hidden=16, heads=2, num_labels=2, seed=0,
                        dropout=0.0, words=WORDS) -> Path:
    """A randomly initialised tiny BertForSequenceClassification + its tokenizer, saved to ``directory``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = make_tokenizer(directory / "_tok", words)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64,
                        num_labels=num_labels, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_mrpc(directory: Path, n_train=48, n_dev=16, seed=0) -> Path:
    """GLUE MRPC format (BOM header, quotes in sentences); label 1 when the two sentences share their first word."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            a = _sentence(rng, rng.randint(3, 9))
            b = _sentence(rng, rng.randint(3, 9))
            label = rng.randint(0, 1)
            if label:
                b = a.split()[0] + " " + b
            if i % 5 == 0:
                a = 'he said " ' + a + ' " .'
            lines.append(f"{label}\t{1000 + i}\t{2000 + i}\t{a}\t{b}")
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def write_sst2(directory: Path, n_train=40, n_dev=12, seed=0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            lines.append(f"{_sentence(rng, 5)} {'good' if label else 'bad'} \t{label}")
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def tiny_cli_args(tmp_path: Path, *, data_dir: Path, teacher: Path, student: Path, out: Path, extra=()):
    return ["--task", "mrpc", "--data-dir", str(data_dir), "--teacher", str(teacher), "--student", str(student),
            "--output-dir", str(out), "--batch-size", "4", "--max-seq-length", "32", "--teacher-warmup-steps", "0",
            "--progress", "none", "--num-threads", "1", "--device", "cpu", *extra]
