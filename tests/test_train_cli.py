"""python -m fastmeta.train: a short run on tiny models, its outputs, and bad input rejected before training.

Every run names its device: CPU (``--device cpu`` / ``device="cpu"``), never the default
"auto", which would put these runs on a GPU whenever one is present (the CLI on CUDA is
exercised by ``make gpu-check``'s benchmarks and the device-parametrized engine tests).
"""
from __future__ import annotations

import json

import pytest
import torch

from fastmeta.train import TrainConfig, main, train
from test_train_common import make_tiny_model_dir, tiny_cli_args, write_mrpc


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "data": write_mrpc(root / "data", n_train=40, n_dev=12),
        "teacher": make_tiny_model_dir(root / "teacher", layers=2, seed=0, dropout=0.1),
        "student": make_tiny_model_dir(root / "student", layers=1, seed=1, dropout=0.1),
        "other": make_tiny_model_dir(root / "other", layers=1, seed=2, words=["entirely", "different", "vocab"]),
    }


def _args(tmp_path, assets, *extra, out="out", student=None):
    return tiny_cli_args(tmp_path, data_dir=assets["data"], teacher=assets["teacher"],
                         student=student or assets["student"], out=tmp_path / out, extra=extra)


def test_short_cli_run_writes_best_student_and_summary(tmp_path, assets, capsys):
    from transformers import AutoModelForSequenceClassification

    rc = main(_args(tmp_path, assets, "--algorithm", "metadistil", "--max-steps", "6", "--eval-every", "3",
                    "--teacher-warmup-steps", "3"))
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["teacher_warmup_steps"] == 3
    assert summary["best_metric_name"] == "combined_score" and printed["best_metric"] == summary["best_metric"]
    evals = [h for h in summary["history"] if h["model"] == "student"]
    assert [h["step"] for h in evals] == [3, 6]  # every 3 steps; the epoch (9 batches) never ends
    assert all(h["elapsed_s"] > 0 and set(h["metrics"]) >= {"accuracy", "f1"} for h in evals)
    assert summary["time_to_best_s"] is not None and summary["peak_memory_bytes"] > 0
    assert summary["phase_timings_s"]["total"] > 0
    metrics = json.loads((out / "best_student" / "metrics.json").read_text())
    assert metrics["combined_score"] == summary["best_metric"]
    best = AutoModelForSequenceClassification.from_pretrained(out / "best_student")
    assert best.config.num_hidden_layers == 1
    assert (out / "best_student" / "tokenizer_config.json").is_file()


def test_train_function_is_reusable(tmp_path, assets):
    seen = []
    result = train(TrainConfig(task="mrpc", data_dir=str(assets["data"]), teacher=str(assets["teacher"]),
                               student=str(assets["student"]), output_dir=str(tmp_path / "o"), batch_size=8,
                               epochs=2, teacher_warmup_steps=0, algorithm="lgtm", quiz_from="validation",
                               max_seq_length=32, progress="none", num_threads=1, save_best=False, device="cpu"),
                   callback=seen.append)
    # 36 train examples... quiz from validation keeps all 40 in train: 5 batches per epoch, eval per epoch
    student_evals = [r for r in result.history if r["model"] == "student"]
    assert [r["step"] for r in student_evals] == [5, 10]
    assert [r["epoch"] for r in student_evals] == [1.0, 2.0]
    assert seen == result.history and result.steps == 10 and result.best_student_dir is None
    assert result.examples_per_s > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_cpu_autocast_runs(tmp_path, assets, precision):
    result = train(TrainConfig(task="mrpc", data_dir=str(assets["data"]), teacher=str(assets["teacher"]),
                               student=str(assets["student"]), output_dir=str(tmp_path / "o"), batch_size=8,
                               max_steps=2, teacher_warmup_steps=1, precision=precision, max_seq_length=32,
                               progress="none", num_threads=1, save_best=False, device="cpu"),
                   return_models=True)
    teacher, student = result.models
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())
    # the loop frees the gradients meta_step leaves in .grad (nothing reads them): none sits through a step
    assert all(p.grad is None for m in (teacher, student) for p in m.parameters())
    assert result.steps == 2
    assert result.tangent_precision == "fp32 (autocast off)"  # the exact JVP left autocast, and says so
    if precision == "fp16":
        # dynamic loss scaling ran: the scale starts at 2^16 and can only have backed off by overflows
        state = result.loss_scale
        assert state is not None and state["value"] == 2.0**16 * 0.5 ** state["overflows"]
        assert result.skipped_steps == state["overflows"] <= 3
    else:
        assert result.loss_scale is None and result.skipped_steps == 0


BAD = {
    "unknown_task": (["--task", "mrpcc"], "not a known GLUE task"),
    "unknown_columns": (["--text-columns", "foo"], "apply to local files"),
    "mismatched_tokenizers": (["--student", "OTHER"], "tokenizers differ"),
    "quiz_split_range": (["--quiz-split", "1.5"], "--quiz-split"),
    "bad_lr": (["--student-lr", "-1"], "--student-lr"),
    "bad_temperature": (["--temperature", "0"], "--temperature"),
    "unknown_model": (["--student", "bert-huge"], "neither a local model directory nor a named config"),
    "empty_dev": (["--max-eval-examples", "0"], "validation (dev) set is empty"),
    "too_few_for_quiz": (["--max-train-examples", "1"], "leaves no training data"),
    "resume_missing": (["--resume", "/nonexistent/checkpoint.pt"], "no checkpoint"),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_input_fails_before_training(tmp_path, assets, capsys, problem):
    extra, message = BAD[problem]
    extra = [str(assets["other"]) if e == "OTHER" else e for e in extra]
    args = _args(tmp_path, assets, "--max-steps", "2")
    if "--task" in extra:
        i = args.index("--task")
        del args[i:i + 2]
    rc = main(args + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_labels_out_of_range_fail_before_training(tmp_path, assets, capsys):
    data = write_mrpc(tmp_path / "bad", n_train=10, n_dev=4)
    text = (data / "dev.tsv").read_text().splitlines()
    text[1] = "7" + text[1][1:]
    (data / "dev.tsv").write_text("\n".join(text) + "\n")
    args = tiny_cli_args(tmp_path, data_dir=data, teacher=assets["teacher"], student=assets["student"],
                         out=tmp_path / "out", extra=["--max-steps", "2"])
    assert main(args) == 2
    assert "label 7 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("student_init", ["finetuned-teacher", "pretrained-teacher"])
def test_first_k_layers_student_init(tmp_path, assets, student_init):
    result = train(TrainConfig(task="mrpc", data_dir=str(assets["data"]), teacher=str(assets["teacher"]),
                               student="first-1-layers", student_init=student_init, output_dir=str(tmp_path / "o"),
                               batch_size=8, max_steps=1, teacher_warmup_steps=2, teacher_warmup_lr=1e-2,
                               algorithm="kd", optimizer="sgd", student_lr=1e-12, max_seq_length=32,
                               progress="none", num_threads=1, save_best=False, dropout=0.0, device="cpu"),
                   return_models=True)
    teacher, student = result.models
    assert student.config.num_hidden_layers == 1
    t_state = teacher.state_dict()
    same = all(torch.allclose(v, t_state[k], atol=1e-9) for k, v in student.state_dict().items())
    assert same == (student_init == "finetuned-teacher")
