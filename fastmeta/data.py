"""Task data for the training front end: GLUE tasks and local csv/tsv/jsonl files.

Sources, in order of preference:

1. ``--data-dir DIR``: a folder with GLUE's ORIGINAL TSV files (``train.tsv`` and
   ``dev.tsv``; MNLI's dev file is ``dev_matched.tsv``).  The per-task readers below
   know each file's layout (MRPC's BOM header ``Quality, #1 ID, #2 ID, #1 String,
   #2 String``; CoLA's header-less ``source label original_label sentence``; RTE/QNLI's
   string labels ...).  Lines are read with ``csv.QUOTE_NONE``: GLUE sentences contain
   unbalanced double quotes.
2. A local ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` file (``--train-file`` and
   ``--validation-file``, with ``--text-columns`` and ``--label-column``), loaded with
   ``datasets.load_dataset("csv" | "json", data_files=...)``.
3. Neither: ``datasets.load_dataset("nyu-mll/glue", task)`` from the HuggingFace hub
   (needs the network; never used by the tests).

Metrics (``compute_metrics``): accuracy; F1 of the positive class (label 1) plus
accuracy for MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman
correlation for STS-B (a regression task, ``num_labels == 1``).

Every check that can fail on user input fails here, before any training step:
unknown task or column names, labels out of range, an empty split, a quiz split that
leaves no training data (``QuizSplitError``, ``DataError`` are both ``ValueError``).
"""
from __future__ import annotations

import csv
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "TaskSpec",
    "TASKS",
    "DataError",
    "TextExample",
    "TaskData",
    "load_task_data",
    "read_glue_tsv",
    "split_quiz",
    "TokenizedDataset",
    "tokenize_examples",
    "check_tokenizers_match",
    "collate",
    "EpochSampler",
    "compute_metrics",
    "majority_baseline",
]


