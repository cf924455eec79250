"""Test-session set-up shared by every test file.

* Without a GPU, Triton kernels run in the interpreter on CPU tensors
  (``TRITON_INTERPRET=1`` must be set before triton is imported).
* No test may reach a model hub: HF offline mode is forced.
* float64 references need deterministic, fresh seeds per test.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def shared_dir():
    """../shared beside the checkout (GLUE data, design notes); skip-free: CI has it."""
    assert os.path.isdir(SHARED_DIR), f"expected the shared folder at {SHARED_DIR}"
    return SHARED_DIR
