"""fastmeta.integrations.hf.MetaDistilTrainer: meta_step inside transformers.Trainer (tiny BERTs, CPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'accelerate>=1.1')")

from test_train_common import make_tokenizer  # noqa: E402


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _tiny_bert(vocab, layers, seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config)


def _dataset(tokenizer, n, seed):
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "film", "the", "cat", "movie", "very", "not"]
    items = []
    for _ in range(n):
        idx = torch.randint(0, len(words), (5,), generator=g).tolist()
        text = " ".join(words[i] for i in idx)
        enc = tokenizer(text, truncation=True, max_length=16)
        items.append({**enc, "labels": int("good" in text)})
    return ListDataset(items)


@pytest.mark.parametrize("algorithm", ["metadistil", "kd"])
def test_trainer_runs_meta_step(tmp_path, algorithm):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from fastmeta.integrations.hf import MetaDistilTrainer

    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher = _tiny_bert(len(tokenizer), 2, 0)
    student = _tiny_bert(len(tokenizer), 1, 1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = MetaDistilTrainer(
        model=student, args=args, train_dataset=_dataset(tokenizer, 16, 0),
        data_collator=DataCollatorWithPadding(tokenizer),
        teacher_model=teacher, quiz_dataset=_dataset(tokenizer, 8, 1) if algorithm != "kd" else None,
        algorithm=algorithm, teacher_lr=1e-3, temperature=2.0, kd_weight=0.5,
    )
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    out = trainer.last_step_output
    assert out is not None and out.algorithm == algorithm
    student_moved = any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    teacher_moved = any(not torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert student_moved
    assert teacher_moved == (algorithm == "metadistil")
    # no gradient is left behind to sit through the next step (the student's: the Trainer's own step must
    # find none; the teacher's: nothing reads it)
    assert all(p.grad is None for m in (teacher, student) for p in m.parameters())
    # the Trainer's optimizer is the student optimizer: exactly one Adam step per training step
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    steps = {int(s["step"]) for s in inner.state.values()}
    assert steps == {3}
    if algorithm == "metadistil":
        assert any("quiz_loss" in entry for entry in trainer.state.log_history)


def test_trainer_bf16_runs_meta_step_under_autocast_and_refuses_fp16(tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from fastmeta.integrations.hf import MetaDistilTrainer

    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher, student = _tiny_bert(len(tokenizer), 2, 0), _tiny_bert(len(tokenizer), 1, 1)
    common = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, report_to=[],
                  save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    kwargs = dict(model=student, train_dataset=_dataset(tokenizer, 16, 0), data_collator=DataCollatorWithPadding(tokenizer),
                  teacher_model=teacher, quiz_dataset=_dataset(tokenizer, 8, 1), teacher_lr=1e-3, temperature=2.0)
    trainer = MetaDistilTrainer(args=TrainingArguments(output_dir=str(tmp_path / "bf16"), bf16=True, **common), **kwargs)
    trainer.train()
    assert trainer.state.global_step == 2
    # meta_step ran under a bf16 autocast and the engine took the student tangent out of it
    assert trainer.last_step_output.tangent_precision == "fp32 (autocast off)"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())
    # fp16 is refused with a clear error (by MetaDistilTrainer; some transformers versions already
    # refuse fp16 on CPU in TrainingArguments, also with a ValueError naming fp16)
    with pytest.raises(ValueError, match="fp16"):
        MetaDistilTrainer(args=TrainingArguments(output_dir=str(tmp_path / "fp16"), fp16=True, **common), **kwargs)


def test_trainer_matches_meta_step_loop(tmp_path):
    """Three Trainer steps == three hand-written meta_step calls on the same batches with fresh AdamWs."""
    from transformers import DataCollatorWithPadding, TrainingArguments

    import fastmeta
    from fastmeta.integrations.hf import MetaDistilTrainer

    seen = []

    class RecordingTrainer(MetaDistilTrainer):
        def _next_quiz_batch(self):
            quiz = super()._next_quiz_batch()
            seen[-1].append({k: v.clone() for k, v in quiz.items()})
            return quiz

        def training_step(self, model, inputs, *args, **kwargs):
            seen.append([{k: v.clone() for k, v in inputs.items()}])
            return super().training_step(model, inputs, *args, **kwargs)

    tokenizer = make_tokenizer(tmp_path / "tok")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    teacher, student = _tiny_bert(len(tokenizer), 2, 0), _tiny_bert(len(tokenizer), 1, 1)
    ref_teacher, ref_student = _tiny_bert(len(tokenizer), 2, 0), _tiny_bert(len(tokenizer), 1, 1)
    trainer = RecordingTrainer(model=student, args=args, train_dataset=_dataset(tokenizer, 12, 0),
                               data_collator=DataCollatorWithPadding(tokenizer), teacher_model=teacher,
                               quiz_dataset=_dataset(tokenizer, 4, 1), algorithm="metadistil", teacher_lr=1e-3,
                               temperature=2.0, kd_weight=0.5)
    trainer.train()
    assert len(seen) == 3
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    group = inner.param_groups[0]
    t_opt = torch.optim.AdamW(ref_teacher.parameters(), lr=1e-3)
    s_opt = torch.optim.AdamW(ref_student.parameters(), lr=1e-3, betas=group["betas"], eps=group["eps"],
                              weight_decay=0.0)
    for batch, quiz in seen:
        fastmeta.meta_step(ref_teacher, ref_student, batch, quiz, t_opt, s_opt, algorithm="metadistil",
                           temperature=2.0, kd_weight=0.5)
    for (name, a), b in zip(student.state_dict().items(), ref_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"student {name}")
    for (name, a), b in zip(teacher.state_dict().items(), ref_teacher.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"teacher {name}")


def test_trainer_bad_input(tmp_path):
    from transformers import TrainingArguments

    from fastmeta.integrations.hf import MetaDistilTrainer

    tokenizer = make_tokenizer(tmp_path / "tok")
    student = _tiny_bert(len(tokenizer), 1, 1)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="teacher_model"):
        MetaDistilTrainer(model=student, args=args, train_dataset=_dataset(tokenizer, 4, 0))
    with pytest.raises(ValueError, match="quiz_dataset"):
        MetaDistilTrainer(model=student, args=args, train_dataset=_dataset(tokenizer, 4, 0),
                          teacher_model=_tiny_bert(len(tokenizer), 1, 0))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                             gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        MetaDistilTrainer(model=student, args=args, train_dataset=_dataset(tokenizer, 4, 0),
                          teacher_model=_tiny_bert(len(tokenizer), 1, 0), quiz_dataset=_dataset(tokenizer, 4, 1))
