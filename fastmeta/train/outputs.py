"""What a run writes: model directories swapped in atomically, peak memory, JSON of numpy values."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch


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
