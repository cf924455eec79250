"""The foundation: package layout, lazy API, JIT extension with fallback, CUDA compile check."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fastmeta
from fastmeta import _extension

REPO = Path(__file__).resolve().parent.parent


def _run(args, env_extra=None, cwd=REPO, timeout=600):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_public_api_names():
    for name in ["kd_loss", "kd_teacher_cotangent", "kd_influence", "hvp", "mixed_hvp",
                 "meta_grad", "influence", "meta_step", "StepOutput", "backends"]:
        assert name in fastmeta.__all__
        assert callable(getattr(fastmeta, name)), name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        fastmeta.not_a_name  # noqa: B018


def test_kernels_import_as_fastmeta_kernels_never_top_level(tmp_path):
    """The installed package exposes kernels/ as fastmeta.kernels only.

    Run from a neutral directory (the repo root on sys.path would expose the
    checkout's kernels/ folder to anyone probing for the unrelated registry
    package named "kernels", as transformers does at import time).
    """
    import fastmeta.kernels

    assert Path(fastmeta.kernels.__file__).resolve().parent == REPO / "kernels"
    script = textwrap.dedent(
        """
        import sys
        import fastmeta, fastmeta.kernels, fastmeta.losses
        from transformers import BertForSequenceClassification
        print(fastmeta.kernels.__name__, "kernels" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fastmeta.kernels", "False"]


def test_extension_builds_for_cpu_and_registers_ops():
    assert _extension.load_extension(), _extension.status().error
    assert _extension.extension_available("cpu")
    assert not _extension.extension_available("meta")
    report = fastmeta.backends()
    assert report["extension"]["built"] and report["extension"]["cpu"]
    assert report["extension"]["cuda"] == torch.cuda.is_available()
    assert report["dispatch"]["multi_tensor_ops_on_cpu"] == "extension"
    assert hasattr(torch.ops.fastmeta, "dot")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extension_dot_matches_float64_reference(dtype):
    from fastmeta import ops

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=gen, dtype=dtype) for shape in [(3, 5), (1,), (1023,), (7, 1, 9)]]
    ys = [torch.randn(x.shape, generator=gen, dtype=dtype) for x in xs]
    expected = sum((x.double() * y.double()).sum() for x, y in zip(xs, ys))
    got_ext = ops.dot(xs, ys, dtype=dtype, backend="extension")
    got_torch = ops.dot(xs, ys, dtype=dtype, backend="torch")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(got_ext)
    torch.testing.assert_close(got_ext.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got_torch.double(), expected, rtol=tol, atol=tol)


def test_failed_build_warns_once_and_falls_back_to_pytorch(tmp_path):
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "broken.cpp").write_text("#include <torch/library.h>\nthis is not C++;\n")
    script = textwrap.dedent(
        """
        import warnings, torch
        from fastmeta import ops, _extension
        xs = [torch.arange(5.0), torch.ones(3)]
        ys = [torch.ones(5), torch.full((3,), 2.0)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = ops.dot(xs, ys)
            second = ops.dot(xs, ys)
        messages = [str(w.message) for w in caught if issubclass(w.category, _extension.ExtensionBuildWarning)]
        print("RESULT", float(first), float(second))
        print("NWARN", len(messages))
        print("WARN", messages[0] if messages else "")
        print("LOG", _extension.status().log_file)
        """
    )
    result = _run(
        [sys.executable, "-c", script],
        env_extra={"FASTMETA_CSRC_DIR": str(broken), "FASTMETA_EXTENSION_DIR": str(tmp_path / "cache"),
                   "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["RESULT"].split() == ["16.0", "16.0"]  # 0+1+2+3+4 + 3*2, from the PyTorch twin
    assert lines["NWARN"] == "1"
    assert "building the C++/CUDA extension failed" in lines["WARN"]
    assert "plain-PyTorch" in lines["WARN"]
    log = Path(lines["LOG"])
    assert log.is_file() and str(log) in lines["WARN"]
    assert "this is not C++" in log.read_text() or "error" in log.read_text().lower()


def test_disable_extension_env_uses_pytorch():
    script = "import fastmeta; r = fastmeta.backends(); print(r['extension']['built'], r['extension']['disabled'])"
    result = _run([sys.executable, "-c", script],
                  env_extra={"FASTMETA_DISABLE_EXTENSION": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


def test_info_command_reports_backends():
    result = _run([sys.executable, "-m", "fastmeta", "info", "--json"], env_extra={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"] == torch.__version__
    assert report["extension"]["cpu"] is True
    assert report["triton_mode"] in ("native", "interpreter", "unavailable")


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc is not installed on this machine")
def test_cuda_compile_check_catches_a_broken_cu(tmp_path):
    script = REPO / ".ci" / "compile_cuda_sources.sh"
    good = tmp_path / "good"
    good.mkdir()
    (good / "ok.cu").write_text(
        "#include <cuda_runtime.h>\n__global__ void scale(float* x, float a, int n) {\n"
        "  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= a; }\n")
    assert _run(["bash", str(script), str(good)]).returncode == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.cu").write_text("__global__ void k(float* x) { x[0] = undefined_symbol; }\n")
    result = _run(["bash", str(script), str(bad)])
    assert result.returncode != 0
    assert "FAIL" in result.stderr
    # and the project's own .cu sources compile
    result = _run(["bash", str(script), str(REPO / "csrc")])
    assert result.returncode == 0, result.stderr


def test_wheel_ships_kernels_inside_fastmeta_and_csrc(tmp_path):
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "-w", str(tmp_path), str(REPO)])
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("fastmeta-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastmeta/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    cpp = [n for n in names if n.startswith("fastmeta/csrc/") and n.endswith(".cpp")]
    cu = [n for n in names if n.startswith("fastmeta/csrc/cuda/") and n.endswith(".cu")]
    assert cpp and cu, names
