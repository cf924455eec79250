"""DDP: 2 CPU processes (gloo) == 1 process on the concatenated batch, through fastmeta.train.train."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_train_common import make_tiny_model_dir, write_mrpc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp, out, batch_size, algorithm_args):
    from fastmeta.train import TrainConfig

    return TrainConfig(
        task="mrpc", data_dir=str(tmp / "data"), teacher=str(tmp / "teacher"), student=str(tmp / "student"),
        output_dir=str(out), batch_size=batch_size, max_steps=3, max_seq_length=24, pad_to_max_length=True,
        quiz_from="validation", teacher_warmup_steps=0, optimizer="sgd", teacher_lr=0.05, student_lr=0.1,
        warmup_ratio=0.0, temperature=2.0, progress="none", num_threads=1, save_best=False, device="cpu",
        **algorithm_args,
    )


def _worker(rank, world, port, tmp, algorithm_args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from fastmeta.train import train

    result = train(_config(tmp, tmp / "ddp", 4, algorithm_args), return_models=True)
    teacher, student = result.models
    torch.save({"teacher": teacher.state_dict(), "student": student.state_dict(),
                "ddp_grad_sync": result.ddp_grad_sync}, tmp / f"rank{rank}.pt")


CASES = {
    # both models train (student on LS, teacher on its own CE): both optimizers' gradients are averaged
    "kd_teacher_ce": {"algorithm": "kd", "algorithm_options": {"teacher_ce": True}},
    "metadistil": {"algorithm": "metadistil"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_concatenated_batch(tmp_path, case):
    from fastmeta.train import train

    write_mrpc(tmp_path / "data", n_train=48, n_dev=24)
    make_tiny_model_dir(tmp_path / "teacher", layers=2, dropout=0.0, seed=0)
    make_tiny_model_dir(tmp_path / "student", layers=1, dropout=0.0, seed=1)
    algorithm_args = CASES[case]

    mp.spawn(_worker, args=(2, _free_port(), tmp_path, algorithm_args, None), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    # the replicas never drift apart
    for model in ("teacher", "student"):
        for name, value in rank0[model].items():
            assert torch.equal(value, rank1[model][name]), f"{model} {name} differs between ranks"

    single = train(_config(tmp_path, tmp_path / "single", 8, algorithm_args), return_models=True)
    teacher, student = single.models
    # kd: the optimizers' gradients only; metadistil: also the engine's pilot and quiz gradients
    expected = "optimizer_hooks" if case == "kd_teacher_ce" else "optimizer_hooks+meta_step_grad_sync"
    assert rank0["ddp_grad_sync"] == expected
    for model_name, model in (("teacher", teacher), ("student", student)):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(rank0[model_name][name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{model_name} {name}: 2 processes vs 1 process")
    # and training did move both models
    from safetensors.torch import load_file

    start = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    assert any(not torch.equal(start[k], teacher.state_dict()[k]) for k in start if k in teacher.state_dict())
