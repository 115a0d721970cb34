"""engine/_cuda.py, the run-time loader of csrc/cuda/*.cu: what it reports and accepts without a GPU."""
import importlib.util

import numpy as np
import pytest
import torch

from engine import _cuda


def test_sources_are_found_by_name():
    assert _cuda.source("hog").is_file()
    assert any("not found" in why for why in _cuda.runtime_reasons("no_such_kernel"))


def test_reasons_name_cupy_when_missing():
    why = _cuda.runtime_reasons("hog")
    if importlib.util.find_spec("cupy") is None:
        assert why and "cupy" in why[0]
    else:
        assert why == []


def test_arguments_must_say_their_c_type():
    assert _cuda._arg(None) == np.uint64(0)
    assert _cuda._arg(np.int32(7)).dtype == np.int32
    with pytest.raises(TypeError, match="numpy scalars"):
        _cuda._arg(7)  # int32 or int64? the kernel's signature decides, so the caller must
    with pytest.raises(ValueError, match="CUDA tensors"):
        _cuda._arg(torch.zeros(1))
