"""``MetaDistilTrainer``: :func:`fastmeta.meta_step` inside the usual ``transformers.Trainer`` loop.

An existing HuggingFace fine-tuning script switches to learning-to-teach distillation by
replacing ``Trainer(model=student, ...)`` with::

    from fastmeta.integrations.hf import MetaDistilTrainer

    trainer = MetaDistilTrainer(
        model=student, args=training_args, train_dataset=train, eval_dataset=dev,
        data_collator=collator, compute_metrics=compute_metrics,       # as before
        teacher_model=teacher, quiz_dataset=quiz,                      # new
        algorithm="metadistil", teacher_lr=2e-5, temperature=2.0, kd_weight=0.5,
    )
    trainer.train()

How it maps onto the Trainer loop (transformers 4.40 - 5.x):

* ``training_step(model, inputs, num_items_in_batch=None)`` (the argument exists from
  transformers 4.46 on and is accepted and ignored: ``meta_step``'s losses are batch
  means) draws the next quiz batch and calls ``meta_step(teacher, student, inputs,
  quiz, teacher_optimizer, self.optimizer, ...)``: the Trainer's own optimizer IS the
  student optimizer, so its type, learning rate and schedule (``args.learning_rate``,
  ``lr_scheduler_type``, ...) are the student's as with a plain Trainer.
* ``meta_step`` applies the student update itself; the returned loss is detached and the
  student's ``.grad`` (and the teacher's: nothing reads them, and freed they do not sit through
  the next step) are set to None afterwards, so the Trainer's subsequent
  ``optimizer.step()`` is a no-op (AdamW/SGD skip parameters without a gradient) and its
  ``lr_scheduler.step()`` advances the student's schedule exactly once per step.
  Consequently ``args.max_grad_norm`` clipping does not apply to the student's update,
  and ``gradient_accumulation_steps`` must be 1 (checked).
* The teacher gets its own optimizer (``teacher_optimizer``; default AdamW with
  ``teacher_lr``) and optional scheduler (``teacher_scheduler``, stepped by ``meta_step``).
  It is moved to the Trainer's device and kept in train mode (``teacher.train()``), as
  MetaDistil updates it; pass a teacher in eval mode and ``teacher_train_mode=False`` to
  keep dropout off.
* The quiz set (``quiz_dataset``) goes through the same column removal and collator as
  the training set and is cycled in a seeded random order (``args.seed``); algorithm
  ``"kd"`` needs none.
* Distributed (``torchrun`` with the Trainer): both optimizers' gradients are averaged
  across processes with ``all_reduce`` right before they step (an optimizer step
  pre-hook), as DDP would; ``meta_step`` runs on the unwrapped models.
* Mixed precision: ``bf16=True`` runs each ``meta_step`` under ``torch.autocast(bfloat16)``
  (the student's accelerate autocast wrapper is removed so that the engine can compute
  the student tangent with autocast off, in fp32, as in ``fastmeta.train``; evaluation
  then runs in fp32).  ``fp16=True`` is refused: the Trainer's GradScaler would step an
  optimizer that ``meta_step`` has already stepped; use ``fastmeta.train --precision
  fp16`` (dynamic loss scaling through ``meta_step(loss_scale=)``) or bf16.
* ``trainer.teacher`` is the teacher; ``trainer.last_step_output`` the last
  :class:`fastmeta.StepOutput`; quiz loss and teacher updates are logged with the
  Trainer's logs (``quiz_loss``).
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Optional

import torch
from transformers import Trainer

from fastmeta.step import meta_step

__all__ = ["MetaDistilTrainer"]


def _register_grad_average(optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(world)

    optimizer.register_step_pre_hook(hook)


class MetaDistilTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is :func:`fastmeta.meta_step` (see the module docstring).

    Args (besides the Trainer's own, ``model`` being the student):
        teacher_model: the teacher ``nn.Module`` (required).
        quiz_dataset: the held-out set of the meta-objective (required unless ``algorithm="kd"``).
        teacher_optimizer: the teacher's optimizer (default ``AdamW(teacher_lr)`` over its
            trainable parameters); ``teacher_scheduler``: optional, stepped by ``meta_step``.
        teacher_lr: learning rate of the default teacher optimizer.
        algorithm, hypergrad, temperature, kd_weight, kd_loss, inner_lr: passed to ``meta_step``.
        algorithm_options: extra ``meta_step`` options (e.g. ``{"alpha": 0.5}`` for LGTM).
        teacher_train_mode: put the teacher in train mode (default True).
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: torch.nn.Module = None,
        quiz_dataset: Any = None,
        teacher_optimizer: Optional[torch.optim.Optimizer] = None,
        teacher_scheduler: Any = None,
        teacher_lr: float = 2e-5,
        algorithm: str = "metadistil",
        hypergrad: str = "exact",
        temperature: float = 1.0,
        kd_weight: float = 0.5,
        kd_loss: str = "kl",
        inner_lr: Optional[float] = None,
        algorithm_options: Optional[Dict[str, Any]] = None,
        teacher_train_mode: bool = True,
        **kwargs: Any,
    ):
        if teacher_model is None:
            raise ValueError("MetaDistilTrainer needs teacher_model= (the teacher nn.Module)")
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        if quiz_dataset is None and algorithm != "kd":
            raise ValueError(f"algorithm={algorithm!r} needs quiz_dataset= (the held-out quiz set)")
        if quiz_dataset is not None and len(quiz_dataset) == 0:
            raise ValueError("quiz_dataset is empty")
        if not (teacher_lr > 0):
            raise ValueError(f"teacher_lr must be > 0, got {teacher_lr}")
        super().__init__(*args, **kwargs)
        if getattr(self.args, "fp16", False):
            raise ValueError(
                "MetaDistilTrainer: fp16=True is not supported (the Trainer's GradScaler would step the student "
                "optimizer that meta_step has already stepped, unscaled); use bf16=True, or fastmeta.train "
                "--precision fp16, which drives meta_step(loss_scale=) with fastmeta.amp.DynamicLossScale"
            )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "MetaDistilTrainer: gradient_accumulation_steps must be 1 (meta_step takes a whole optimizer "
                f"step per batch), got {self.args.gradient_accumulation_steps}"
            )
        self.teacher = teacher_model.to(self.args.device)
        if teacher_train_mode:
            self.teacher.train()
        if teacher_optimizer is None:
            params = [p for p in self.teacher.parameters() if p.requires_grad]
            teacher_optimizer = torch.optim.AdamW(params, lr=teacher_lr) if params else None
        self.teacher_optimizer = teacher_optimizer
        self.teacher_scheduler = teacher_scheduler
        if self.teacher_optimizer is not None:
            _register_grad_average(self.teacher_optimizer)
        self.quiz_dataset = quiz_dataset
        self.meta_step_kwargs = dict(
            algorithm=algorithm, hypergrad=hypergrad, temperature=temperature, kd_weight=kd_weight,
            kd_loss=kd_loss, inner_lr=inner_lr,
        )
        self.algorithm_options = dict(algorithm_options or {})
        self.last_step_output = None
        self._quiz_iterator = None
        self._student_hook_optimizer = None
        self._quiz_losses = []

    # ------------------------------------------------------------------ quiz batches
    def get_quiz_dataloader(self) -> torch.utils.data.DataLoader:
        """The quiz set through the training set's column removal and collator, seeded random order."""
        dataset = self.quiz_dataset
        collator = self.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="quiz")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="quiz")
        except (ImportError, AttributeError):
            pass
        generator = torch.Generator().manual_seed(self.args.seed)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self._train_batch_size, shuffle=True, collate_fn=collator, generator=generator,
            drop_last=False,
        )

    def _next_quiz_batch(self):
        if self.quiz_dataset is None:
            return None
        if self._quiz_iterator is None:
            loader = self.get_quiz_dataloader()
            self._quiz_iterator = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
        return self._prepare_inputs(next(self._quiz_iterator))

    # ------------------------------------------------------------------ the step
    def training_step(self, model: torch.nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any = None,
                      *args: Any, **kwargs: Any) -> torch.Tensor:
        """One ``meta_step``; returns the detached student loss (the Trainer logs it)."""
        bf16 = bool(getattr(self.args, "bf16", False))
        if hasattr(self, "accelerator"):
            # bf16: drop accelerate's autocast-forward wrapper; meta_step runs under our own autocast below
            student = self.accelerator.unwrap_model(model, keep_fp32_wrapper=not bf16)
        else:
            student = model
        student.train()
        if self._student_hook_optimizer is not self.optimizer:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer
            _register_grad_average(inner)
            self._student_hook_optimizer = self.optimizer
        inputs = self._prepare_inputs(inputs)
        quiz = self._next_quiz_batch()
        student_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        options = dict(self.algorithm_options)
        if self.teacher_scheduler is not None:
            options.setdefault("teacher_scheduler", self.teacher_scheduler)
        device_type = next(student.parameters()).device.type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            output = meta_step(self.teacher, student, inputs, quiz, self.teacher_optimizer, student_optimizer,
                               **self.meta_step_kwargs, **options)
        # meta_step already stepped the student: the Trainer's optimizer.step() must find no gradient; the
        # teacher's gradient is read by nothing either (freed, it does not sit through the next step's peak)
        for p in student.parameters():
            p.grad = None
        if self.teacher_optimizer is not None:
            self.teacher_optimizer.zero_grad(set_to_none=True)
        self.last_step_output = output
        if output.quiz_loss is not None:
            self._quiz_losses.append(float(output.quiz_loss))
        return output.student_loss.detach().to(self.args.device)

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._quiz_losses and "loss" in logs:
            logs = dict(logs)
            logs["quiz_loss"] = round(sum(self._quiz_losses) / len(self._quiz_losses), 6)
            self._quiz_losses = []
        super().log(logs, *args, **kwargs)
