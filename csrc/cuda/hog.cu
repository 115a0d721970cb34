// HOG targets of MaskFeat (arXiv 2112.09133, Sec. 3.2; the HOGLayerC of the official code) in CUDA.
//
// Plain `extern "C" __global__` kernels on raw pointers (no ATen/c10 headers, no includes at all), so
// one source serves three ways (DESIGN.md section 4): compiled into engine._C by setup.py with the
// host launcher at the bottom, JIT-compiled by NVRTC through CuPy (engine/_cuda.py; the launcher is
// skipped under __CUDACC_RTC__), and compile-checked by `nvcc -c` in the tests.
//
// One block per work unit (engine/ops/hog/plan.py): a rectangle of uh x uw cells of one frame, all
// channels, `ch` channels at a time. Per channel chunk the block
//   1. loads the reflect-padded (TH+2) x (TW+2) pixel tile of each channel into shared memory,
//   2. runs one thread per (channel, pixel row, cell column): Sobel gradients from the tile, magnitude,
//      exact bin (plan.py: fold into the upper half-plane, count boundaries with split constants),
//      votes summed into that thread's own shared-memory histogram row (no atomics: deterministic),
//   3. runs one thread per (channel, cell, bin): adds the cell's `cell` row histograms in a fixed
//      order, then L2-normalises over the bins (eps 1e-12) and writes through the output strides.
// The image is read from global memory once, the result written once. Gradients are double sums of the
// (float-exact) pixel values, exact for ordinary images (plan.py), so the bins are the reference's; the
// bin is counted in fp32 on the rounded gradient and checked in double against the two boundaries
// around it (fp32 rounding moves the angle by ~1e-7, far less than a bin): two double cross products
// per pixel rather than nbins - 1. Magnitudes, histograms and the normalisation are fp32.

__device__ __forceinline__ float kfe_load(const float* p, long long i) { return p[i]; }

struct kfe_half_bits { unsigned short v; };
struct kfe_bf16_bits { unsigned short v; };

__device__ __forceinline__ float kfe_load(const kfe_half_bits* p, long long i) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].v));
  return f;
#else  // host-side emulation of the kernels (tests/csrc/cuda_emulator.cpp): IEEE half -> float by hand
  const unsigned int h = p[i].v, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) return (sign ? -1.f : 1.f) * static_cast<float>(man) * 5.9604644775390625e-8f;  // 2^-24
  return __uint_as_float(sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13)));
#endif
}

__device__ __forceinline__ float kfe_load(const kfe_bf16_bits* p, long long i) {
  return __uint_as_float(static_cast<unsigned int>(p[i].v) << 16);
}

__device__ __forceinline__ int kfe_reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

template <typename T>
__device__ __forceinline__ T kfe_cross(const T* t, T X, T Y) {  // t = c_hi, c_lo, s_hi, s_lo; >= 0: on or past
  return (t[0] * Y - t[2] * X) + (t[1] * Y - t[3] * X);
}

// Number of boundaries k (theta_k = (k+1) pi / nbins) that the exact gradient lies on or past: counted
// in fp32 (table: the fp32 constants), then boundaries b-1 and b checked in double (table64).
__device__ __forceinline__ int kfe_bin(double gx, double gy, const float* table, const double* table64, int nbins) {
  const bool flip = gx < 0.0 || (gx == 0.0 && gy < 0.0);  // fold (X, Y) = (gy, gx) to the upper half-plane
  const double Y = flip ? -gx : gx, X = flip ? -gy : gy;
  // Only the direction matters: an exact power-of-two scale keeps the fp32 copy clear of under/overflow.
  const double size = fabs(X) + Y, scale = size < 0x1p-100 ? 0x1p+100 : (size > 0x1p+100 ? 0x1p-100 : 1.0);
  const float Yf = static_cast<float>(Y * scale), Xf = static_cast<float>(X * scale);
  int b = 0;
  for (int k = 0; k + 1 < nbins; ++k) b += kfe_cross(table + 4 * k, Xf, Yf) >= 0.f;
  if (b > 0 && kfe_cross(table64 + 4 * (b - 1), X, Y) < 0.0) return b - 1;
  if (b + 1 < nbins && kfe_cross(table64 + 4 * b, X, Y) >= 0.0) return b + 1;
  return b;
}

