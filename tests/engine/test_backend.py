"""Backend choice: KFE_BACKEND, use_backend(), auto's order, and explanations when nothing fits."""
import os
import subprocess
import sys

import pytest
import torch

import engine
from engine import _ext, backend, testing
from engine.backend import BackendUnavailable, Impl, OpBackends


def test_default_env_and_context_manager(monkeypatch):
    assert backend.requested() == "auto"
    monkeypatch.setenv("KFE_BACKEND", "Reference")
    assert backend.requested() == "reference"
    with engine.use_backend("triton"):
        assert backend.requested() == "triton"
        with engine.use_backend("cpp"):
            assert backend.requested() == "cpp"
        assert backend.requested() == "triton"
    assert backend.requested() == "reference"


def test_context_manager_restores_after_error():
    with pytest.raises(KeyError), engine.use_backend("reference"):
        raise KeyError
    assert backend.requested() == "auto"


def test_bad_names_are_refused(monkeypatch):
    testing.expect_error(ValueError, lambda: engine.use_backend("fast").__enter__(), "use_backend", "fast")
    monkeypatch.setenv("KFE_BACKEND", "gpu")
    testing.expect_error(ValueError, backend.requested, "KFE_BACKEND", "gpu", "auto")


def test_auto_on_cpu_prefers_compiled_then_reference():
    x = torch.randn(1, 2, 2, 4)
    impl, skipped = backend.REGISTRY["grn"].pick(x)
    assert impl.backend == ("cpp" if _ext.loaded() else "reference")
    assert "triton" in skipped  # CPU tensors never take the interpreter under auto
    assert any("forced" in why for why in skipped["triton"])


def test_forced_triton_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 2, 2, 4)
    with engine.use_backend("triton"):
        testing.expect_error(BackendUnavailable, lambda: engine.ops.grn(x, torch.ones(4), torch.ones(4)),
                             "CUDA tensors", "TRITON_INTERPRET=1")


def test_no_backend_fits_lists_every_reason():
    table = OpBackends("toy", example=lambda d: (torch.zeros(1, device=d),))
    table.add(Impl("triton", "engine.ops.grn.triton", dtypes=(torch.float16,)))
    table.add(Impl("cpp", "engine.ops.grn.cpp", available=lambda: ["toy has no C++ kernel"]))
    err = testing.expect_error(BackendUnavailable, lambda: table.select(torch.zeros(3)), "triton", "cpp",
                               "toy has no C++ kernel")
    assert "float32 not supported" in str(err)


def test_extension_is_built():
    # CI installs with the C++ extension; the fallback without it is tested below.
    if os.environ.get("KFE_NO_EXT") == "1" or os.environ.get("KFE_DISABLE_EXT") == "1":
        pytest.fail("this test run excludes the extension; the extension tests need it")
    assert _ext.loaded(), _ext.load_error()
    assert _ext.has_op("_grn_fwd_cpp") and _ext.has_op("_grn_bwd_cpp")


def test_works_without_extension():
    code = ("import torch, engine; from engine import _ext; assert not _ext.loaded();"
            "x = torch.randn(2, 3, 3, 5, requires_grad=True);"
            "y = engine.ops.grn(x, torch.randn(5), torch.randn(5)); y.sum().backward();"
            "print(engine.backend.REGISTRY['grn'].pick(x)[0].backend)")
    env = {**os.environ, "KFE_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    doctor = subprocess.run([sys.executable, "-m", "train.cli", "doctor"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stderr
    assert "NOT built: disabled by KFE_DISABLE_EXT=1" in doctor.stdout
    assert "| grn | **auto picks** | reference on cpu |" in doctor.stdout