class DataError(ValueError):
    """Bad task data or data options (raised before any training starts)."""


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSpec:
    """What the front end needs to know about a task.

    ``text_columns``: the one or two text fields of an example, by the names the
    hub's ``nyu-mll/glue`` dataset uses.  ``label_names``: the class names in label-id
    order (``None`` for regression).  ``metric``: the name of the headline metric used
    to pick the best student (higher is better; MRPC/QQP: ``combined_score`` = the mean
    of F1 and accuracy, so that always answering "positive" (high F1) does not win).
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metric: str
    dev_file: str = "dev.tsv"
    hub_validation_split: str = "validation"

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


TASKS: dict[str, TaskSpec] = {
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "combined_score"),
    "sst2": TaskSpec("sst2", ("sentence",), ("negative", "positive"), "accuracy"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
    "cola": TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), None, "pearson"),
    "qnli": TaskSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    "qqp": TaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "combined_score"),
    "mnli": TaskSpec(
        "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
        dev_file="dev_matched.tsv", hub_validation_split="validation_matched",
    ),
}
_TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "glue-mrpc": "mrpc"}


def get_task(name: str) -> TaskSpec:
    key = _TASK_ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise DataError(
            f"task={name!r} is not a known GLUE task; choose one of {sorted(TASKS)} "
            "or give a local file with --train-file/--validation-file, --text-columns "
            "and --label-column"
        )
    return TASKS[key]


# ------------------------------------------------------------------------ examples
@dataclass
class TextExample:
    texts: tuple[str, ...]
    label: float | int


@dataclass
class TaskData:
    """Examples of one task, split into train / quiz / dev.

    ``quiz`` is the held-out set the teacher's meta-objective is measured on
    (MetaDistil: 10% of train; LGTM: the validation set itself).
    """

    spec: TaskSpec
    train: list[TextExample]
    dev: list[TextExample]
    quiz: list[TextExample] = field(default_factory=list)
    source: str = ""


# GLUE's original TSV layouts: (has_header, {canonical text column: file column},
# label column, label mapping or None for ints / floats).  Column references are
# header names, or integer positions for header-less files (CoLA).
_GLUE_TSV = {
    "mrpc": (True, {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", None),
    "sst2": (True, {"sentence": "sentence"}, "label", None),
    "rte": (True, {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", "names"),
    "cola": (False, {"sentence": 3}, 1, None),
    "stsb": (True, {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", "float"),
    "qnli": (True, {"question": "question", "sentence": "sentence"}, "label", "names"),
    "qqp": (True, {"question1": "question1", "question2": "question2"}, "is_duplicate", None),
    "mnli": (True, {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label", "names"),
}


def _parse_label(raw: str, spec: TaskSpec, mode: str | None, where: str) -> float | int:
    raw = raw.strip()
    if spec.is_regression or mode == "float":
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{where}: label {raw!r} is not a number (task {spec.name} is a regression)") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: label {raw!r} is not finite")
        return value
    if mode == "names":
        if raw not in spec.label_names:
            raise DataError(f"{where}: label {raw!r} is not one of {list(spec.label_names)}")
        return spec.label_names.index(raw)
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is not an integer class id") from None
    if not 0 <= value < spec.num_labels:
        raise DataError(f"{where}: label {value} is out of range [0, {spec.num_labels}) for task {spec.name}")
    return value


def read_glue_tsv(path: str | os.PathLike, task: str | TaskSpec) -> list[TextExample]:
    """Read one GLUE TSV file in its original format.

    Malformed lines (too few fields, as in a handful of QQP lines) are skipped with a
    warning on stderr; anything else wrong (a missing column, a bad label) raises
    ``DataError`` naming the file and line.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (task {spec.name})")
    has_header, text_cols, label_col, mode = _GLUE_TSV[spec.name]
    examples: list[TextExample] = []
    skipped = 0
    # utf-8-sig strips MRPC's byte-order mark from the first header name
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if has_header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty")
            header = [h.strip() for h in header]
            wanted = list(text_cols.values()) + [label_col]
            missing = [c for c in wanted if c not in header]
            if missing:
                raise DataError(
                    f"{path}: columns {missing} not found in the header {header} "
                    f"(expected GLUE's original {spec.name} format)"
                )
            text_idx = [header.index(text_cols[c]) for c in spec.text_columns]
            label_idx = header.index(label_col)
            first_line = 2
        else:
            text_idx = [text_cols[c] for c in spec.text_columns]
            label_idx = label_col
            first_line = 1
        needed = max(text_idx + [label_idx]) + 1
        for line_no, row in enumerate(reader, start=first_line):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < needed:
                skipped += 1
                continue
            label = _parse_label(row[label_idx], spec, mode, f"{path}:{line_no}")
            examples.append(TextExample(tuple(row[i] for i in text_idx), label))
    if skipped:
        print(f"[fastmeta.data] {path}: skipped {skipped} malformed line(s)", file=sys.stderr)
    return examples


def _local_format(path: str) -> tuple[str, dict]:
    lower = path.lower()
    if lower.endswith(".tsv"):
        return "csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    if lower.endswith(".csv"):
        return "csv", {}
    if lower.endswith(".json") or lower.endswith(".jsonl"):
        return "json", {}
    raise DataError(f"file {path!r}: unknown format; use .csv, .tsv, .json or .jsonl")


def _load_local_split(path: str, text_columns: Sequence[str], label_column: str, what: str):
    if not Path(path).is_file():
        raise DataError(f"{what}={path!r} does not exist")
    import datasets

    builder, kwargs = _local_format(path)
    try:
        ds = datasets.load_dataset(builder, data_files={"data": path}, split="data", **kwargs)
    except Exception as error:  # datasets raises many kinds; re-raise with the argument
        raise DataError(f"{what}={path!r} could not be read by datasets ({builder}): {error}") from error
    missing = [c for c in list(text_columns) + [label_column] if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{what}={path!r}: column(s) {missing} not found (--text-columns/--label-column); "
            f"the file has {ds.column_names}"
        )
    texts = [[("" if t is None else str(t)) for t in ds[c]] for c in text_columns]
    return list(zip(*texts)), list(ds[label_column])


