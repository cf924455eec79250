"""The training job behind :func:`train`: set-up, teacher warm-up, distillation with ``meta_step``, outputs.

:func:`_train` reads top-down: a :class:`_Run` is built (:mod:`fastmeta.train.prepare`:
every input check, then data, models, optimizers), resumed from a checkpoint if asked,
then runs its two phases and writes its outputs.  The run's progress (steps, timings,
history, best student) lives in ``run.state``, which its checkpoints save
(:mod:`fastmeta.train.checkpointing`).  Mixed precision and fp16 loss scaling: see
:mod:`fastmeta.train`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Mapping, Optional

import torch

from fastmeta import data as data_mod
from fastmeta.train.config import TrainConfig, TrainResult
from fastmeta.train.distributed import _Distributed
from fastmeta.train.evaluation import _autocast, _to_device, evaluate
from fastmeta.train.models import _first_k_layers, _resolve_model_name
from fastmeta.train.outputs import _json_default, _peak_memory, _save_model_dir
from fastmeta.train.prepare import _PreparedRun
from fastmeta.train.progress import _Progress, _log


def train(config: TrainConfig | Mapping[str, Any], *, callback: Optional[Callable[[dict], None]] = None,
          return_models: bool = False) -> TrainResult:
    """Run a whole training job (see :mod:`fastmeta.train`) and return its :class:`TrainResult`.

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
    """The job, in order: set-up and checks, ``--resume``, teacher warm-up, distillation, outputs."""
    run = _Run(cfg, dist, t_start, callback)
    run.resume()
    run.log_start()
    if run.state.phase == "teacher_warmup":
        run.warm_up_teacher()
    run.distill()
    return run.finish(return_models)


