// Submanifold depthwise convolution on the CPU (FCMAE's sparse encoder, ConvNeXt V2 arXiv 2301.00808
// Sec. 3.1; submanifold sparse convolution, arXiv 1706.01307):
//
//   y[r, c] = bias[c] + sum_t w[t, c] * x[src_t(r), c]     over the valid taps t of output row r,
//
// with w the depthwise weight transposed to (K = k*k, C). Two layouts find the input rows src_t(r):
//   rows   r indexes the V gathered visible rows; src_t(r) = nbr[r, t] (-1 = masked or outside),
//          the neighbour table engine.sparse builds once per stage;
//   dense  r indexes the N*H*W sites of channels-last x; masked rows output 0, and src_t(r) is the
//          t-th site of r's k x k window if it is inside the image and visible (no table needed).
// Work scales with the visible rows: masked rows cost one row of zeros (dense) or nothing (rows);
// in the weight gradient a 32-row block with no visible row costs one pass over its mask bytes.
//
// Backward: the input gradient is this same kernel on dy with the taps reversed (a submanifold
// window is symmetric: u is tap t of v iff v is tap K-1-t of u), so there are no scattered writes.
// The weight gradient dw[t, c] = sum_r dy[r, c] * x[src_t(r), c] and dbias[c] = sum_r dy[r, c]
// reduce over rows in fixed row groups (opmath within 32-row blocks, double across blocks and
// groups), so results do not depend on the thread count.
//
// Channel loops are register-blocked (64 floats / 32 doubles of accumulators held across all taps)
// and compiled twice, for AVX2+FMA (picked at run time when the CPU has it) and for the baseline ISA,
// since the extension is built without -march flags.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#define KFE_INLINE inline __attribute__((always_inline))

namespace {

struct Geometry {
  int64_t R;              // output rows
  int64_t C, ks, K;       // channels, kernel size, taps
  int64_t R_in;           // input rows (bounds for the table)
  const int32_t* nbr;     // rows layout: (R, K) table; nullptr for the dense layout
  const bool* mask;       // dense layout: (N*H*W,) visibility
  int64_t H, W;           // dense layout: image size
};

// Input rows of output row r's taps into src[0..K) (-1 = none); false if r itself is masked.
KFE_INLINE bool taps_of(const Geometry& g, int64_t r, int64_t* src) {
  if (g.nbr) {
    const int32_t* row = g.nbr + r * g.K;
    for (int64_t t = 0; t < g.K; ++t) src[t] = (row[t] >= 0 && row[t] < g.R_in) ? row[t] : -1;
    return true;
  }
  if (!g.mask[r]) return false;
  const int64_t p = g.ks / 2, hw = r % (g.H * g.W), h = hw / g.W, w = hw % g.W;
  for (int64_t i = 0; i < g.ks; ++i) {
    for (int64_t j = 0; j < g.ks; ++j) {
      const int64_t hh = h + i - p, ww = w + j - p, s = r + (i - p) * g.W + (j - p);
      const bool ok = hh >= 0 && hh < g.H && ww >= 0 && ww < g.W && g.mask[s];
      src[i * g.ks + j] = ok ? s : -1;
    }
  }
  return true;
}

// Register blocking: for float and double, U vectors of 32 bytes (64 floats / 32 doubles) of
// accumulators stay in registers across all taps of a row (GCC vector types; 2 loads per FMA, no
// store). Channels past the last full block, and half / bfloat16, take the scalar loops.
// The 32-byte helpers are always inlined, so the base-ISA build never passes them across a call.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
};
constexpr int64_t kUnroll = 8;