def _local_spec_and_labels(name, train_labels, dev_labels, num_labels, metric):
    """Infer the label space of a local file: strings -> sorted names; floats -> regression."""
    every = list(train_labels) + list(dev_labels)
    if any(v is None for v in every):
        raise DataError("local data: some labels are missing (empty label cells)")
    if all(isinstance(v, str) for v in every):
        names = sorted(set(map(str, train_labels)))
        unknown = sorted(set(map(str, dev_labels)) - set(names))
        if unknown:
            raise DataError(f"local data: validation labels {unknown} never occur in the training file")
        spec = TaskSpec(name, (), tuple(names), metric or "accuracy")
        return spec, [names.index(v) for v in train_labels], [names.index(v) for v in dev_labels]
    if any(isinstance(v, str) for v in every):
        raise DataError("local data: the label column mixes strings and numbers")
    is_int = all(float(v).is_integer() for v in every)
    if num_labels == 1 or not is_int:
        spec = TaskSpec(name, (), None, metric or "pearson")
        return spec, [float(v) for v in train_labels], [float(v) for v in dev_labels]
    n = num_labels if num_labels else int(max(every)) + 1
    bad = [v for v in every if not 0 <= int(v) < n]
    if bad:
        raise DataError(f"local data: labels {sorted(set(bad))[:5]} out of range [0, {n}) (--num-labels {n})")
    spec = TaskSpec(name, (), tuple(str(i) for i in range(n)), metric or "accuracy")
    return spec, [int(v) for v in train_labels], [int(v) for v in dev_labels]


