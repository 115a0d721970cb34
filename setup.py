"""Builds engine._C from csrc/.

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu) are added
only where the installed torch is a CUDA build and nvcc is found; elsewhere they are still
compile-checked by the test suite (tests/csrc) and, on a GPU, JIT-compiled at run time.

Environment:
  KFE_NO_EXT=1   skip the extension entirely (the engine then runs on Triton and the references;
                 `kfe doctor` reports it).
"""
import glob
import os
import shutil

from setuptools import setup


def _extensions():
    if os.environ.get("KFE_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template over OpenMP; without the flag it runs serially.
    # -fno-math-errno: lets loops calling std::sqrt vectorize (the HOG kernel); nothing reads libm's errno.
    cxx, link = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"], ["-fopenmp"]
    with_cuda = bool(torch.version.cuda) and (cpp_extension.CUDA_HOME or shutil.which("nvcc"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "engine._C", sources, define_macros=[("KFE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("engine._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
