"""Test-session set-up shared by every test file.

* Without a GPU, Triton kernels run in the interpreter on CPU tensors
  (``TRITON_INTERPRET=1`` must be set before triton is imported).
* No test may reach a model hub: HF offline mode is forced.
* float64 references need deterministic, fresh seeds per test.
"""
import importlib.util
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))


def _register_checkout_package(name: str) -> None:
    """Make the checkout's ``bench`` package importable without putting the repo
    root on sys.path (which would also expose ``kernels/`` as a top-level
    package to anyone probing for the unrelated registry project of that name)."""
    if name in sys.modules:
        return
    init = os.path.join(REPO_DIR, name, "__init__.py")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_register_checkout_package("bench")

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