def load_task_data(
    task: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    num_labels: int | None = None,
    metric: str | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> TaskData:
    """Load train and dev examples of a task (see the module docstring for sources).

    ``max_train_examples`` / ``max_eval_examples`` keep the first N examples (files are
    read in order, so this is deterministic).
    """
    if train_file is not None:
        if validation_file is None:
            raise DataError("--train-file needs --validation-file (the dev set used for evaluation)")
        if not text_columns or not label_column:
            raise DataError("a local file needs --text-columns (1 or 2 names) and --label-column")
        if len(text_columns) not in (1, 2):
            raise DataError(f"--text-columns takes 1 or 2 column names, got {list(text_columns)}")
        train_texts, train_labels = _load_local_split(train_file, text_columns, label_column, "--train-file")
        dev_texts, dev_labels = _load_local_split(validation_file, text_columns, label_column, "--validation-file")
        name = task or Path(train_file).stem
        spec, train_labels, dev_labels = _local_spec_and_labels(name, train_labels, dev_labels, num_labels, metric)
        spec = TaskSpec(spec.name, tuple(text_columns), spec.label_names, spec.metric)
        train = [TextExample(t, y) for t, y in zip(train_texts, train_labels)]
        dev = [TextExample(t, y) for t, y in zip(dev_texts, dev_labels)]
        source = f"local files {train_file}, {validation_file}"
    else:
        if task is None:
            raise DataError("give --task (a GLUE task name) or --train-file/--validation-file")
        spec = get_task(task)
        if text_columns or label_column:
            raise DataError(
                "--text-columns/--label-column apply to local files (--train-file); "
                f"GLUE task {spec.name} has fixed columns {list(spec.text_columns)}"
            )
        if data_dir is not None:
            data_dir = Path(data_dir)
            if not data_dir.is_dir():
                raise DataError(f"--data-dir {str(data_dir)!r} is not a directory")
            train = read_glue_tsv(data_dir / "train.tsv", spec)
            dev_path = data_dir / spec.dev_file
            if not dev_path.is_file() and (data_dir / "dev.tsv").is_file():
                dev_path = data_dir / "dev.tsv"
            dev = read_glue_tsv(dev_path, spec)
            source = f"GLUE TSVs in {data_dir}"
        else:
            train, dev = _load_hub(spec)
            source = f"datasets hub nyu-mll/glue/{spec.name}"
    if max_train_examples is not None:
        train = train[:max_train_examples]
    if max_eval_examples is not None:
        dev = dev[:max_eval_examples]
    if not train:
        raise DataError(f"task {spec.name}: the training set is empty ({source})")
    if not dev:
        raise DataError(f"task {spec.name}: the validation (dev) set is empty ({source})")
    return TaskData(spec, train, dev, source=source)


def _load_hub(spec: TaskSpec) -> tuple[list[TextExample], list[TextExample]]:
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as error:
        raise DataError(
            f"could not load nyu-mll/glue/{spec.name} from the hub ({error}); "
            "pass --data-dir with GLUE-format TSVs for offline use"
        ) from error

    def convert(split):
        out = []
        for row in ds[split]:
            label = row["label"]
            if not spec.is_regression and not 0 <= int(label) < spec.num_labels:
                raise DataError(f"hub {spec.name}/{split}: label {label} out of range")
            out.append(TextExample(tuple(row[c] for c in spec.text_columns), label))
        return out

    return convert("train"), convert(spec.hub_validation_split)


def split_quiz(
    data: TaskData, *, quiz_split: float | None = 0.1, quiz_from: str | None = None, seed: int = 0
) -> TaskData:
    """Choose the quiz set the teacher's meta-objective is measured on.

    ``quiz_from="validation"`` (LGTM): the quiz set is the dev set; train is unchanged.
    Else a random, seeded split (MetaDistil): ``round(quiz_split·N)`` (at least 1)
    training examples move to the quiz set and the rest stay in train.
    """
    if quiz_from is not None:
        if quiz_from not in ("validation", "train"):
            raise DataError(f"--quiz-from must be 'validation' or 'train', got {quiz_from!r}")
        if quiz_from == "validation":
            return TaskData(data.spec, list(data.train), list(data.dev), list(data.dev), data.source)
        return TaskData(data.spec, list(data.train), list(data.dev), list(data.train), data.source)
    if quiz_split is None or not 0.0 < quiz_split < 1.0:
        raise DataError(f"--quiz-split must be in (0, 1), got {quiz_split!r}")
    n = len(data.train)
    n_quiz = max(1, int(round(quiz_split * n)))
    if n - n_quiz < 1:
        raise DataError(
            f"--quiz-split {quiz_split} of {n} training example(s) leaves no training data "
            f"({n_quiz} go to the quiz set)"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    quiz_idx = set(order[:n_quiz])
    train = [ex for i, ex in enumerate(data.train) if i not in quiz_idx]
    quiz = [ex for i, ex in enumerate(data.train) if i in quiz_idx]
    return TaskData(data.spec, train, list(data.dev), quiz, data.source)


# --------------------------------------------------------------------- tokenising
def check_tokenizers_match(teacher_tokenizer, student_tokenizer) -> None:
    """Teacher and student read the same token ids: their vocabularies must be equal."""
    if teacher_tokenizer is student_tokenizer:
        return
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        raise DataError(
            "the teacher's and the student's tokenizers differ "
            f"(vocab sizes {len(tv)} vs {len(sv)}; {only_t} tokens only in the teacher's, "
            f"{only_s} only in the student's, or different ids): distillation compares "
            "their outputs on the same token ids, so both must use one tokenizer"
        )
    for name in ("do_lower_case",):
        a, b = getattr(teacher_tokenizer, name, None), getattr(student_tokenizer, name, None)
        if a is not None and b is not None and a != b:
            raise DataError(f"the teacher's and the student's tokenizers differ in {name} ({a} vs {b})")


class TokenizedDataset:
    """Token ids of each example (unpadded) and its label; ``collate`` pads a batch."""

    def __init__(self, features: list[dict[str, list[int]]], labels: list, regression: bool):
        self.features = features
        self.labels = labels
        self.regression = regression

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.features[index])
        item["labels"] = self.labels[index]
        return item


def tokenize_examples(examples: Sequence[TextExample], tokenizer, max_seq_length: int, regression: bool = False):
    if max_seq_length < 8:
        raise DataError(f"--max-seq-length must be >= 8, got {max_seq_length}")
    columns = list(zip(*[ex.texts for ex in examples]))
    encoded = tokenizer(
        *[list(c) for c in columns], truncation=True, max_length=max_seq_length, padding=False
    )
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(examples))]
    return TokenizedDataset(features, [ex.label for ex in examples], regression)


