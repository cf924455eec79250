"""Autocast for ``--precision``, batches to the device, and dev-set evaluation."""
from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np
import torch

from fastmeta import data as data_mod


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
