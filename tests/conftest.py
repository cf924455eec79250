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


def _backport_triton_interpreter_index() -> None:
    """triton < 3.8's interpreter holds every scalar as a one-element numpy array and its
    ``tensor.__index__`` is ``int(data)``, an error in numpy >= 2.4 ("only 0-dimensional
    arrays can be converted"), so every runtime ``range()`` bound of a kernel fails.
    Back-port triton 3.8's fix (``int(data.squeeze())``) onto the interpreter's patch
    of ``tl.tensor``; nothing changes with triton >= 3.8, numpy < 2.4 or without the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import numpy
    import triton
    from triton.runtime import interpreter

    version = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:2])  # noqa: E731
    if version(triton.__version__) >= (3, 8) or version(numpy.__version__) < (2, 4):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


_backport_triton_interpreter_index()

# Every device present: tests of the engine, meta_step, the algorithms, hvp, mixed precision and
# fastmeta.functional are parametrized over these (``@pytest.mark.parametrize("device", DEVICES)``
# or the ``device`` fixture), so a lent GPU runs them on CUDA too; ids are "cpu" / "cuda", so
# ``pytest -k cuda`` selects the CUDA cases (make gpu-check does).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

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


@pytest.fixture(params=DEVICES)
def device(request):
    """Each available device in turn (``torch.device``): "cpu", and "cuda" when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _ieee_fp32_on_cuda():
    """fp32 tolerances assume IEEE fp32: on CUDA, cuDNN convolutions use TF32 by default (and a
    library may switch matmuls to it), ~1e-3 relative error.  Off for every test; restored after."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def shared_dir():
    """../shared beside the checkout (GLUE data, design notes); skip-free: CI has it."""
    assert os.path.isdir(SHARED_DIR), f"expected the shared folder at {SHARED_DIR}"
    return SHARED_DIR
