"""A CLI run SIGKILLed mid-training resumes to parameters bit-identical to an uninterrupted run (CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_common import make_tiny_model_dir, tiny_cli_args, write_mrpc

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _assert_bit_identical(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs after resume"


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """MetaDistil (both models, both optimizers and schedulers move; dropout draws from the RNG)."""
    data = write_mrpc(tmp_path / "data", n_train=60, n_dev=12)
    teacher = make_tiny_model_dir(tmp_path / "teacher", layers=2, dropout=0.1, seed=0)
    student = make_tiny_model_dir(tmp_path / "student", layers=1, dropout=0.1, seed=1)
    extra = ["--max-steps", "24", "--checkpoint-every", "3", "--save-teacher", "--teacher-warmup-steps", "4",
             "--eval-every", "7", "--algorithm", "metadistil"]

    def args(out):
        return [sys.executable, "-m", "fastmeta.train",
                *tiny_cli_args(tmp_path, data_dir=data, teacher=teacher, student=student, out=out, extra=extra)]

    # the uninterrupted reference
    done = subprocess.run(args(tmp_path / "full"), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # the same run, SIGKILLed as soon as its first distillation checkpoint exists
    out = tmp_path / "killed"
    proc = subprocess.Popen(args(out), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "checkpoint.pt"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file():
            state = torch.load(checkpoint, weights_only=False)["state"]
            if state["phase"] == "distill" and state["step"] >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_at = state["step"]
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert killed_at is not None, f"no checkpoint appeared before the run ended: {stderr[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    assert not (out / "final_student").exists()

    resumed = subprocess.run(args(out) + ["--resume"], env=_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"]["step"] >= 3 and summary["resumed_from"]["phase"] == "distill"
    _assert_bit_identical(_weights(tmp_path / "full" / "final_student"), _weights(out / "final_student"), "student")
    _assert_bit_identical(_weights(tmp_path / "full" / "final_teacher"), _weights(out / "final_teacher"), "teacher")
    # the optimizers' states, not only the parameters, continue identically
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    again = torch.load(checkpoint, weights_only=False)
    assert full["state"]["step"] == again["state"]["step"] == 24
    for key in ("student_optimizer", "teacher_optimizer"):
        for pid, slot in full[key]["state"].items():
            for name, value in slot.items():
                if torch.is_tensor(value):
                    assert torch.equal(value, again[key]["state"][pid][name]), f"{key} {name}"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from fastmeta import checkpoint as ckpt

    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"value": torch.arange(3)})

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of serialising

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"value": torch.arange(5)})
    monkeypatch.undo()
    assert torch.equal(ckpt.load_checkpoint(path)["value"], torch.arange(3))
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_rng_state_roundtrip():
    import random

    import numpy as np

    from fastmeta import checkpoint as ckpt

    state = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_resume_missing_checkpoint_is_clear(tmp_path):
    from fastmeta import checkpoint as ckpt

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nothing.pt")
