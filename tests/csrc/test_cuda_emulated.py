"""The CUDA HOG kernel (csrc/cuda/hog.cu) executed on the CPU by tests/csrc/cuda_emulator.cpp, against the
float64 reference: its indexing, halo, shared-memory histograms, channel chunks, partial tiles, token
index and output strides, where no GPU exists. Inputs are k/256 images, as in tests/engine/ops/test_hog.py,
and ordinary fp32 images (k/255, normalised)."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from engine import testing
from engine.ops import _alloc
from engine.ops.hog import cuda as hog_cuda, plan, reference

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "csrc" / "cuda" / "hog.cu"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("emu") / "hog_emu.so"
    cmd = [cxx, "-O1", "-std=c++17", "-shared", "-fPIC", f'-DKFE_CUDA_SOURCE="{SOURCE}"',
           str(HERE / "cuda_emulator.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fn = ctypes.CDLL(str(lib)).kfe_hog_emulate
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_uint]
    return fn


def run(emulator, x5, units, nbins, gw):
    """What engine/ops/hog/cuda.py does, with the emulator in place of the GPU launch."""
    with _alloc.poison_outputs():
        out = plan.empty_output(units, x5.device)
    a = hog_cuda.launch_args(x5, units, nbins, gw)
    params = torch.tensor(a["params"], dtype=torch.int64)
    index = units.index.data_ptr() if units.index is not None else None
    rc = emulator(a["dtype"], x5.data_ptr(), out.data_ptr(), a["table"].data_ptr(), a["gk"].data_ptr(), index,
                  units.count, params.data_ptr(), a["shared_bytes"])
    assert rc == 0
    return out


def quantised(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 257, shape, generator=gen) / 256).to(dtype)


CASES = [  # shape, nbins, cell, patch, gaussian window
    ((2, 3, 32, 48), 9, 8, 16, 0),
    ((1, 5, 2, 16, 32), 9, 8, 16, 0),   # video; 5 channels: two channel chunks of at most 4
    ((1, 3, 24, 40), 9, 8, 8, 8),       # 3 x 5 cells: partial 2x2 tiles for kfe::hog
    ((2, 2, 16, 16), 4, 4, 8, 16),      # nbins with exact-tie boundaries, Gaussian window
    ((1, 2, 12, 18), 7, 6, 6, 0),       # cell 6: 2 x 3 cells in 2x2 tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_emulated_cuda_kernel_matches_reference(emulator, dtype, case):
    shape, nbins, cell, patch, gw = case
    x = quantised(shape, dtype)
    x5 = x.unsqueeze(2) if x.dim() == 4 else x
    kw = dict(nbins=nbins, cell=cell, gaussian_window=gw)
    u = max(1, 16 // cell)  # the tiles engine/ops/hog/cuda.py uses for kfe::hog
    got = run(emulator, x5, plan.hog_units(x5, nbins, cell, u, u), nbins, gw)
    want = reference.hog(x.double(), **kw)
    testing.assert_close(got.squeeze(1) if x.dim() == 4 else got, want, torch.float32, name="hog")
    got = run(emulator, x5, plan.token_units(x5, None, patch, nbins, cell), nbins, gw)
    testing.assert_close(got, reference.hog_targets(x.double(), patch=patch, **kw), torch.float32, name="targets")
    L = got.shape[1]
    mask = torch.rand(shape[0], L, generator=torch.Generator().manual_seed(1)) < 0.5
    got = run(emulator, x5, plan.token_units(x5, mask, patch, nbins, cell), nbins, gw)
    want = reference.hog_targets(x.double(), patch=patch, mask=mask, **kw)
    testing.assert_close(got, want, torch.float32, name="masked targets")


@pytest.mark.parametrize("image", ["k/255", "normalised"])
def test_emulated_cuda_kernel_ordinary_fp32_images(emulator, image):
    # fp32 images that are not k/256 (ToTensor's k/255, mean/std normalised): the kernel's float64
    # gradients and float64-checked bins must give the float64 reference's bins.
    from tests.engine.ops.test_hog import ordinary

    for shape, nbins in [((2, 3, 40, 56), 9), ((1, 3, 32, 48), 8)]:
        x = ordinary(shape, image)
        x5 = x.unsqueeze(2)
        got = run(emulator, x5, plan.hog_units(x5, nbins, 8, 2, 2), nbins, 0).squeeze(1)
        testing.assert_close(got, reference.hog(x.double(), nbins=nbins), torch.float32, name="hog")
        got = run(emulator, x5, plan.token_units(x5, None, 8, nbins, 8), nbins, 0)
        want = reference.hog_targets(x.double(), patch=8, nbins=nbins)
        testing.assert_close(got, want, torch.float32, name="targets")


def test_emulated_cuda_kernel_exact_boundaries(emulator):
    # The probes of test_hog.py: the gradients nearest each bin boundary, ties included.
    from tests.engine.ops.test_hog import _closest_to_boundaries, _probe_image

    for nbins in (9, 8):
        x = _probe_image(_closest_to_boundaries(nbins, 256))
        x5 = x.unsqueeze(2)
        got = run(emulator, x5, plan.hog_units(x5, nbins, 8, 2, 2), nbins, 0).squeeze(1)
        testing.assert_close(got, reference.hog(x.double(), nbins=nbins), torch.float32, name=f"nbins={nbins}")