template <typename In>
__device__ void kfe_hog_unit(const In* __restrict__ x, float* __restrict__ out, const double* __restrict__ table,
                             const float* __restrict__ gk, const long long* __restrict__ index, int C, int T, int H,
                             int W, int h, int w, int nbins, int cell, int gw, int uh, int uw, long long nty,
                             long long ntx, long long sK, long long sF, long long sTY, long long sTX, long long sC,
                             long long sBin, long long sY, long long sX, int ch) {
  extern __shared__ float smem[];
  const long long k = blockIdx.x;
  const long long unit = index != nullptr ? index[k] : k;
  const long long f = unit / (nty * ntx), ty = (unit % (nty * ntx)) / ntx, tx = unit % ntx;
  const long long plane = static_cast<long long>(H) * W;
  const long long in_base = ((f / T) * C * T + f % T) * plane;  // frame f = b*T + t, channel 0
  const long long out_base = k * sK + f * sF + ty * sTY + tx * sTX;

  const int cy0 = static_cast<int>(ty) * uh, cx0 = static_cast<int>(tx) * uw;
  const int ncy = min(uh, h - cy0), ncx = min(uw, w - cx0);  // the last units of a row may be partial
  const int TH = ncy * cell, TW = ncx * cell, tile = (TH + 2) * (TW + 2);
  const int y0 = cy0 * cell, x0 = cx0 * cell;

  // Shared memory: [table (nbins-1)*4 | halo ch * tile_max | partial ch * (uh*cell) * uw * nbins |
  //                 hist ch * uh * uw * nbins].
  float* tbl = smem;
  float* halo = tbl + 4 * (nbins > 1 ? nbins - 1 : 1);
  float* part = halo + ch * (uh * cell + 2) * (uw * cell + 2);
  float* hist = part + ch * uh * cell * uw * nbins;
  // fp32 constants: heads exact, tails rounded (as plan.bin_table's float32 table).
  for (int i = threadIdx.x; i < 4 * (nbins - 1); i += blockDim.x) tbl[i] = static_cast<float>(table[i]);

  for (int c0 = 0; c0 < C; c0 += ch) {
    const int nc = min(ch, C - c0);
    for (int i = threadIdx.x; i < nc * tile; i += blockDim.x) {
      const int cc = i / tile, j = i % tile, hy = j / (TW + 2), hx = j % (TW + 2);
      const int yy = kfe_reflect(y0 + hy - 1, H), xx = kfe_reflect(x0 + hx - 1, W);
      halo[i] = kfe_load(x, in_base + (c0 + cc) * T * plane + static_cast<long long>(yy) * W + xx);
    }
    const int segments = nc * TH * ncx;  // (channel, pixel row, cell column)
    for (int i = threadIdx.x; i < segments * nbins; i += blockDim.x) part[i] = 0.f;
    __syncthreads();

    for (int j = threadIdx.x; j < segments; j += blockDim.x) {
      const int cc = j / (TH * ncx), row = (j / ncx) % TH, q = j % ncx;
      const float* up = halo + cc * tile + row * (TW + 2) + q * cell;
      const float* mid = up + (TW + 2);
      const float* dn = mid + (TW + 2);
      float* acc = part + j * nbins;
      for (int i = 0; i < cell; ++i) {
        const double u0 = up[i], u1 = up[i + 1], u2 = up[i + 2], m0 = mid[i], m2 = mid[i + 2];
        const double d0 = dn[i], d1 = dn[i + 1], d2 = dn[i + 2];
        const double gx = (u0 - u2) + 2.0 * (m0 - m2) + (d0 - d2);
        const double gy = (u0 + 2.0 * u1 + u2) - (d0 + 2.0 * d1 + d2);
        const float gxf = static_cast<float>(gx), gyf = static_cast<float>(gy);
        float mag = sqrtf(gxf * gxf + gyf * gyf);
        if (gw > 0) mag *= gk[((y0 + row) % gw) * gw + (x0 + q * cell + i) % gw];
        acc[kfe_bin(gx, gy, tbl, table, nbins)] += mag;
      }
    }
    __syncthreads();

    const int cells = nc * ncy * ncx;  // (channel, cell row, cell column)
    for (int i = threadIdx.x; i < cells * nbins; i += blockDim.x) {  // one thread per (channel, cell, bin)
      const int cell_id = i / nbins, b = i % nbins;
      const int cc = cell_id / (ncy * ncx), a = (cell_id / ncx) % ncy, q = cell_id % ncx;
      const float* rows = part + ((cc * TH + a * cell) * ncx + q) * nbins + b;  // row r at + r * ncx * nbins
      float s = 0.f;
      for (int r = 0; r < cell; ++r) s += rows[r * ncx * nbins];
      hist[i] = s;
    }
    __syncthreads();

    for (int i = threadIdx.x; i < cells * nbins; i += blockDim.x) {  // L2 over the cell's bins, then store
      const int cell_id = i / nbins, b = i % nbins;
      const int cc = cell_id / (ncy * ncx), a = (cell_id / ncx) % ncy, q = cell_id % ncx;
      const float* hc = hist + cell_id * nbins;
      float ss = 0.f;
      for (int j = 0; j < nbins; ++j) ss += hc[j] * hc[j];
      out[out_base + (c0 + cc) * sC + b * sBin + a * sY + q * sX] = hist[i] / fmaxf(sqrtf(ss), 1e-12f);
    }
    __syncthreads();  // the next channel chunk reuses halo and part
  }
}