def collate(items: Sequence[Mapping[str, Any]], pad_token_id: int = 0, pad_to: int | None = None) -> dict:
    """Pad a list of tokenized examples to one batch (``pad_to`` fixes the length)."""
    import torch

    length = max(len(it["input_ids"]) for it in items)
    if pad_to is not None:
        length = max(length, pad_to)
    batch: dict[str, Any] = {}
    for key in items[0]:
        if key == "labels":
            continue
        pad = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([list(it[key]) + [pad] * (length - len(it[key])) for it in items], dtype=torch.long)
    labels = [it["labels"] for it in items]
    if isinstance(labels[0], float):
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


class EpochSampler:
    """Deterministic, resumable batch order.

    Epoch ``e`` visits the examples in ``randperm(N)`` of a generator seeded with
    ``seed + 1_000_003·e``; the state is just ``(epoch, position)`` (plus the seed), so a
    checkpoint restores the exact data order.  With ``world_size > 1`` each global batch
    of ``batch_size·world_size`` examples is cut into equal contiguous shards and rank r
    gets shard r (the last incomplete global batch is dropped then, so shards stay equal
    and the average of per-shard batch means equals the global batch mean).
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise DataError("cannot sample batches from an empty dataset")
        if batch_size <= 0:
            raise DataError(f"--batch-size must be positive, got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.drop_last = drop_last or world_size > 1
        self.global_batch = batch_size * world_size
        if self.drop_last and n < self.global_batch:
            raise DataError(
                f"{n} example(s) is fewer than one global batch of {self.global_batch} "
                f"(--batch-size {batch_size} x {world_size} process(es))"
            )
        self.epoch = 0
        self.position = 0  # batches already taken in this epoch

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch
        return math.ceil(self.n / self.global_batch)

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        import torch

        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def next_indices(self) -> list[int]:
        """Indices of this rank's next batch; moves to the next epoch when one ends."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        order = self.permutation(self.epoch)
        start = self.position * self.global_batch + self.rank * self.batch_size
        self.position += 1
        return order[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "n", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume: the checkpoint's data order has {key}={state[key]}, "
                    f"this run has {getattr(self, key)} (same data and options are needed)"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ------------------------------------------------------------------------ metrics
def _f1_binary(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return 0.0 if denom == 0 else float(np.sum(a * b)) / denom


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's metrics on predictions (class ids, or scores for regression).

    accuracy = mean(pred == gold); f1 = 2TP/(2TP+FP+FN) for label 1; Matthews
    = (TP·TN − FP·FN)/sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); Pearson r; Spearman ρ =
    Pearson r of the tie-averaged ranks.
    """
    pred = np.asarray(predictions)
    gold = np.asarray(labels)
    if pred.shape != gold.shape or pred.size == 0:
        raise DataError(f"predictions {pred.shape} and labels {gold.shape} must be non-empty and of one shape")
    if spec.is_regression:
        pred = pred.astype(np.float64)
        gold = gold.astype(np.float64)
        pearson = _pearson(pred, gold)
        spearman = _pearson(_rank(pred), _rank(gold))
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}
    metrics = {"accuracy": float(np.mean(pred == gold))}
    if spec.name in ("mrpc", "qqp") or spec.metric in ("f1", "combined_score"):
        metrics["f1"] = _f1_binary(pred, gold)
        metrics["combined_score"] = (metrics["f1"] + metrics["accuracy"]) / 2
    if spec.name == "cola" or spec.metric == "matthews_correlation":
        metrics["matthews_correlation"] = _matthews(pred, gold)
    return metrics


def majority_baseline(spec: TaskSpec, train_labels, dev_labels) -> dict[str, float]:
    """Metrics of always predicting the most frequent training class (or the mean score)."""
    train_labels = np.asarray(train_labels)
    dev_labels = np.asarray(dev_labels)
    if spec.is_regression:
        return {"pearson": 0.0, "spearmanr": 0.0, "combined_score": 0.0}
    values, counts = np.unique(train_labels, return_counts=True)
    majority = values[np.argmax(counts)]
    return compute_metrics(spec, np.full_like(dev_labels, majority), dev_labels)
