"""fastmeta.data: GLUE readers on the real shared TSVs, local files via datasets, quiz split, metrics, bad input."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from fastmeta import data as D


def _glue(shared_dir, name):
    return os.path.join(shared_dir, "data", "glue", name)


@pytest.mark.parametrize("task,folder,n_train,n_dev,first_label", [
    ("mrpc", "MRPC", 3667, 408, 1),      # BOM header, quotes inside sentences
    ("sst2", "SST-2", 67349, 872, 0),
    ("rte", "RTE", 2490, 277, 1),         # not_entailment -> 1
    ("cola", "CoLA", 8551, 1043, 1),      # no header
    ("stsb", "STS-B", 5749, 1500, 5.0),   # regression
])
def test_real_glue_tsvs(shared_dir, task, folder, n_train, n_dev, first_label):
    data = D.load_task_data(task, data_dir=_glue(shared_dir, folder))
    assert len(data.dev) == n_dev
    assert abs(len(data.train) - n_train) <= 1
    assert data.train[0].label == first_label
    assert all(len(ex.texts) == len(data.spec.text_columns) for ex in data.train[:100])
    if task == "mrpc":
        assert data.train[0].texts[0].startswith("Amrozi accused his brother")
        assert '" the witness "' in data.train[0].texts[0]  # QUOTE_NONE keeps the quotes
        base = D.majority_baseline(data.spec, [e.label for e in data.train], [e.label for e in data.dev])
        assert base["accuracy"] == pytest.approx(0.6838, abs=1e-4) and base["f1"] == pytest.approx(0.8122, abs=1e-4)
    if task == "cola":
        assert data.train[0].texts[0].startswith("Our friends won't buy this analysis")
    if task == "stsb":
        assert data.spec.is_regression and data.spec.num_labels == 1


def test_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    m = D.compute_metrics(D.TASKS["mrpc"], pred, gold)
    tp = np.sum((pred == 1) & (gold == 1)); fp = np.sum((pred == 1) & (gold == 0))
    fn = np.sum((pred == 0) & (gold == 1)); tn = np.sum((pred == 0) & (gold == 0))
    assert m["accuracy"] == pytest.approx((tp + tn) / 200)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = D.compute_metrics(D.TASKS["cola"], pred, gold)["matthews_correlation"]
    assert mcc == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    x = rng.normal(size=50)
    y = np.round(x + rng.normal(size=50), 1)  # ties in y
    s = D.compute_metrics(D.TASKS["stsb"], x, y)
    assert s["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])

    def rank(v):
        return np.array([np.mean(np.flatnonzero(np.sort(v) == e)) + 1 for e in v])

    assert s["spearmanr"] == pytest.approx(np.corrcoef(rank(x), rank(y))[0, 1])


def test_quiz_split_is_seeded_and_disjoint(tmp_path):
    from test_train_common import write_mrpc

    data = D.load_task_data("mrpc", data_dir=write_mrpc(tmp_path / "d", n_train=50, n_dev=10))
    a = D.split_quiz(data, quiz_split=0.1, seed=3)
    b = D.split_quiz(data, quiz_split=0.1, seed=3)
    c = D.split_quiz(data, quiz_split=0.1, seed=4)
    assert len(a.quiz) == 5 and len(a.train) == 45
    assert [e.texts for e in a.quiz] == [e.texts for e in b.quiz]
    assert [e.texts for e in a.quiz] != [e.texts for e in c.quiz]
    ids = {id(e) for e in a.quiz}
    assert not any(id(e) in ids for e in a.train)
    lgtm = D.split_quiz(data, quiz_from="validation")
    assert lgtm.quiz == data.dev and len(lgtm.train) == 50


def test_local_csv_and_jsonl(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"good film, really",pos\nbad film,neg\nok,pos\n')
    (tmp_path / "dev.csv").write_text("text,label\ngreat,pos\nawful,neg\n")
    data = D.load_task_data(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.csv"),
                            text_columns=["text"], label_column="label")
    assert data.spec.label_names == ("neg", "pos")
    assert [e.label for e in data.train] == [1, 0, 1] and data.train[0].texts == ("good film, really",)
    rows = [{"a": "x y", "b": "y", "y": 2}, {"a": "z", "b": "w", "y": 0}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = D.load_task_data("mine", train_file=str(tmp_path / "t.jsonl"), validation_file=str(tmp_path / "t.jsonl"),
                            text_columns=["a", "b"], label_column="y", num_labels=3)
    assert data.spec.num_labels == 3 and data.train[0].texts == ("x y", "y")


@pytest.mark.parametrize("problem", ["unknown_task", "bad_columns", "label_out_of_range", "empty", "quiz_leaves_none",
                                     "bad_mrpc_header", "unknown_dev_label"])
def test_bad_input_is_a_clear_error(tmp_path, problem):
    from test_train_common import write_mrpc

    if problem == "unknown_task":
        with pytest.raises(D.DataError, match="not a known GLUE task"):
            D.load_task_data("mrcp", data_dir=str(tmp_path))
    elif problem == "bad_columns":
        (tmp_path / "t.csv").write_text("text,label\na,0\n")
        with pytest.raises(D.DataError, match=r"column\(s\) \['sentence'\] not found"):
            D.load_task_data(train_file=str(tmp_path / "t.csv"), validation_file=str(tmp_path / "t.csv"),
                             text_columns=["sentence"], label_column="label")
    elif problem == "label_out_of_range":
        d = write_mrpc(tmp_path / "d", n_train=6, n_dev=3)
        lines = (d / "train.tsv").read_text().splitlines()
        lines[2] = "2" + lines[2][1:]
        (d / "train.tsv").write_text("\n".join(lines) + "\n")
        with pytest.raises(D.DataError, match=r"train.tsv:3: label 2 is out of range \[0, 2\)"):
            D.load_task_data("mrpc", data_dir=d)
    elif problem == "empty":
        d = write_mrpc(tmp_path / "d", n_train=0, n_dev=3)
        with pytest.raises(D.DataError, match="training set is empty"):
            D.load_task_data("mrpc", data_dir=d)
    elif problem == "quiz_leaves_none":
        data = D.load_task_data("mrpc", data_dir=write_mrpc(tmp_path / "d", n_train=1, n_dev=3))
        with pytest.raises(D.DataError, match="leaves no training data"):
            D.split_quiz(data, quiz_split=0.1)
    elif problem == "bad_mrpc_header":
        d = tmp_path / "d"
        d.mkdir()
        (d / "train.tsv").write_text("sentence\tlabel\nhello\t1\n")
        (d / "dev.tsv").write_text("sentence\tlabel\nhello\t1\n")
        with pytest.raises(D.DataError, match="not found in the header"):
            D.load_task_data("mrpc", data_dir=d)
    elif problem == "unknown_dev_label":
        d = tmp_path / "d"
        d.mkdir()
        (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
        (d / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
        with pytest.raises(D.DataError, match="'maybe' is not one of"):
            D.load_task_data("rte", data_dir=d)


def test_sampler_resumes_and_shards():
    s = D.EpochSampler(10, 3, seed=1)
    first = [s.next_indices() for _ in range(5)]  # crosses an epoch boundary (4 batches per epoch)
    assert sorted(sum(first[:4], [])) == list(range(10))
    t = D.EpochSampler(10, 3, seed=1)
    t.next_indices(); t.next_indices()
    u = D.EpochSampler(10, 3, seed=1)
    u.load_state_dict(t.state_dict())
    assert [u.next_indices() for _ in range(3)] == first[2:5]
    # two shards of a global batch of 2x2 are the single-process batch of 4, split in order
    whole = D.EpochSampler(8, 4, seed=5, drop_last=True)
    r0 = D.EpochSampler(8, 2, seed=5, rank=0, world_size=2)
    r1 = D.EpochSampler(8, 2, seed=5, rank=1, world_size=2)
    for _ in range(3):
        assert whole.next_indices() == r0.next_indices() + r1.next_indices()


def test_tokenizer_mismatch_is_clear(tmp_path):
    from test_train_common import make_tokenizer

    a = make_tokenizer(tmp_path / "a")
    b = make_tokenizer(tmp_path / "b", words=["other", "words"])
    D.check_tokenizers_match(a, make_tokenizer(tmp_path / "c"))
    with pytest.raises(D.DataError, match="tokenizers differ"):
        D.check_tokenizers_match(a, b)