template <typename T>
KFE_INLINE typename Vec<T>::type loadv(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename T>
KFE_INLINE void storev(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename scalar_t, typename opmath_t>
constexpr bool kVectorized = std::is_same_v<scalar_t, opmath_t>;

// out[0..C) = bias + sum over valid taps of w[t] * x[src[t]]; acc: C opmath of scratch.
template <typename scalar_t, typename opmath_t>
KFE_INLINE void fwd_row_body(const Geometry& g, const scalar_t* x, const opmath_t* wT, const opmath_t* bias,
                             const int64_t* src, opmath_t* acc, scalar_t* out) {
  const int64_t C = g.C;
  int64_t c0 = 0;
  if constexpr (kVectorized<scalar_t, opmath_t>) {
    using V = typename Vec<opmath_t>::type;
    constexpr int64_t L = Vec<opmath_t>::lanes, B = kUnroll * L;
    for (; c0 + B <= C; c0 += B) {
      V a[kUnroll];
#pragma GCC unroll 8
      for (int64_t u = 0; u < kUnroll; ++u) a[u] = bias ? loadv(bias + c0 + u * L) : V{};
      for (int64_t t = 0; t < g.K; ++t) {
        if (src[t] < 0) continue;
        const scalar_t* xr = x + src[t] * C + c0;
        const opmath_t* wt = wT + t * C + c0;
#pragma GCC unroll 8
        for (int64_t u = 0; u < kUnroll; ++u) a[u] += loadv(xr + u * L) * loadv(wt + u * L);
      }
#pragma GCC unroll 8
      for (int64_t u = 0; u < kUnroll; ++u) storev(out + c0 + u * L, a[u]);
    }
  }
  if (c0 == C) return;
  for (int64_t c = c0; c < C; ++c) acc[c] = bias ? bias[c] : opmath_t(0);
  for (int64_t t = 0; t < g.K; ++t) {
    if (src[t] < 0) continue;
    const scalar_t* __restrict__ xr = x + src[t] * C;
    const opmath_t* __restrict__ wt = wT + t * C;
    opmath_t* __restrict__ a = acc;
    for (int64_t c = c0; c < C; ++c) a[c] += static_cast<opmath_t>(xr[c]) * wt[c];
  }
  for (int64_t c = c0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
}

// For one block of rows (their taps in src, rows x K; rows[i] < 0 = skipped) and channels
// [c0, c0 + width): blk[t * width + c] = sum_i dy[row_i, c0 + c] * x[src_i,t, c0 + c] for each tap,
// blk[K * width + c] = sum_i dy[row_i, c0 + c]. Taps are the outer loop, so a tap's sums stay in
// registers while the block's dy rows (32 x 64 channels) stay in L1.
template <typename scalar_t, typename opmath_t>
KFE_INLINE void wgrad_block_body(const Geometry& g, const scalar_t* x, const scalar_t* dy, const int64_t* rows,
                                 int64_t nrows, const int64_t* src, int64_t c0, int64_t width, opmath_t* blk) {
  const int64_t C = g.C;
  int64_t cc = 0;
  if constexpr (kVectorized<scalar_t, opmath_t>) {
    using V = typename Vec<opmath_t>::type;
    constexpr int64_t L = Vec<opmath_t>::lanes, B = kUnroll * L;
    for (; cc + B <= width; cc += B) {
      for (int64_t t = 0; t <= g.K; ++t) {
        V a[kUnroll];
#pragma GCC unroll 8
        for (int64_t u = 0; u < kUnroll; ++u) a[u] = V{};
        for (int64_t i = 0; i < nrows; ++i) {
          if (rows[i] < 0) continue;
          const scalar_t* d = dy + rows[i] * C + c0 + cc;
          if (t == g.K) {  // the bias
#pragma GCC unroll 8
            for (int64_t u = 0; u < kUnroll; ++u) a[u] += loadv(d + u * L);
            continue;
          }
          const int64_t s = src[i * g.K + t];
          if (s < 0) continue;
          const scalar_t* xr = x + s * C + c0 + cc;
#pragma GCC unroll 8
          for (int64_t u = 0; u < kUnroll; ++u) a[u] += loadv(d + u * L) * loadv(xr + u * L);
        }
#pragma GCC unroll 8
        for (int64_t u = 0; u < kUnroll; ++u) storev(blk + t * width + cc + u * L, a[u]);
      }
    }
  }
  if (cc == width) return;
  for (int64_t t = 0; t <= g.K; ++t) {
    opmath_t* __restrict__ b = blk + t * width;
    for (int64_t c = cc; c < width; ++c) b[c] = opmath_t(0);
    for (int64_t i = 0; i < nrows; ++i) {
      if (rows[i] < 0) continue;
      const scalar_t* __restrict__ d = dy + rows[i] * C + c0;
      if (t == g.K) {
        for (int64_t c = cc; c < width; ++c) b[c] += static_cast<opmath_t>(d[c]);
        continue;
      }
      const int64_t s = src[i * g.K + t];
      if (s < 0) continue;
      const scalar_t* __restrict__ xr = x + s * C + c0;
      for (int64_t c = cc; c < width; ++c) b[c] += static_cast<opmath_t>(d[c]) * static_cast<opmath_t>(xr[c]);
    }
  }
}

template <typename scalar_t, typename opmath_t>
__attribute__((target("avx2,fma"))) void fwd_row_avx2(const Geometry& g, const scalar_t* x, const opmath_t* wT,
                                                      const opmath_t* bias, const int64_t* src, opmath_t* acc,
                                                      scalar_t* out) {
  fwd_row_body(g, x, wT, bias, src, acc, out);
}

template <typename scalar_t, typename opmath_t>
void fwd_row_base(const Geometry& g, const scalar_t* x, const opmath_t* wT, const opmath_t* bias,
                  const int64_t* src, opmath_t* acc, scalar_t* out) {
  fwd_row_body(g, x, wT, bias, src, acc, out);
}

template <typename scalar_t, typename opmath_t>
__attribute__((target("avx2,fma"))) void wgrad_block_avx2(const Geometry& g, const scalar_t* x, const scalar_t* dy,
                                                          const int64_t* rows, int64_t nrows, const int64_t* src,
                                                          int64_t c0, int64_t width, opmath_t* blk) {
  wgrad_block_body(g, x, dy, rows, nrows, src, c0, width, blk);
}

template <typename scalar_t, typename opmath_t>
void wgrad_block_base(const Geometry& g, const scalar_t* x, const scalar_t* dy, const int64_t* rows, int64_t nrows,
                      const int64_t* src, int64_t c0, int64_t width, opmath_t* blk) {
  wgrad_block_body(g, x, dy, rows, nrows, src, c0, width, blk);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

template <typename scalar_t>
void fwd_typed(const Geometry& g, const at::Tensor& x, const at::Tensor& wT, const std::optional<at::Tensor>& bias,
               at::Tensor& y) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const opmath_t* wp = wT.data_ptr<opmath_t>();
  const opmath_t* bp = bias.has_value() ? bias->data_ptr<opmath_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const auto row_fn = has_avx2() ? fwd_row_avx2<scalar_t, opmath_t> : fwd_row_base<scalar_t, opmath_t>;
  at::parallel_for(0, g.R, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> src(g.K);
    std::vector<opmath_t> acc(g.C);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = yp + r * g.C;
      if (!taps_of(g, r, src.data())) {
        std::fill(out, out + g.C, scalar_t(0));
        continue;
      }
      row_fn(g, xp, wp, bp, src.data(), acc.data(), out);
    }
  });
}

constexpr int64_t kChunk = 64;        // channels one weight-gradient task owns: (K + 1) x 64 stays in L1
constexpr int64_t kGroupRows = 2048;  // rows per group: fixed, so sums do not depend on the thread count
constexpr int64_t kBlockRows = 32;    // rows summed in opmath before a flush into double

template <typename scalar_t>
void wgrad_typed(const Geometry& g, const at::Tensor& dy, const at::Tensor& x, at::Tensor& dwT, at::Tensor& dbias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = dy.data_ptr<scalar_t>();
  const int64_t chunks = (g.C + kChunk - 1) / kChunk, groups = std::max<int64_t>(1, (g.R + kGroupRows - 1) / kGroupRows);
  const int64_t terms = g.K + 1;  // K taps, then the bias
  std::vector<double> part(groups * terms * g.C, 0.0);  // (groups, K + 1, C)
  const auto block_fn = has_avx2() ? wgrad_block_avx2<scalar_t, opmath_t> : wgrad_block_base<scalar_t, opmath_t>;
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> src(kBlockRows * g.K), rows(kBlockRows);
    std::vector<opmath_t> blk(terms * kChunk);
    std::vector<double> total(terms * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / chunks, c0 = (task % chunks) * kChunk, width = std::min(kChunk, g.C - c0);
      const int64_t r_end = std::min(g.R, (grp + 1) * kGroupRows);
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t r0 = grp * kGroupRows; r0 < r_end; r0 += kBlockRows) {
        const int64_t nrows = std::min(kBlockRows, r_end - r0);
        bool any = false;
        for (int64_t i = 0; i < nrows; ++i) {
          rows[i] = taps_of(g, r0 + i, src.data() + i * g.K) ? r0 + i : -1;
          any |= rows[i] >= 0;
        }
        // A block with no visible row adds exact zeros: skip its K + 1 passes (dense layout, FCMAE's
        // masked patches), so the work follows the visible rows. total starts at +0.0, so adding +/-0
        // never changes it: results are bit-identical.
        if (!any) continue;
        block_fn(g, xp, gp, rows.data(), nrows, src.data(), c0, width, blk.data());
        for (int64_t t = 0; t < terms; ++t)
          for (int64_t c = 0; c < width; ++c) total[t * width + c] += blk[t * width + c];
      }
      for (int64_t t = 0; t < terms; ++t)
        std::copy(total.begin() + t * width, total.begin() + (t + 1) * width, part.begin() + (grp * terms + t) * g.C + c0);
    }
  });
  opmath_t* wp = dwT.data_ptr<opmath_t>();
  opmath_t* bp = dbias.data_ptr<opmath_t>();
  for (int64_t t = 0; t < terms; ++t) {
    for (int64_t c = 0; c < g.C; ++c) {
      double s = 0;
      for (int64_t grp = 0; grp < groups; ++grp) s += part[(grp * terms + t) * g.C + c];
      (t < g.K ? wp[t * g.C + c] : bp[c]) = static_cast<opmath_t>(s);
    }
  }
}

