"""Builds engine._C from csrc/.

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu) are added
when the installed torch is a CUDA build, a CUDA toolkit (nvcc + libcudart) is found, and either a GPU
is visible or the build asks for CUDA (KFE_CUDA=1, or TORCH_CUDA_ARCH_LIST set). Elsewhere the .cu
files are still compile-checked by the test suite (tests/csrc) and, on a GPU, JIT-compiled at run time.

Environment:
  KFE_CUDA=auto  (default) CUDA kernels where a GPU is visible; C++ CPU kernels only otherwise.
  KFE_CUDA=1     build the CUDA kernels too, GPU or not (a GPU-less Docker / cluster build node);
                 fails with a message if torch is not a CUDA build or no CUDA toolkit is found.
  KFE_CUDA=0     C++ CPU kernels only, even with a GPU.
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for; without a GPU it defaults to
                 "8.0;9.0+PTX" (A100, H100/H200, PTX for newer GPUs).
  CUDA_HOME      the CUDA toolkit; otherwise found from nvcc (wrappers resolved) or /usr/local/cuda.
  KFE_NO_EXT=1   skip the extension entirely (the engine then runs on Triton and the references;
                 `kfe doctor` reports it).
"""
import glob
import os
import shutil

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _say(msg):
    print(f"kfe setup: {msg}", flush=True)


def _has_cudart(home):
    return any(glob.glob(os.path.join(home, d, "libcudart.so*")) for d in ("lib64", "lib", "targets/*/lib"))


def _cuda_home_candidates():
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        yield env
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a symlink or a one-line wrapper script (`exec /opt/cuda/bin/nvcc "$@"`), whose
        # directory is not the toolkit's: torch's own guess (dirname of nvcc's dir) then lacks libcudart.
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        yield os.path.dirname(os.path.dirname(nvcc))
    yield "/usr/local/cuda"


def find_cuda_home():
    """The first candidate with bin/nvcc and libcudart, else None."""
    for home in _cuda_home_candidates():
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and _has_cudart(home):
            return home
    return None


def cuda_plan():
    """(build CUDA sources?, why) from KFE_CUDA, the torch build, the toolkit and the GPU."""
    import torch

    mode = os.environ.get("KFE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"kfe setup: KFE_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "KFE_CUDA=0: C++ CPU kernels only"
    missing = []
    if not torch.version.cuda:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    home = find_cuda_home()
    if home is None:
        missing.append("no CUDA toolkit with nvcc and libcudart found (set CUDA_HOME)")
    if missing:
        if mode == "1":
            raise SystemExit("kfe setup: KFE_CUDA=1 but " + "; ".join(missing))
        return False, "C++ CPU kernels only: " + "; ".join(missing)
    gpu = torch.cuda.is_available()
    wanted = mode == "1" or gpu or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if not wanted:
        return False, ("no GPU visible: building the C++ CPU kernels only (KFE_CUDA=1 builds the CUDA "
                       f"kernels too, for TORCH_CUDA_ARCH_LIST or {DEFAULT_ARCH_LIST})")
    os.environ["CUDA_HOME"] = home
    if not gpu and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch derives the list from the visible GPUs and fails with an IndexError when there are none.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        _say(f"no GPU visible: compiling CUDA kernels for TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")
    return True, f"CUDA kernels with {home} for {os.environ.get('TORCH_CUDA_ARCH_LIST') or 'the visible GPUs'}"


def _extensions():
    if os.environ.get("KFE_NO_EXT") == "1":
        return [], {}
    with_cuda, why = cuda_plan()
    _say(why)
    # cpp_extension reads CUDA_HOME when imported: import it only after cuda_plan() has set it.
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template over OpenMP; without the flag it runs serially.
    # -fno-math-errno: lets loops calling std::sqrt vectorize (the HOG kernel); nothing reads libm's errno.
    cxx, link = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"], ["-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # No --use_fast_math: the HOG kernel's bin decisions are tested with IEEE division and sqrt, and
        # the timed build must be the tested one (tests/csrc/test_nvcc.py compiles with these flags).
        ext = cpp_extension.CUDAExtension(
            "engine._C", sources, define_macros=[("KFE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("engine._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