#define KFE_HOG_PARAMS                                                                                       \
  const double *__restrict__ table, const float *__restrict__ gk, const long long *__restrict__ index, int C, \
      int T, int H, int W, int h, int w, int nbins, int cell, int gw, int uh, int uw, long long nty,          \
      long long ntx, long long sK, long long sF, long long sTY, long long sTX, long long sC, long long sBin, \
      long long sY, long long sX, int ch
#define KFE_HOG_ARGS \
  table, gk, index, C, T, H, W, h, w, nbins, cell, gw, uh, uw, nty, ntx, sK, sF, sTY, sTX, sC, sBin, sY, sX, ch

extern "C" __global__ void kfe_hog_f32(const float* __restrict__ x, float* __restrict__ out, KFE_HOG_PARAMS) {
  kfe_hog_unit<float>(x, out, KFE_HOG_ARGS);
}

extern "C" __global__ void kfe_hog_f16(const kfe_half_bits* __restrict__ x, float* __restrict__ out, KFE_HOG_PARAMS) {
  kfe_hog_unit<kfe_half_bits>(x, out, KFE_HOG_ARGS);
}

extern "C" __global__ void kfe_hog_bf16(const kfe_bf16_bits* __restrict__ x, float* __restrict__ out, KFE_HOG_PARAMS) {
  kfe_hog_unit<kfe_bf16_bits>(x, out, KFE_HOG_ARGS);
}

#if !defined(__CUDACC_RTC__)
// Host launcher for engine._C (csrc/hog_cuda.cpp registers it as kfe::_hog_cuda). p holds, in order:
// C, T, H, W, h, w, nbins, cell, gw, uh, uw, nty, ntx, sK, sF, sTY, sTX, sC, sBin, sY, sX, ch.
// dtype: 0 float32, 1 float16, 2 bfloat16. Returns the cudaError_t of the launch.
extern "C" int kfe_hog_launch(int dtype, const void* x, float* out, const double* table, const float* gk,
                              const long long* index, long long units, const long long* p, int threads,
                              unsigned int shared_bytes, void* stream) {
  if (units == 0) return 0;
  const int C = (int)p[0], T = (int)p[1], H = (int)p[2], W = (int)p[3], h = (int)p[4], w = (int)p[5];
  const int nbins = (int)p[6], cell = (int)p[7], gw = (int)p[8], uh = (int)p[9], uw = (int)p[10], ch = (int)p[21];
  const dim3 grid(static_cast<unsigned int>(units)), block(threads);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define KFE_LAUNCH_ARGS                                                                                        \
  table, gk, index, C, T, H, W, h, w, nbins, cell, gw, uh, uw, p[11], p[12], p[13], p[14], p[15], p[16], p[17], \
      p[18], p[19], p[20], ch
  if (dtype == 0)
    kfe_hog_f32<<<grid, block, shared_bytes, s>>>(static_cast<const float*>(x), out, KFE_LAUNCH_ARGS);
  else if (dtype == 1)
    kfe_hog_f16<<<grid, block, shared_bytes, s>>>(static_cast<const kfe_half_bits*>(x), out, KFE_LAUNCH_ARGS);
  else
    kfe_hog_bf16<<<grid, block, shared_bytes, s>>>(static_cast<const kfe_bf16_bits*>(x), out, KFE_LAUNCH_ARGS);
#undef KFE_LAUNCH_ARGS
  return static_cast<int>(cudaGetLastError());
}
#endif