at::ScalarType opmath_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel, "kfe sparse_dwconv2d (cpp): ",
              name, " must be contiguous ", dtype, " with ", numel, " elements");
}

// x: (R_in, C) rows, or (N, H, W, C) for the dense layout; exactly one of nbr / mask is given.
Geometry geometry(const at::Tensor& x, const std::optional<at::Tensor>& nbr, const std::optional<at::Tensor>& mask,
                  int64_t ks) {
  TORCH_CHECK(x.is_contiguous() && ks % 2 == 1 && ks > 0, "kfe sparse_dwconv2d (cpp): contiguous x, odd k");
  TORCH_CHECK(nbr.has_value() != mask.has_value(), "kfe sparse_dwconv2d (cpp): give one of nbr, mask");
  Geometry g{};
  g.C = x.size(-1);
  g.ks = ks;
  g.K = ks * ks;
  g.R_in = x.numel() / std::max<int64_t>(g.C, 1);
  if (nbr.has_value()) {
    TORCH_CHECK(nbr->scalar_type() == at::kInt && nbr->is_contiguous() && nbr->dim() == 2 && nbr->size(1) == g.K,
                "kfe sparse_dwconv2d (cpp): nbr must be contiguous int32 (V, k*k)");
    g.R = nbr->size(0);
    g.nbr = nbr->data_ptr<int32_t>();
  } else {
    TORCH_CHECK(x.dim() == 4, "kfe sparse_dwconv2d (cpp): dense x must be (N, H, W, C)");
    check_buffer(*mask, at::kBool, g.R_in, "mask");
    g.R = g.R_in;
    g.H = x.size(1);
    g.W = x.size(2);
    g.mask = mask->data_ptr<bool>();
  }
  return g;
}

