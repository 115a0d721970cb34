// Runs the CUDA kernels of csrc/cuda/*.cu on the CPU, one thread per block, for the tests.
//
// The kernels are written for any blockDim (every loop strides by blockDim.x and phases are separated
// by __syncthreads), so with blockDim.x = 1 and blocks run one after another, a plain C++ compile of
// the NVRTC view of the file (__CUDACC_RTC__ hides the host launcher) executes the same indexing,
// shared-memory layout, reductions and stores. It checks the kernels' logic where no GPU exists; the
// GPU tests check the real thing (warps, the fp16 `cvt` instruction, nvcc's code generation).
#include <algorithm>
#include <cmath>
#include <cstring>

struct kfe_dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
static kfe_dim3 blockIdx, threadIdx, blockDim;
static float smem[1 << 20];  // the dynamic shared memory of the running block

#define __CUDACC_RTC__ 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__
inline void __syncthreads() {}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
using std::max;
using std::min;

#include KFE_CUDA_SOURCE

// Same contract as kfe_hog_launch in hog.cu, executed on the host.
extern "C" int kfe_hog_emulate(int dtype, const void* x, float* out, const double* table, const float* gk,
                               const long long* index, long long units, const long long* p, unsigned int shared_bytes) {
  if (shared_bytes > sizeof(smem)) return 1;
  blockDim.x = 1;
  threadIdx.x = 0;
  for (long long k = 0; k < units; ++k) {
    blockIdx.x = static_cast<unsigned int>(k);
    std::fill(smem, smem + shared_bytes / sizeof(float), std::nanf(""));  // stale shared memory shows up
#define KFE_ARGS                                                                                               \
  table, gk, index, (int)p[0], (int)p[1], (int)p[2], (int)p[3], (int)p[4], (int)p[5], (int)p[6], (int)p[7],     \
      (int)p[8], (int)p[9], (int)p[10], p[11], p[12], p[13], p[14], p[15], p[16], p[17], p[18], p[19], p[20], \
      (int)p[21]
    if (dtype == 0) kfe_hog_f32(static_cast<const float*>(x), out, KFE_ARGS);
    if (dtype == 1) kfe_hog_f16(static_cast<const kfe_half_bits*>(x), out, KFE_ARGS);
    if (dtype == 2) kfe_hog_bf16(static_cast<const kfe_bf16_bits*>(x), out, KFE_ARGS);
  }
  return 0;
}