class _Run(_PreparedRun):
    """One training job: built by :class:`~fastmeta.train.prepare._PreparedRun`, run by the methods below.

    ``self.state`` (:class:`~fastmeta.train.checkpointing._RunState`) is all that changes
    as it runs besides the models, optimizers, schedulers and samplers.
    """

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> None:
        """``--resume``: restore every object, the state and the RNGs from a checkpoint (none: start afresh)."""
        self.resumed_from = self.checkpoints.resume(self.verbose)

    def save_checkpoint(self) -> None:
        """Write ``OUTPUT/checkpoint.pt`` (atomically; every process takes part)."""
        self.checkpoints.save(self.elapsed())

    # ------------------------------------------------------------------ helpers of the phases
    def elapsed(self) -> float:
        """Wall seconds of the job, across resumptions."""
        return self.state.elapsed_before_s + (time.time() - self.t_start)

    def next_batch(self, dataset, sampler) -> dict:
        items = [dataset[i] for i in sampler.next_indices()]
        return _to_device(data_mod.collate(items, self.pad_id, self.pad_to), self.device)

    def evaluate_on_dev(self, model, role: str, phase: str, step: int, epoch: float) -> dict:
        """Evaluate ``model``, append the record to the history, hand it to the callback; returns it."""
        cfg = self.cfg
        metrics = evaluate(model, self.dev_set, self.spec, batch_size=cfg.eval_batch_size, device=self.device,
                           precision=cfg.precision, pad_id=self.pad_id, pad_to=self.pad_to)
        record = {"phase": phase, "model": role, "step": step, "epoch": round(epoch, 4),
                  "elapsed_s": self.elapsed(), "train_time_s": self.state.train_time_s, "timestamp": time.time(),
                  "metrics": metrics}
        self.state.history.append(record)
        if self.callback is not None and self.main_proc:
            self.callback(record)
        return record

    def consider_best(self, record: dict) -> None:
        """Keep the student of ``record`` if it beats the best so far (saved to ``OUTPUT/best_student``)."""
        state, spec = self.state, self.spec
        value = record["metrics"].get(spec.metric, record["metrics"].get("accuracy"))
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_metrics, state.best_step = value, record["metrics"], record["step"]
            state.time_to_best_s, state.train_time_to_best_s = record["elapsed_s"], record["train_time_s"]
            if self.main_proc and self.cfg.save_best:
                _save_model_dir(self.student, self.s_tok, self.output_dir / "best_student",
                                {"task": spec.name, "step": record["step"], "epoch": record["epoch"],
                                 "metric": spec.metric, **record["metrics"]})

    def log_start(self) -> None:
        cfg, teacher, student = self.cfg, self.teacher, self.student
        _log(self.verbose, f"[fastmeta.train] {self.spec.name}: {len(self.train_set)} train / {len(self.quiz_set)} "
                           f"quiz / {len(self.dev_set)} dev examples ({self.raw.source}); teacher {cfg.teacher} "
                           f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M), student {cfg.student} "
                           f"({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M); "
                           f"{cfg.algorithm}/{cfg.hypergrad} on {self.device} x{self.dist.world_size}, "
                           f"{cfg.precision}; majority baseline {self.baseline}")

    # ------------------------------------------------------------------ phase 1: teacher warm-up (CE)
    def warm_up_teacher(self) -> None:
        """Fine-tune the teacher on the task with cross-entropy; then (first-K-layers) re-initialise the student."""
        cfg, state = self.cfg, self.state
        bar = _Progress(cfg.progress, self.warmup_total, "teacher warm-up", state.warmup_step, self.main_proc)
        while state.warmup_step < self.warmup_total:
            batch = self.next_batch(self.train_set, self.warm_sampler)
            t0 = time.perf_counter()
            loss = self._teacher_warmup_step(batch)
            dt = time.perf_counter() - t0
            state.warmup_time_s += dt
            state.warmup_step += 1
            bar.update(state.warmup_step, {"loss": f"{loss.item():.4f}",
                                           "ex/s": f"{len(batch['labels']) * self.dist.world_size / dt:.1f}"})
            if cfg.checkpoint_every and state.warmup_step % cfg.checkpoint_every == 0 \
                    and state.warmup_step < self.warmup_total:
                self.save_checkpoint()
        bar.close()
        self.warm_opt.zero_grad(set_to_none=True)
        rec = self.evaluate_on_dev(self.teacher, "teacher", "teacher_warmup", state.warmup_step,
                                   state.warmup_step / self.warm_sampler.batches_per_epoch)
        state.teacher_metrics = rec["metrics"]
        _log(self.verbose, f"[fastmeta.train] teacher after warm-up: {rec['metrics']}")
        if cfg.student_init == "finetuned-teacher" and _resolve_model_name(cfg.student)[0] == "first_k":
            # the student = the first K layers of the teacher as fine-tuned on the task
            fresh = _first_k_layers(self.teacher, int(_resolve_model_name(cfg.student)[1]), cfg)
            self.student.load_state_dict(fresh.state_dict())
            del fresh
            _log(self.verbose, "[fastmeta.train] student re-initialised from the fine-tuned teacher's first layers")
        state.phase = "distill"
        if cfg.checkpoint_every:
            self.save_checkpoint()

    def _teacher_warmup_step(self, batch: dict) -> torch.Tensor:
        """One cross-entropy step of the teacher (fp16: scaled backward, the step skipped on overflow)."""
        state, loss_scale, teacher = self.state, self.loss_scale, self.teacher
        self.warm_opt.zero_grad(set_to_none=True)
        with _autocast(self.device, self.cfg.precision):
            out = teacher(**{k: v for k, v in batch.items() if k != "labels"})
        logits = (out.logits if hasattr(out, "logits") else out).float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher warm-up: non-finite loss {loss.item()} at step {state.warmup_step}")
        if loss_scale is None:
            loss.backward()
            self.warm_opt.step()
        else:  # fp16: scaled backward, unscale, skip the step on overflow
            (loss * loss_scale.value).backward()
            grads = [p.grad for p in teacher.parameters() if p.grad is not None]
            for g in grads:
                g.mul_(1.0 / loss_scale.value)
            overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
            if overflow:
                state.skipped_steps += 1
                state.consecutive_skips += 1
                if state.consecutive_skips > self.cfg.max_skipped_steps:
                    raise FloatingPointError(f"teacher warm-up: {state.consecutive_skips} consecutive fp16 "
                                             f"overflows (loss scale now {loss_scale.value:g})")
            else:
                state.consecutive_skips = 0
                self.warm_opt.step()
            loss_scale.update(found_inf=overflow)
        self.warm_sched.step()
        return loss

    # ------------------------------------------------------------------ phase 2: distillation with meta_step
    def distill(self) -> None:
        """``meta_step`` on one training and one quiz batch per step; evaluate the student, keep the best one."""
        cfg, state, world = self.cfg, self.state, self.dist.world_size
        options = self._meta_step_options()
        if state.teacher_metrics is None and self.warmup_total == 0 and state.step == 0:
            rec = self.evaluate_on_dev(self.teacher, "teacher", "distill", 0, 0.0)
            state.teacher_metrics = rec["metrics"]
        sampler = self.train_sampler
        bar = _Progress(cfg.progress, self.total_steps, f"{cfg.algorithm}", state.step, self.main_proc)
        while state.step < self.total_steps:
            batch = self.next_batch(self.train_set, sampler)
            quiz = self.next_batch(self.quiz_set, self.quiz_sampler)
            t0 = time.perf_counter()
            out = self._distill_step(batch, quiz, options)
            dt = time.perf_counter() - t0
            state.train_time_s += dt
            state.step += 1
            state.examples_seen += len(batch["labels"]) * world
            if out is not None:
                for name, value in out.timings.items():
                    state.phase_timings[name] = state.phase_timings.get(name, 0.0) + value
            info = {"loss": f"{out.student_loss.item():.4f}" if out is not None else "skipped",
                    "ex/s": f"{len(batch['labels']) * world / dt:.1f}"}
            if out is not None and out.quiz_loss is not None:
                info["quiz"] = f"{out.quiz_loss.item():.4f}"
            bar.update(state.step, info)
            epoch_done = sampler.position >= sampler.batches_per_epoch
            epoch_float = sampler.epoch + sampler.position / sampler.batches_per_epoch
            if epoch_done or (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == self.total_steps:
                record = self.evaluate_on_dev(self.student, "student", "distill", state.step, epoch_float)
                self.consider_best(record)
                bar.write(f"[fastmeta.train] step {state.step} epoch {epoch_float:.2f}: student {record['metrics']}")
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < self.total_steps:
                self.save_checkpoint()
        bar.close()

    def _meta_step_options(self) -> dict:
        """``meta_step``'s keyword options: ``--algorithm-option``s, schedulers, and (DDP) the engine's grad sync."""
        cfg = self.cfg
        options = dict(cfg.algorithm_options)
        options.setdefault("teacher_scheduler", self.teacher_sched)
        options.setdefault("student_scheduler", self.student_sched)
        options.setdefault("jvp_precision", cfg.jvp_precision)
        if self.dist.world_size > 1:
            self.ddp_grad_sync = "optimizer_hooks"
            if cfg.algorithm != "kd":
                # the engine's pilot and quiz gradients averaged too: the global batch's meta-gradient
                options["grad_sync"] = self.dist.average_tensors
                self.ddp_grad_sync = "optimizer_hooks+meta_step_grad_sync"
        return options

    def _distill_step(self, batch: dict, quiz: dict, options: dict):
        """One ``meta_step``; None when fp16 overflowed (rolled back by meta_step, skipped, the scale backed off)."""
        cfg, state, loss_scale = self.cfg, self.state, self.loss_scale
        try:
            with _autocast(self.device, cfg.precision):
                if loss_scale is not None:
                    options["loss_scale"] = loss_scale.value
                out = self.meta_step(self.teacher, self.student, batch, quiz, self.teacher_opt, self.student_opt,
                                     algorithm=cfg.algorithm, hypergrad=cfg.hypergrad, temperature=cfg.temperature,
                                     kd_weight=cfg.kd_weight, kd_loss=cfg.kd_loss, inner_lr=cfg.inner_lr, **options)
        except FloatingPointError:
            if loss_scale is None:
                raise
            # fp16 overflow: meta_step rolled both models and optimizers back; skip and back off, like GradScaler
            state.skipped_steps += 1
            state.consecutive_skips += 1
            loss_scale.update(found_inf=True)
            if state.consecutive_skips > cfg.max_skipped_steps:
                raise
            self.teacher_sched.step()
            self.student_sched.step()
            return None
        if loss_scale is not None:
            state.consecutive_skips = 0
            loss_scale.update(found_inf=False)
        # meta_step leaves the gradients it stepped with in .grad, and nothing here reads them: freed, they
        # do not sit through the whole next step (one tensor per trainable parameter of each model, alive at
        # that step's peak: the H200's per-phase peaks put it inside the meta-gradient)
        for opt in (self.teacher_opt, self.student_opt):
            opt.zero_grad(set_to_none=True)
        if out.tangent_precision is not None and state.tangent_precision is None:
            state.tangent_precision = out.tangent_precision
            _log(self.verbose, f"[fastmeta.train] student tangent (JVP) precision: {out.tangent_precision}")
        return out

    # ------------------------------------------------------------------ outputs
    def finish(self, return_models: bool) -> TrainResult:
        """Save the final student (and teacher), the last checkpoint and ``summary.json``; the result."""
        cfg, state, output_dir = self.cfg, self.state, self.output_dir
        final_metrics = state.history[-1]["metrics"] if state.history else None
        if self.main_proc:
            _save_model_dir(self.student, self.s_tok, output_dir / "final_student", final_metrics)
            if cfg.save_teacher:
                _save_model_dir(self.teacher, self.t_tok, output_dir / "final_teacher", state.teacher_metrics)
        if cfg.checkpoint_every:
            self.save_checkpoint()
        peak, peak_kind = _peak_memory(self.device)
        steps_done = state.step
        result = TrainResult(
            best_metric=state.best_metric, best_metric_name=self.spec.metric, best_metrics=state.best_metrics,
            best_step=state.best_step, time_to_best_s=state.time_to_best_s,
            train_time_to_best_s=state.train_time_to_best_s, history=state.history,
            teacher_metrics=state.teacher_metrics, majority_baseline=self.baseline, steps=steps_done,
            teacher_warmup_steps=state.warmup_step, skipped_steps=state.skipped_steps,
            total_time_s=self.elapsed(), train_time_s=state.train_time_s, teacher_warmup_time_s=state.warmup_time_s,
            step_time_mean_s=state.train_time_s / steps_done if steps_done else None,
            examples_per_s=state.examples_seen / state.train_time_s if state.train_time_s > 0 else None,
            peak_memory_bytes=peak, peak_memory_kind=peak_kind, phase_timings_s=state.phase_timings,
            output_dir=str(output_dir),
            best_student_dir=str(output_dir / "best_student") if (cfg.save_best and state.best_step is not None) else None,
            final_metrics=final_metrics, config=dataclasses.asdict(cfg), resumed_from=self.resumed_from,
            ddp_grad_sync=self.ddp_grad_sync,
            loss_scale=None if self.loss_scale is None else self.loss_scale.state_dict(),
            tangent_precision=state.tangent_precision,
        )
        if self.main_proc:
            (output_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2, default=_json_default))
            _log(self.verbose, f"[fastmeta.train] best student {self.spec.metric}={result.best_metric} at step "
                               f"{result.best_step} ({result.time_to_best_s:.1f}s); summary in "
                               f"{output_dir / 'summary.json'}")
        if return_models:
            result.models = (self.teacher, self.student)
        return result