void sparse_dwconv_fwd_cpp(const at::Tensor& x, const std::optional<at::Tensor>& nbr,
                           const std::optional<at::Tensor>& mask, const at::Tensor& wT,
                           const std::optional<at::Tensor>& bias, int64_t ks, at::Tensor y) {
  const Geometry g = geometry(x, nbr, mask, ks);
  check_buffer(wT, opmath_of(x), g.K * g.C, "wT");
  if (bias.has_value()) check_buffer(*bias, opmath_of(x), g.C, "bias");
  check_buffer(y, x.scalar_type(), g.R * g.C, "y");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_dwconv_fwd_cpp",
                                  [&] { fwd_typed<scalar_t>(g, x, wT, bias, y); });
}

void sparse_dwconv_wgrad_cpp(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& nbr,
                             const std::optional<at::Tensor>& mask, int64_t ks, at::Tensor dwT, at::Tensor dbias) {
  const Geometry g = geometry(x, nbr, mask, ks);
  check_buffer(dy, x.scalar_type(), g.R * g.C, "dy");
  check_buffer(dwT, opmath_of(x), g.K * g.C, "dwT");
  check_buffer(dbias, opmath_of(x), g.C, "dbias");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_dwconv_wgrad_cpp",
                                  [&] { wgrad_typed<scalar_t>(g, dy, x, dwT, dbias); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kfe, m) {
  m.def("_sparse_dwconv_fwd_cpp(Tensor x, Tensor? nbr, Tensor? mask, Tensor wT, Tensor? bias, int ks,"
        " Tensor(a!) y) -> ()");
  m.def("_sparse_dwconv_wgrad_cpp(Tensor dy, Tensor x, Tensor? nbr, Tensor? mask, int ks, Tensor(a!) dwT,"
        " Tensor(b!) dbias) -> ()");
}

TORCH_LIBRARY_IMPL(kfe, CPU, m) {
  m.impl("_sparse_dwconv_fwd_cpp", &sparse_dwconv_fwd_cpp);
  m.impl("_sparse_dwconv_wgrad_cpp", &sparse_dwconv_wgrad_cpp);
}
