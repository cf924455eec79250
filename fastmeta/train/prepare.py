"""Everything a training job is built from before its first step (every input check happens here).

Seeds first, then the data (loaded, quiz split, tokenized), the models and tokenizers
(:func:`~fastmeta.train.models.build_models`, moved to the device, broadcast from rank 0),
the samplers, optimizers and schedulers, the output folder and the run's state with its
checkpoints: this order fixes the random draws, so a run is reproducible from its seed.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fastmeta import checkpoint as ckpt
from fastmeta import data as data_mod
from fastmeta.amp import DynamicLossScale
from fastmeta.data import DataError
from fastmeta.train.checkpointing import _Checkpoints, _RunState
from fastmeta.train.config import TrainConfig
from fastmeta.train.distributed import _Distributed
from fastmeta.train.models import _linear_schedule, _make_optimizer, build_models
from fastmeta.train.progress import _log


class _PreparedRun:
    """A training job before its first step: data, models, optimizers, schedulers, samplers, state.

    The constructor does every input check and builds everything, in the order that fixes
    the random draws (seeds, data, models); :class:`fastmeta.train.loop._Run` runs it.
    """

    def __init__(self, cfg: TrainConfig, dist: _Distributed, t_start: float, callback):
        from fastmeta.step import meta_step

        self.meta_step = meta_step
        self.cfg, self.dist, self.t_start, self.callback = cfg, dist, t_start, callback
        self.device = dist.device
        self.main_proc = dist.is_main
        self.verbose = self.main_proc and cfg.progress != "none"
        self._set_up_process()
        self._load_data_and_models()
        self._make_samplers_and_optimizers()
        self.output_dir = Path(cfg.output_dir)
        if self.main_proc:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.state = _RunState(phase="teacher_warmup" if self.warmup_total > 0 else "distill")
        self.checkpoints = _Checkpoints(cfg, dist, self.output_dir / ckpt.CHECKPOINT_NAME, self._checkpointed(),
                                        self.loss_scale, self.state)
        self.resumed_from: Optional[dict] = None
        self.ddp_grad_sync: Optional[str] = None

    def _set_up_process(self) -> None:
        """Threads, quiet transformers, the fp16 loss scale, and the seeds."""
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        try:  # transformers' own load/save progress bars only add noise here
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except (ImportError, AttributeError):
            pass
        if cfg.precision == "fp16" and self.dist.world_size > 1:
            raise ValueError("--precision fp16 runs on one process only (an overflow skip is decided per process, "
                             "and the processes would fall out of step); use --precision bf16 with torchrun")
        if cfg.precision == "fp16" and self.device.type == "cpu":
            _log(self.verbose, "[fastmeta.train] note: fp16 autocast on CPU is slow and meant for testing")
        self.loss_scale = DynamicLossScale() if cfg.precision == "fp16" else None
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    def _load_data_and_models(self) -> None:
        cfg, device = self.cfg, self.device
        self.raw = data_mod.load_task_data(
            cfg.task, data_dir=cfg.data_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
            text_columns=cfg.text_columns, label_column=cfg.label_column, num_labels=cfg.num_labels,
            max_train_examples=cfg.max_train_examples, max_eval_examples=cfg.max_eval_examples,
        )
        self.spec = spec = self.raw.spec
        if spec.is_regression:
            raise DataError(
                f"task {spec.name} is a regression task: fastmeta.meta_step's student objective uses cross-entropy "
                "on class labels, so the trainer supports classification tasks only (data and metrics of regression "
                "tasks are available in fastmeta.data)"
            )
        split = data_mod.split_quiz(self.raw, quiz_split=cfg.quiz_split, quiz_from=cfg.quiz_from, seed=cfg.seed)
        self.teacher, self.student, self.t_tok, self.s_tok = build_models(cfg, spec.num_labels)
        self.teacher.to(device)
        self.student.to(device)
        self.teacher.train()
        self.student.train()
        self.dist.broadcast_module(self.teacher)
        self.dist.broadcast_module(self.student)
        self.pad_id = self.t_tok.pad_token_id if self.t_tok.pad_token_id is not None else 0
        self.pad_to = cfg.max_seq_length if cfg.pad_to_max_length else None
        self.train_set = data_mod.tokenize_examples(split.train, self.t_tok, cfg.max_seq_length)
        self.quiz_set = data_mod.tokenize_examples(split.quiz, self.t_tok, cfg.max_seq_length)
        self.dev_set = data_mod.tokenize_examples(split.dev, self.t_tok, cfg.max_seq_length)
        self.baseline = data_mod.majority_baseline(spec, self.train_set.labels, self.dev_set.labels)

    def _make_samplers_and_optimizers(self) -> None:
        cfg, rank, world = self.cfg, self.dist.rank, self.dist.world_size
        quiz_batch = min(cfg.batch_size, len(self.quiz_set) // world or 1)
        self.train_sampler = data_mod.EpochSampler(len(self.train_set), cfg.batch_size, cfg.seed, rank=rank,
                                                   world_size=world)
        self.quiz_sampler = data_mod.EpochSampler(len(self.quiz_set), quiz_batch, cfg.seed + 1, rank=rank,
                                                  world_size=world)
        self.warm_sampler = data_mod.EpochSampler(len(self.train_set), cfg.batch_size, cfg.seed + 2, rank=rank,
                                                  world_size=world)
        per_epoch = self.train_sampler.batches_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, int(math.ceil(cfg.epochs * per_epoch)))
        if cfg.teacher_warmup_steps is not None:
            self.warmup_total = cfg.teacher_warmup_steps
        else:
            self.warmup_total = int(math.ceil(cfg.teacher_warmup_epochs * self.warm_sampler.batches_per_epoch))

        self.teacher_opt = _make_optimizer(cfg.optimizer, self.teacher.parameters(), cfg.teacher_lr, cfg.weight_decay)
        self.student_opt = _make_optimizer(cfg.optimizer, self.student.parameters(), cfg.student_lr, cfg.weight_decay)
        self.teacher_sched = _linear_schedule(self.teacher_opt, self.total_steps, cfg.warmup_ratio)
        self.student_sched = _linear_schedule(self.student_opt, self.total_steps, cfg.warmup_ratio)
        self.warm_opt = _make_optimizer(cfg.optimizer, self.teacher.parameters(), cfg.teacher_warmup_lr,
                                        cfg.weight_decay)
        self.warm_sched = _linear_schedule(self.warm_opt, max(self.warmup_total, 1), cfg.warmup_ratio)
        for opt in (self.teacher_opt, self.student_opt, self.warm_opt):
            self.dist.average_gradients_before_step(opt)

    def _checkpointed(self) -> dict:
        """Checkpoint entry -> the object whose ``state_dict`` it holds (saved and restored in this order)."""
        return {
            "teacher": self.teacher, "student": self.student,
            "teacher_optimizer": self.teacher_opt, "student_optimizer": self.student_opt,
            "teacher_scheduler": self.teacher_sched, "student_scheduler": self.student_sched,
            "warmup_optimizer": self.warm_opt, "warmup_scheduler": self.warm_sched,
            "train_sampler": self.train_sampler, "quiz_sampler": self.quiz_sampler,
            "warmup_sampler": self.warm_sampler,
        }
