"""examples/quickstart.py runs: real all-MiniLM-L6-v2 teacher, 2-layer student, MRPC rows, offline."""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("fastmeta_quickstart_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("algorithm", ["metadistil"])
def test_quickstart_runs_offline(shared_dir, capsys, algorithm):
    data_dir = os.path.join(shared_dir, "data", "glue", "MRPC")
    example = _load_example()
    example.main(["--data-dir", data_dir, "--steps", "2", "--batch-size", "2", "--max-length", "24",
                  "--algorithm", algorithm])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    for line in lines:
        loss = float(line.split("student loss ")[1].split()[0])
        quiz = float(line.split("quiz loss ")[1].split()[0])
        assert math.isfinite(loss) and math.isfinite(quiz) and loss > 0 and quiz > 0
