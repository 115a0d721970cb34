// kfe::_hog_cuda: the host side of csrc/cuda/hog.cu inside engine._C (built only where setup.py compiles
// CUDA sources, i.e. with KFE_WITH_CUDA). It uses no CUDA headers: the caller passes torch's current
// stream as an integer, and the kernel launch itself lives in hog.cu (kfe_hog_launch), so hog.cu stays
// free of ATen/c10 and is the very source NVRTC compiles where the extension was built without CUDA.
#ifdef KFE_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

extern "C" int kfe_hog_launch(int dtype, const void* x, float* out, const double* table, const float* gk,
                              const long long* index, long long units, const long long* p, int threads,
                              unsigned int shared_bytes, void* stream);

namespace {

// params: C, T, H, W, h, w, nbins, cell, gw, uh, uw, nty, ntx, sK, sF, sTY, sTX, sC, sBin, sY, sX, ch
// (engine/ops/hog/cuda.py builds them from plan.Units).
void hog_cuda(const at::Tensor& x, const at::Tensor& table, const at::Tensor& gk, const std::optional<at::Tensor>& index,
              at::IntArrayRef params, int64_t units, int64_t threads, int64_t shared_bytes, int64_t stream,
              at::Tensor out) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 5, "kfe hog (cuda): x must be contiguous CUDA (B, C, T, H, W)");
  TORCH_CHECK(params.size() == 22, "kfe hog (cuda): expected 22 params, got ", params.size());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.device() == x.device(),
              "kfe hog (cuda): out must be contiguous float32 on x's device");
  TORCH_CHECK(table.scalar_type() == at::kDouble && gk.scalar_type() == at::kFloat,
              "kfe hog (cuda): table must be float64, gk float32");
  int dtype = -1;
  if (x.scalar_type() == at::kFloat) dtype = 0;
  if (x.scalar_type() == at::kHalf) dtype = 1;
  if (x.scalar_type() == at::kBFloat16) dtype = 2;
  TORCH_CHECK(dtype >= 0, "kfe hog (cuda): x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const long long* idx = nullptr;
  if (index.has_value()) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->numel() == units, "kfe hog (cuda): index must be int64 (units,)");
    idx = reinterpret_cast<const long long*>(index->data_ptr<int64_t>());
  }
  const at::DeviceGuard guard(x.device());
  const int err = kfe_hog_launch(dtype, x.data_ptr(), out.data_ptr<float>(), table.data_ptr<double>(), gk.data_ptr<float>(),
                                 idx, units, reinterpret_cast<const long long*>(params.data()), static_cast<int>(threads),
                                 static_cast<unsigned int>(shared_bytes), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "kfe hog (cuda): kernel launch failed (cudaError ", err, ")");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kfe, m) {
  m.def("_hog_cuda(Tensor x, Tensor table, Tensor gk, Tensor? index, int[] params, int units, int threads,"
        " int shared_bytes, int stream, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(kfe, CUDA, m) { m.impl("_hog_cuda", &hog_cuda); }
#endif  // KFE_WITH_CUDA
