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


def test_stale_build_lock_is_removed_with_a_warning_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed mid-way leaves build_dir/lock, and torch's loader then waits forever on every
    later import (seen on this project's CI machine): an old lock is removed, loudly; a recent one
    (a build in progress elsewhere) is left alone."""
    import os
    import time
    import warnings

    lock = tmp_path / "lock"
    lock.write_text("")
    assert not _extension.clear_stale_build_lock(tmp_path, max_age_s=60)
    assert lock.exists()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.clear_stale_build_lock(tmp_path, max_age_s=60)
    assert not lock.exists()
    assert any("stale extension build lock" in str(w.message) for w in caught)
    monkeypatch.setenv("FASTMETA_BUILD_LOCK_TIMEOUT_S", "7200")
    lock.write_text("")
    os.utime(lock, (old, old))
    assert not _extension.clear_stale_build_lock(tmp_path) and lock.exists()
    assert not _extension.clear_stale_build_lock(tmp_path / "none")


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


# ----------------------------------------------------------------------------- CUDA toolkit detection
def _fake_toolkit(root: Path, header: bool = True, header_dir: str = "include") -> Path:
    """A toolkit-shaped directory: bin/nvcc (an ELF-looking file, never run) and the runtime header."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_bytes(b"\x7fELF fake nvcc")
    nvcc.chmod(0o755)
    if header:
        (root / header_dir).mkdir(parents=True)
        (root / header_dir / "cuda_runtime_api.h").write_text("/* fake */\n")
    return root


def _wrapper(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvcc"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


@pytest.fixture
def toolkit_env(tmp_path, monkeypatch):
    """No CUDA_HOME/CUDA_PATH, PATH = a bin dir of the test's own, no default root."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    path_dir = tmp_path / "path-bin"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", f"{path_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setattr(_extension, "_DEFAULT_ROOTS", (str(tmp_path / "no-default-cuda"),))
    return path_dir


def test_cuda_toolkit_follows_a_wrapper_script_to_the_real_nvcc(tmp_path, toolkit_env):
    real = _fake_toolkit(tmp_path / "cuda-13.0")
    _wrapper(toolkit_env, f'exec {real}/bin/nvcc "$@"\n')
    toolkit = _extension.cuda_toolkit()
    assert toolkit.root == str(real)
    assert toolkit.include_dir == str(real / "include")
    assert toolkit.nvcc == str(real / "bin" / "nvcc")
    assert toolkit.source.startswith("nvcc on PATH") and f"-> {real}/bin/nvcc" in toolkit.source
    assert str(real) in toolkit.describe()


def test_cuda_toolkit_asks_a_wrapper_without_a_literal_path_with_dryrun(tmp_path, toolkit_env):
    real = _fake_toolkit(tmp_path / "cuda")
    # computes the real location at run time: only `nvcc -dryrun` (#$ _HERE_=...) reveals it
    _wrapper(toolkit_env, f'd="{tmp_path}"\necho "#\\$ _HERE_=$d/cuda/bin" >&2\n')
    assert _extension.cuda_toolkit().root == str(real)


def test_cuda_toolkit_rejects_a_root_without_the_runtime_header(tmp_path, toolkit_env):
    headerless = _fake_toolkit(tmp_path / "usr-local", header=False)
    _wrapper(toolkit_env, f'exec {headerless}/bin/nvcc "$@"\n')
    toolkit = _extension.cuda_toolkit()
    assert not toolkit.found and toolkit.root is None
    message = toolkit.describe()
    assert message.startswith("no CUDA toolkit with include/cuda_runtime_api.h and bin/nvcc found")
    assert f"{headerless} (nvcc on PATH" in message and "no include/cuda_runtime_api.h" in message
    assert f"{tmp_path / 'no-default-cuda'} (" in message and "no such directory" in message


def test_cuda_toolkit_accepts_the_targets_include_layout(tmp_path, toolkit_env, monkeypatch):
    root = _fake_toolkit(tmp_path / "cuda", header_dir="targets/x86_64-linux/include")
    monkeypatch.setenv("CUDA_HOME", str(root))
    toolkit = _extension.cuda_toolkit()
    assert toolkit.root == str(root)
    assert toolkit.include_dir == str(root / "targets" / "x86_64-linux" / "include")


def test_cuda_toolkit_env_precedence(tmp_path, toolkit_env, monkeypatch):
    home = _fake_toolkit(tmp_path / "home")
    path = _fake_toolkit(tmp_path / "path")
    on_path = _fake_toolkit(tmp_path / "on-path")
    _wrapper(toolkit_env, f'exec {on_path}/bin/nvcc "$@"\n')
    assert _extension.cuda_toolkit().root == str(on_path)
    monkeypatch.setenv("CUDA_PATH", str(path))
    assert (_extension.cuda_toolkit().root, _extension.cuda_toolkit().source) == (str(path), "$CUDA_PATH")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert (_extension.cuda_toolkit().root, _extension.cuda_toolkit().source) == (str(home), "$CUDA_HOME")
    # an unusable CUDA_HOME is skipped, and said so
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    toolkit = _extension.cuda_toolkit()
    assert toolkit.root == str(path)
    assert toolkit.tried == (f"{tmp_path / 'missing'} ($CUDA_HOME): no such directory",)


# ----------------------------------------------------------------------------- FASTMETA_REQUIRE_CUDA_EXTENSION
@pytest.fixture
def fake_cuda_torch(tmp_path, monkeypatch):
    """A fresh extension status, torch claiming CUDA and a GPU, and a _build that records
    its calls and fails for CUDA (the CPU build 'succeeds' without compiling anything)."""
    monkeypatch.setattr(_extension, "_STATUS", _extension.ExtensionStatus())
    monkeypatch.setattr(_extension, "_REQUIRED_FAILURE", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FASTMETA_EXTENSION_DIR", str(tmp_path / "cache"))
    for var in ("FASTMETA_DISABLE_EXTENSION", "FASTMETA_REQUIRE_CUDA_EXTENSION"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def fake_build(root, with_cuda, verbose, toolkit=None):
        calls.append("cuda" if with_cuda else "cpu")
        if with_cuda:
            raise RuntimeError("Error building extension 'fastmeta_C_cuda': nvcc fatal : boom")
        return tmp_path

    monkeypatch.setattr(_extension, "_build", fake_build)
    found = _extension.CudaToolkit(root=str(tmp_path), include_dir=str(tmp_path / "include"),
                                   nvcc=str(tmp_path / "bin" / "nvcc"), source="$CUDA_HOME")
    monkeypatch.setattr(_extension, "cuda_toolkit", lambda: found)
    return calls


def test_failed_cuda_build_falls_back_to_cpu_with_a_warning(fake_cuda_torch):
    with pytest.warns(_extension.ExtensionBuildWarning, match="cuda build: RuntimeError.*boom"):
        assert _extension.load_extension()
    assert fake_cuda_torch == ["cuda", "cpu"]
    status = _extension.status()
    assert status.cpu and not status.cuda and status.cuda_toolkit


def test_require_cuda_extension_turns_a_failed_cuda_build_into_an_error(fake_cuda_torch, monkeypatch):
    monkeypatch.setenv("FASTMETA_REQUIRE_CUDA_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="FASTMETA_REQUIRE_CUDA_EXTENSION=1.*cuda build: .*boom"):
        _extension.load_extension()
    assert fake_cuda_torch == ["cuda"]  # no CPU-only fallback
    with pytest.raises(RuntimeError, match="boom"):  # and not quietly on a later call either
        _extension.extension_available("cuda")


def test_require_cuda_extension_without_a_toolkit_names_what_was_tried(fake_cuda_torch, monkeypatch):
    missing = _extension.CudaToolkit(tried=("/usr/local (nvcc on PATH (/usr/local/bin/nvcc)): "
                                            "no include/cuda_runtime_api.h",))
    monkeypatch.setattr(_extension, "cuda_toolkit", lambda: missing)
    from fastmeta.backends import cuda_toolkit_report

    assert cuda_toolkit_report() == missing.describe()
    with pytest.warns(_extension.ExtensionBuildWarning, match="no CUDA toolkit.*/usr/local .*no include/cuda_runtime_api.h"):
        assert _extension.load_extension()  # CPU-only, said loudly
    assert fake_cuda_torch == ["cpu"]
    monkeypatch.setattr(_extension, "_STATUS", _extension.ExtensionStatus())
    monkeypatch.setenv("FASTMETA_REQUIRE_CUDA_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="cuda build impossible: no CUDA toolkit.*no include/cuda_runtime_api.h"):
        _extension.load_extension()


def test_require_cuda_extension_is_moot_without_cuda_torch_or_gpu(fake_cuda_torch, monkeypatch):
    monkeypatch.setenv("FASTMETA_REQUIRE_CUDA_EXTENSION", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _extension.load_extension()
    assert fake_cuda_torch == ["cpu"]
    assert "no GPU visible" in _extension.status().cuda_note


def test_build_extension_raises_instead_of_falling_back(fake_cuda_torch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        _extension.build_extension(with_cuda=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    with pytest.raises(RuntimeError, match="cuda build: RuntimeError.*boom"):
        _extension.build_extension(with_cuda=True)
    assert fake_cuda_torch == ["cuda"]
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only"):
        _extension.build_extension(with_cuda=True)


def test_info_exits_non_zero_when_the_required_cuda_build_fails(fake_cuda_torch, monkeypatch, capsys):
    from fastmeta.__main__ import main

    monkeypatch.setenv("FASTMETA_REQUIRE_CUDA_EXTENSION", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H100")
    assert main(["info", "--json"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert "boom" in report["required_extension_error"] and "boom" in err
    assert report["extension"]["cuda"] is False
    assert report["extension"]["cuda_toolkit"].endswith("(from $CUDA_HOME)")
