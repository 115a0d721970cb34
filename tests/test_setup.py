"""setup.py on build machines without a GPU: which kernels it builds, where it finds CUDA, and a real build.

A CUDA torch with nvcc but no GPU (a Docker or cluster build node) used to fail inside torch's arch
detection (IndexError on an empty TORCH_CUDA_ARCH_LIST), then at link time (-lcudart not found, because
torch guesses CUDA_HOME as the parent of nvcc's directory, wrong for a wrapper script in /usr/local/bin).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_module(monkeypatch):
    for key in ("KFE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(key, raising=False)
    spec = importlib.util.spec_from_file_location("kfe_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ != "__main__": defines functions, builds nothing
    return module


def _fake_toolkit(root: Path, with_cudart: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "lib64").mkdir()
    if with_cudart:
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_wrapper_nvcc_resolves_to_the_toolkit_with_cudart(setup_module, tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "local" / "bin"  # like /usr/local/bin/nvcc: `exec .../cuda-13.0/bin/nvcc "$@"`
    wrapper_dir.mkdir(parents=True)
    (wrapper_dir / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrapper_dir / "nvcc").chmod(0o755)
    (tmp_path / "local" / "lib64").mkdir()  # no libcudart next to the wrapper
    monkeypatch.setenv("PATH", f"{wrapper_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(setup_module, "_cuda_home_candidates",
                        lambda: iter([str(tmp_path / "local"), str(toolkit)]))
    assert setup_module.find_cuda_home() == str(toolkit)


def test_no_toolkit_without_cudart(setup_module, tmp_path, monkeypatch):
    broken = _fake_toolkit(tmp_path / "cuda", with_cudart=False)
    monkeypatch.setattr(setup_module, "_cuda_home_candidates", lambda: iter([str(broken)]))
    assert setup_module.find_cuda_home() is None


def _pretend(monkeypatch, setup_module, tmp_path, *, cuda_torch=True, gpu=False, toolkit=True):
    home = str(_fake_toolkit(tmp_path / "cuda")) if toolkit else None
    monkeypatch.setattr(setup_module, "find_cuda_home", lambda: home)
    monkeypatch.setattr(torch.version, "cuda", "13.0" if cuda_torch else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    return home


def test_auto_without_gpu_builds_cpu_kernels_only(setup_module, tmp_path, monkeypatch):
    _pretend(monkeypatch, setup_module, tmp_path)
    with_cuda, why = setup_module.cuda_plan()
    assert not with_cuda and "no GPU visible" in why and "KFE_CUDA=1" in why
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_forced_cuda_without_gpu_defaults_the_arch_list(setup_module, tmp_path, monkeypatch):
    home = _pretend(monkeypatch, setup_module, tmp_path)
    monkeypatch.setenv("KFE_CUDA", "1")
    with_cuda, why = setup_module.cuda_plan()
    assert with_cuda
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX" and os.environ["CUDA_HOME"] == home


def test_user_arch_list_is_kept_and_asks_for_cuda(setup_module, tmp_path, monkeypatch):
    _pretend(monkeypatch, setup_module, tmp_path)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert setup_module.cuda_plan()[0] and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_gpu_visible_builds_cuda_for_it(setup_module, tmp_path, monkeypatch):
    _pretend(monkeypatch, setup_module, tmp_path, gpu=True)
    assert setup_module.cuda_plan()[0]
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # torch reads the visible GPU's arch itself


def test_cpu_only_switch_wins_over_a_gpu(setup_module, tmp_path, monkeypatch):
    _pretend(monkeypatch, setup_module, tmp_path, gpu=True)
    monkeypatch.setenv("KFE_CUDA", "0")
    assert setup_module.cuda_plan() == (False, "KFE_CUDA=0: C++ CPU kernels only")


@pytest.mark.parametrize("cuda_torch,toolkit,needle", [(False, True, "not a CUDA build"),
                                                       (True, False, "no CUDA toolkit")])
def test_forced_cuda_that_cannot_build_says_why(setup_module, tmp_path, monkeypatch, cuda_torch, toolkit, needle):
    _pretend(monkeypatch, setup_module, tmp_path, cuda_torch=cuda_torch, toolkit=toolkit)
    monkeypatch.setenv("KFE_CUDA", "1")
    with pytest.raises(SystemExit, match=needle):
        setup_module.cuda_plan()
    monkeypatch.setenv("KFE_CUDA", "auto")  # auto falls back to the CPU kernels, saying why
    with_cuda, why = setup_module.cuda_plan()
    assert not with_cuda and needle in why


def test_bad_switch_value(setup_module, monkeypatch):
    monkeypatch.setenv("KFE_CUDA", "yes")
    with pytest.raises(SystemExit, match="KFE_CUDA must be auto, 0 or 1"):
        setup_module.cuda_plan()


@pytest.mark.slow
@pytest.mark.skipif(not torch.version.cuda or shutil.which("nvcc") is None or torch.cuda.is_available(),
                    reason="needs a CUDA torch and nvcc on a machine without a GPU")
def test_real_cuda_build_on_a_gpu_less_machine(tmp_path):
    # The build-node case for real: CUDA torch + nvcc, no GPU, KFE_CUDA=1, nothing else set.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH")}
    env.update(KFE_CUDA="1", MAX_JOBS="2")
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "tmp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiling CUDA kernels for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX" in proc.stdout
    built = list((tmp_path / "lib" / "engine").glob("_C*.so"))
    assert built, proc.stdout[-2000:]
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(built[0])], capture_output=True, text=True).stdout
    assert "kfe_hog_launch" in symbols  # the CUDA kernel's host launcher is in the library
