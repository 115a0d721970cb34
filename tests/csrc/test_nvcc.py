"""CUDA sources compile: every csrc/cuda/*.cu with nvcc, and the CUDA-only host glue with the C++ compiler.

Nothing CUDA runs on the CI machine, so this is where a broken kernel file is caught before a GPU session.
The .cu files must also stay free of ATen/c10/torch headers (DESIGN.md section 4): the same source is
JIT-compiled by NVRTC through CuPy where engine._C was built without CUDA.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
CUDA_GLUE = sorted(p for p in (ROOT / "csrc").glob("*.cpp") if "KFE_WITH_CUDA" in p.read_text())
NVCC = shutil.which("nvcc")
ARCH = os.environ.get("KFE_NVCC_ARCH", "sm_90")  # the H200 of the device machine


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/cuda/*.cu: nothing to check"


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_no_torch_headers_in_kernels(path):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)', path.read_text(), flags=re.M)
    banned = [h for h in includes if h.split("/")[0] in ("ATen", "c10", "torch")]
    assert not banned, f"{path.name} includes {banned}; keep kernels to raw pointers (DESIGN.md section 4)"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(path, tmp_path):
    # setup.py's nvcc flags (-std=c++20 -O3, no fast math), so the check compiles what the build compiles.
    cmd = [NVCC, f"-arch={ARCH}", "-std=c++20", "-O3", "-Werror", "all-warnings", "-c", str(path),
           "-o", str(tmp_path / (path.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("path", CUDA_GLUE, ids=lambda p: p.name)
def test_cuda_host_glue_compiles(path):
    # These files are compiled into engine._C only with a CUDA torch (KFE_WITH_CUDA); check them here
    # against the CPU torch's headers, which is all they use.
    from torch.utils import cpp_extension

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sys.base_prefix}/include"]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DKFE_WITH_CUDA", *includes, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
