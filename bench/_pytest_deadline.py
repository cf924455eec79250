"""pytest plugin of ``make gpu-check`` (loaded with ``-p bench._pytest_deadline``; never by default).

* ``GPU_CHECK_TESTS_DEADLINE`` (a ``time.time()`` value): tests that have not started by then
  are skipped ("gpu-check time cap"), so pytest ends on its own, with its summary and junit
  XML, instead of being killed with nothing written.
* The GPU machine has no ``../shared`` beside the checkout and no MiniLM wheel: tests that
  use the ``shared_dir`` fixture or name MiniLM are deselected.
"""
from __future__ import annotations

import os
import time

import pytest

_REASON = "gpu-check time cap reached before this test started"


def _deadline():
    value = os.environ.get("GPU_CHECK_TESTS_DEADLINE")
    return float(value) if value else None


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        needs_shared = "shared_dir" in getattr(item, "fixturenames", ())
        (drop if needs_shared or "minilm" in item.nodeid.lower() else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = _deadline()
    if deadline is not None and time.time() >= deadline:
        pytest.skip(_REASON)
