"""The trainer's options (:class:`TrainConfig`, checked by ``validate``) and what a run returns (:class:`TrainResult`).

Nothing here imports torch or transformers: the CLI parser (:mod:`fastmeta.train.cli`)
and the loop (:mod:`fastmeta.train.loop`) build on these two records.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_TEACHER = "all-minilm-l6-v2"
DEFAULT_STUDENT = "first-2-layers"
ALGORITHMS = ("kd", "metadistil", "lgtm", "reptile", "ikd")
HYPERGRADS = ("exact", "finite_diff", "autograd", "first_order")
KD_LOSSES = ("kl", "reverse_kl", "softmax_mse", "logit_mse")

# named configs for randomly initialised BERTs: (layers, hidden, heads, intermediate)
NAMED_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "bert-base": (12, 768, 12, 3072),
    "bert-6l": (6, 768, 12, 3072),
    "bert-4l": (4, 768, 12, 3072),
    "bert-medium": (8, 512, 8, 2048),
    "bert-small": (4, 512, 8, 2048),
    "bert-mini": (4, 256, 4, 1024),
    "bert-tiny": (2, 128, 2, 512),
    "minilm-6l": (6, 384, 12, 1536),
}



@dataclass
class TrainConfig:
    """Every option of ``python -m fastmeta.train`` (the CLI flag is the name with dashes)."""

    task: Optional[str] = None
    data_dir: Optional[str] = None
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    text_columns: Optional[list] = None
    label_column: Optional[str] = None
    num_labels: Optional[int] = None
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    teacher: str = DEFAULT_TEACHER
    student: str = DEFAULT_STUDENT
    student_init: str = "finetuned-teacher"
    tokenizer: Optional[str] = None
    dropout: Optional[float] = None
    attn_implementation: Optional[str] = "eager"
    algorithm: str = "metadistil"
    hypergrad: str = "exact"
    quiz_split: Optional[float] = 0.1
    quiz_from: Optional[str] = None
    optimizer: str = "adamw"
    teacher_lr: float = 2e-5
    student_lr: float = 1e-4
    inner_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    temperature: float = 2.0
    kd_weight: float = 0.5
    kd_loss: str = "kl"
    algorithm_options: dict = field(default_factory=dict)
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 1.0
    max_steps: Optional[int] = None
    max_seq_length: int = 128
    pad_to_max_length: bool = False
    teacher_warmup_epochs: float = 1.0
    teacher_warmup_lr: float = 1e-4
    teacher_warmup_steps: Optional[int] = None
    eval_every: Optional[int] = 25
    output_dir: str = "runs/fastmeta"
    save_teacher: bool = False
    save_best: bool = True
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"
    jvp_precision: str = "fp32"
    max_skipped_steps: int = 100
    checkpoint_every: Optional[int] = None
    resume: Optional[str] = None
    progress: str = "auto"
    num_threads: Optional[int] = None

    def validate(self) -> None:
        """Check option values (clear error naming the option, before anything is loaded)."""
        def bad(option, message):
            raise ValueError(f"--{option.replace('_', '-')}: {message}")

        if self.algorithm not in ALGORITHMS:
            bad("algorithm", f"must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.hypergrad not in HYPERGRADS:
            bad("hypergrad", f"must be one of {HYPERGRADS}, got {self.hypergrad!r}")
        if self.kd_loss not in KD_LOSSES:
            bad("kd_loss", f"must be one of {KD_LOSSES}, got {self.kd_loss!r}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            bad("optimizer", f"must be adamw, adam or sgd, got {self.optimizer!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            bad("precision", f"must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.jvp_precision not in ("fp32", "autocast"):
            bad("jvp_precision", f"must be fp32 or autocast, got {self.jvp_precision!r}")
        if self.max_skipped_steps < 0:
            bad("max_skipped_steps", f"must be >= 0, got {self.max_skipped_steps}")
        for name in ("teacher_lr", "student_lr", "teacher_warmup_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                bad(name, f"must be a finite number > 0, got {value!r}")
        if self.inner_lr is not None and not (math.isfinite(self.inner_lr) and self.inner_lr > 0):
            bad("inner_lr", f"must be > 0, got {self.inner_lr!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            bad("temperature", f"must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            bad("kd_weight", f"must be in [0, 1], got {self.kd_weight!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            bad("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            bad("epochs", f"must be > 0 (or give --max-steps), got {self.epochs}")
        if self.teacher_warmup_epochs < 0:
            bad("teacher_warmup_epochs", f"must be >= 0, got {self.teacher_warmup_epochs}")
        if self.teacher_warmup_steps is not None and self.teacher_warmup_steps < 0:
            bad("teacher_warmup_steps", f"must be >= 0, got {self.teacher_warmup_steps}")
        if self.eval_every is not None and self.eval_every < 1:
            bad("eval_every", f"must be >= 1, got {self.eval_every}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            bad("checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.quiz_from is not None and self.quiz_from not in ("validation", "train"):
            bad("quiz_from", f"must be 'validation' or 'train', got {self.quiz_from!r}")
        if self.quiz_from is None and (self.quiz_split is None or not 0.0 < self.quiz_split < 1.0):
            bad("quiz_split", f"must be in (0, 1), got {self.quiz_split!r}")
        if self.student_init not in ("finetuned-teacher", "pretrained-teacher"):
            bad("student_init", f"must be finetuned-teacher or pretrained-teacher, got {self.student_init!r}")
        if self.progress not in ("auto", "tqdm", "print", "none"):
            bad("progress", f"must be auto, tqdm, print or none, got {self.progress!r}")
        if self.max_seq_length < 8:
            bad("max_seq_length", f"must be >= 8, got {self.max_seq_length}")


@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``OUTPUT/summary.json``)."""

    best_metric: Optional[float]
    best_metric_name: str
    best_metrics: dict
    best_step: Optional[int]
    time_to_best_s: Optional[float]
    train_time_to_best_s: Optional[float]
    history: list
    teacher_metrics: Optional[dict]
    majority_baseline: dict
    steps: int
    teacher_warmup_steps: int
    skipped_steps: int
    total_time_s: float
    train_time_s: float
    teacher_warmup_time_s: float
    step_time_mean_s: Optional[float]
    examples_per_s: Optional[float]
    peak_memory_bytes: Optional[int]
    peak_memory_kind: str
    phase_timings_s: dict
    output_dir: str
    best_student_dir: Optional[str]
    final_metrics: Optional[dict]
    config: dict
    resumed_from: Optional[dict] = None
    # how gradients were averaged across processes: None (one process), "optimizer_hooks" (the
    # gradients both optimizers step with), "optimizer_hooks+meta_step_grad_sync" (also the
    # pilot/quiz gradients inside meta_step: the exact global meta-gradient)
    ddp_grad_sync: Optional[str] = None
    # --precision fp16: the dynamic loss scale's final state (value, overflows, ...); else None
    loss_scale: Optional[dict] = None
    # how the engine computed the student tangent (StepOutput.tangent_precision of the first step)
    tangent_precision: Optional[str] = None
    # (teacher, student) after training when train(..., return_models=True); not serialised
    models: Optional[tuple] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        import copy

        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "models"}

