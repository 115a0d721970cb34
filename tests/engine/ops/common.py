"""What the op tests share: the backend auto must pick on CUDA, the GPU's backends to check, and how many
hypothesis examples each kind of path gets."""
from hypothesis import settings

from engine import testing

# The backend `auto` must pick on CUDA for 16-bit and fp32 inputs at the tests' sizes: the fastest
# correct path (engine/backend.py). A GPU test that ran anything else would test the wrong code.
CUDA_AUTO = {"grn": "triton", "sparse_dwconv2d": "triton", "attention": "triton", "contrastive_loss": "triton",
             "hog": "cuda"}


def gpu_backends(op: str) -> list[str]:
    """'auto' (asserted to pick CUDA_AUTO[op]) and every other fast path present on the GPU."""
    return ["auto"] + [b for b in testing.fast_backends(op, "cuda") if b != CUDA_AUTO[op]]


def expect(op: str, backend: str) -> str | None:
    return CUDA_AUTO[op] if backend == "auto" else None


# Hypothesis examples per test, scaled from the profile (tests/conftest.py: "kfe" locally, "ci" in CI):
# compiled paths (C++, float64 specs) cost milliseconds an example, the Triton interpreter ~0.1-1 s.
def cheap() -> settings:
    return settings(max_examples=4 * settings.default.max_examples)


def interpreted(share: float = 1.0) -> settings:
    """share < 1 for kernels whose interpreted example takes seconds (every tap of a 7x7 window)."""
    return settings(max_examples=max(3, round(share * settings.default.max_examples)))



def cdiv(a: int, b: int) -> int:
    return -(-a // b)
