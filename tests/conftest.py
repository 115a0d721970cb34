"""Test-suite setup shared by every test.

- Without CUDA, Triton kernels run on the CPU interpreter: TRITON_INTERPRET=1 must be set before
  triton is first imported (triton.jit reads it at decoration time), so it is set here.
- Tests marked @pytest.mark.gpu are skipped without a CUDA device (reason shown in the summary).
- Hypothesis runs derandomized with no deadline: interpreter timings vary, results must not. Profiles:
  "kfe" (default) and "ci" (HYPOTHESIS_PROFILE=ci, set by .ci/run) with more examples; op tests give
  compiled paths 4x the profile's examples, the Triton interpreter 1x (tests/engine/ops/common.py).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before conftest could set TRITON_INTERPRET"
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("KFE_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("kfe", deadline=None, derandomize=True, max_examples=10,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", parent=settings.get_profile("kfe"), max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kfe"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="gpu test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
