"""The command line: ``fastmeta ...`` / ``python -m fastmeta.train ...`` (every :class:`TrainConfig` field is a flag)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from fastmeta import data as data_mod
from fastmeta.data import DataError
from fastmeta.train.config import ALGORITHMS, DEFAULT_TEACHER, HYPERGRADS, KD_LOSSES, NAMED_CONFIGS, TrainConfig
from fastmeta.train.loop import train
from fastmeta.train.outputs import _json_default


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="fastmeta",
        description="Learning-to-teach distillation (MetaDistil, LGTM, ReptileDistil, IKD, KD) on a GLUE-style task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--task", help=f"GLUE task: {', '.join(data_mod.TASKS)} (or a name for local files)")
    g.add_argument("--data-dir", help="folder with GLUE-format train.tsv/dev.tsv (original formats); "
                                      "without it (and without --train-file) the task is loaded from the hub")
    g.add_argument("--train-file", help="local .csv/.tsv/.json/.jsonl training file (loaded with datasets)")
    g.add_argument("--validation-file", help="local dev file, same format as --train-file")
    g.add_argument("--text-columns", nargs="+", help="1 or 2 text column names of the local files")
    g.add_argument("--label-column", help="label column of the local files")
    g.add_argument("--num-labels", type=int, help="number of classes of the local files (inferred when not given)")
    g.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    g.add_argument("--max-eval-examples", type=int, help="use only the first N dev examples")
    g.add_argument("--quiz-split", type=float, default=d.quiz_split,
                   help="fraction of train held out (seeded) as the quiz set (MetaDistil)")
    g.add_argument("--quiz-from", choices=["validation", "train"],
                   help="take the quiz set from the dev set (LGTM) instead of a split of train")
    g.add_argument("--max-seq-length", type=int, default=d.max_seq_length)
    g.add_argument("--pad-to-max-length", action="store_true", help="pad every batch to --max-seq-length")
    g = p.add_argument_group("models")
    g.add_argument("--teacher", default=d.teacher,
                   help=f"local model dir, {DEFAULT_TEACHER} (the real small BERT), or a named random config "
                        f"({', '.join(NAMED_CONFIGS)})")
    g.add_argument("--student", default=d.student,
                   help="first-K-layers (of the teacher, see --student-init), a local model dir, or a named random config")
    g.add_argument("--student-init", default=d.student_init, choices=["finetuned-teacher", "pretrained-teacher"],
                   help="first-K-layers students: copy the layers after the teacher's warm-up (the teacher as "
                        "fine-tuned on the task) or before it (the pretrained teacher, as MetaDistil)")
    g.add_argument("--tokenizer", help="tokenizer dir for named configs (default: all-MiniLM-L6-v2's)")
    g.add_argument("--dropout", type=float, help="override both models' dropout probabilities")
    g.add_argument("--attn-implementation", default=d.attn_implementation,
                   help="HF attention implementation (eager: forward-mode JVPs need it)")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algorithm", default=d.algorithm, choices=ALGORITHMS)
    g.add_argument("--hypergrad", default=d.hypergrad, choices=HYPERGRADS)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--kd-weight", type=float, default=d.kd_weight)
    g.add_argument("--kd-loss", default=d.kd_loss, choices=KD_LOSSES)
    g.add_argument("--inner-lr", type=float, help="pilot-step learning rate (default: the student's current lr)")
    g.add_argument("--algorithm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra meta_step option (e.g. alpha=0.5, layer_strategy=skip); JSON values")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "adam", "sgd"])
    g.add_argument("--teacher-lr", type=float, default=d.teacher_lr, help="teacher meta-update lr")
    g.add_argument("--student-lr", type=float, default=d.student_lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="linear lr warm-up fraction")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--epochs", type=float, default=d.epochs, help="distillation epochs")
    g.add_argument("--max-steps", type=int, help="distillation steps (overrides --epochs)")
    g.add_argument("--teacher-warmup-epochs", type=float, default=d.teacher_warmup_epochs,
                   help="fine-tune the teacher with cross-entropy for this many epochs first (0: none)")
    g.add_argument("--teacher-warmup-steps", type=int, help="teacher warm-up steps (overrides the epochs)")
    g.add_argument("--teacher-warmup-lr", type=float, default=d.teacher_warmup_lr)
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, help="also evaluate every N steps (always at each epoch end)")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--save-teacher", action="store_true", help="also save the final teacher")
    g.add_argument("--no-save-best", dest="save_best", action="store_false", help="do not save the best student")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16"])
    g.add_argument("--jvp-precision", default=d.jvp_precision, choices=["fp32", "autocast"],
                   help="bf16/fp16: the engine's student tangent in fp32 (autocast off; default) or under autocast")
    g.add_argument("--max-skipped-steps", type=int, default=d.max_skipped_steps,
                   help="fp16: abort after this many consecutive steps skipped for overflow")
    g.add_argument("--checkpoint-every", type=int, help="write OUTPUT/checkpoint.pt every N steps (atomic)")
    g.add_argument("--resume", nargs="?", const="auto",
                   help="continue from OUTPUT/checkpoint.pt (or the given checkpoint file)")
    g.add_argument("--progress", default=d.progress, choices=["auto", "tqdm", "print", "none"])
    g.add_argument("--num-threads", type=int, help="torch CPU threads")
    return p


def _parse_options(items: Sequence[str]) -> dict:
    options = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--algorithm-option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    values["algorithm_options"] = _parse_options(values.pop("algorithm_option"))
    return TrainConfig(**values)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: ``fastmeta ...`` / ``python -m fastmeta.train ...``.  Returns the exit code."""
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"fastmeta.train: error: {error}", file=sys.stderr)
        return 2
    summary = {k: getattr(result, k) for k in ("best_metric_name", "best_metric", "best_metrics", "best_step",
                                                "time_to_best_s", "teacher_metrics", "majority_baseline",
                                                "steps", "total_time_s", "peak_memory_bytes")}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=_json_default))
    return 0
