// HOG targets of MaskFeat (arXiv 2112.09133, Sec. 3.2; the HOGLayerC of the official code) on the CPU.
//
// One pass per (frame, row of cells): for every channel, the cell+2 image rows the band needs
// (reflect-padded) are converted to the math type once, then Sobel gradients, magnitudes and exact
// orientation bins are computed row by row in vector loops that sum the magnitudes past each bin
// boundary per column (no scatter; histograms are differences of those nested sums), and each cell is
// L2-normalised and written straight to its place in the output
// (kfe::hog's (B, T, C, nbins, h, w), or the (tokens, D) rows of kfe::hog_targets). With a token
// index (masked targets) the tasks are the listed tokens only (runs of neighbours in a token row share
// a band): unlisted tokens cost nothing.
//
// Binning is atan2-free and exact on every gradient of k/256 or 8-bit images (engine/ops/hog/plan.py):
// fold (X, Y) = (gy, gx) into the upper half-plane, then bin = #{k : c_k*Y - s_k*X >= 0} with each
// constant split into a 12-bit head and a tail (exact direction vectors for the rational boundaries). Math is float (double for double input). The band
// kernel is compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time, since setup.py
// builds for the baseline ISA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

namespace {

struct Geometry {
  int64_t B, C, T, H, W, h, w;
  int64_t nbins, cell, gw, u;  // u = patch / cell for targets, 0 for kfe::hog's layout
};

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> rows, weight, past, mag, X, Y, sums;
  explicit Scratch(const Geometry& g, int64_t width)
      : rows((g.cell + 2) * (width + 2)), weight(width, acc_t(1)), past(g.nbins * width), mag(width), X(width),
        Y(width), sums(g.nbins * (width / g.cell)) {}
};

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

// Folded gradient (X, Y) = (gy, gx) -> upper half-plane; does it lie on or past boundary k?
template <typename acc_t>
inline __attribute__((always_inline)) bool past_boundary(const acc_t* t, acc_t X, acc_t Y) {
  return ((t[0] * Y - t[2] * X) + (t[1] * Y - t[3] * X)) >= 0;  // t = c_hi, c_lo, s_hi, s_lo
}

// Histograms (ncx * nbins, un-normalised) of cells [cx0, cx0 + ncx) in cell row cy of one channel plane.
//
// No per-pixel scatter: past[0][i] sums |g| of column i over the band's rows, past[k][i] only where the
// gradient lies past boundary k. The bins are nested (a pixel past boundary k is past every boundary
// before it), so per cell hist[b] = S_b - S_{b+1} with S_k the cell's sum of past[k]: every loop is a
// plain vector loop. NB > 0 unrolls the boundaries (the common nbins); NB = 0 takes nbins at run time.
template <int NB, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void band_impl(const scalar_t* plane, const Geometry& g, const acc_t* table,
                                                     const acc_t* gk, int64_t cy, int64_t cx0, int64_t ncx,
                                                     Scratch<acc_t>& s, acc_t* hist) {
  const int64_t nbins = NB > 0 ? NB : g.nbins;
  const int64_t width = ncx * g.cell, x0 = cx0 * g.cell, stride = width + 2;
  acc_t* __restrict rows = s.rows.data();
  for (int64_t r = 0; r < g.cell + 2; ++r) {  // image rows y0-1 .. y0+cell, reflect-padded, as acc_t
    const scalar_t* src = plane + reflect(cy * g.cell + r - 1, g.H) * g.W;
    acc_t* dst = rows + r * stride;
    dst[0] = static_cast<acc_t>(src[reflect(x0 - 1, g.W)]);
    for (int64_t i = 0; i < width; ++i) dst[i + 1] = static_cast<acc_t>(src[x0 + i]);
    dst[width + 1] = static_cast<acc_t>(src[reflect(x0 + width, g.W)]);
  }
  acc_t* __restrict past = s.past.data();
  acc_t* __restrict weight = s.weight.data();  // all 1 without a Gaussian window
  std::fill(past, past + nbins * width, acc_t(0));
  for (int64_t r = 0; r < g.cell; ++r) {
    if (g.gw) {
      const acc_t* wrow = gk + ((cy * g.cell + r) % g.gw) * g.gw;
      for (int64_t i = 0; i < width; ++i) weight[i] = wrow[(x0 + i) % g.gw];
    }
    const acc_t *__restrict up = rows + r * stride, *__restrict mid = up + stride, *__restrict dn = mid + stride;
    acc_t *__restrict mags = s.mag.data(), *__restrict Xs = s.X.data(), *__restrict Ys = s.Y.data();
    _Pragma("omp simd") for (int64_t i = 0; i < width; ++i) {
      // Kx = [[1,0,-1],[2,0,-2],[1,0,-1]], Ky = Kx^T, as cross-correlation.
      const acc_t dx = (up[i] - up[i + 2]) + acc_t(2) * (mid[i] - mid[i + 2]) + (dn[i] - dn[i + 2]);
      const acc_t dy = (up[i] + acc_t(2) * up[i + 1] + up[i + 2]) - (dn[i] + acc_t(2) * dn[i + 1] + dn[i + 2]);
      const acc_t mag = std::sqrt(dx * dx + dy * dy) * weight[i];
      const bool flip = dx < 0 || (dx == 0 && dy < 0);
      const acc_t Y = flip ? -dx : dx, X = flip ? -dy : dy;
      past[i] += mag;
      if constexpr (NB > 0) {  // all boundaries while the pixel is in registers
#pragma GCC unroll 32
        for (int k = 1; k < NB; ++k) past[k * width + i] += past_boundary(table + 4 * (k - 1), X, Y) ? mag : acc_t(0);
      } else {
        mags[i] = mag, Xs[i] = X, Ys[i] = Y;
      }
    }
    if constexpr (NB == 0) {
      for (int64_t k = 1; k < nbins; ++k) {
        const acc_t* t = table + 4 * (k - 1);
        acc_t* __restrict pk = past + k * width;
        _Pragma("omp simd") for (int64_t i = 0; i < width; ++i) pk[i] += past_boundary(t, Xs[i], Ys[i]) ? mags[i] : acc_t(0);
      }
    }
  }
  acc_t* __restrict sums = s.sums.data();  // S_k per cell: sums[k * ncx + cx], cells as the vector lanes
  std::fill(sums, sums + nbins * ncx, acc_t(0));
  for (int64_t k = 0; k < nbins; ++k)
    for (int64_t j = 0; j < g.cell; ++j) {
      const acc_t* __restrict pk = past + k * width + j;
      acc_t* __restrict sk = sums + k * ncx;
      _Pragma("omp simd") for (int64_t cx = 0; cx < ncx; ++cx) sk[cx] += pk[cx * g.cell];
    }
  for (int64_t cx = 0; cx < ncx; ++cx)  // hist[b] = S_b - S_{b+1}
    for (int64_t k = 0; k < nbins; ++k)
      hist[cx * nbins + k] = sums[k * ncx + cx] - (k + 1 < nbins ? sums[(k + 1) * ncx + cx] : acc_t(0));
}

#define KFE_HOG_BAND_ARGS                                                                                   \
  const scalar_t *plane, const Geometry &g, const acc_t *table, const acc_t *gk, int64_t cy, int64_t cx0,   \
      int64_t ncx, Scratch<acc_t> &s, acc_t *hist
#define KFE_HOG_BAND_CALL band_impl<NB, scalar_t, acc_t>(plane, g, table, gk, cy, cx0, ncx, s, hist)

template <int NB, typename scalar_t, typename acc_t>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))) void band_avx512(KFE_HOG_BAND_ARGS) {
  KFE_HOG_BAND_CALL;
}

template <int NB, typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void band_avx2(KFE_HOG_BAND_ARGS) {
  KFE_HOG_BAND_CALL;
}

template <int NB, typename scalar_t, typename acc_t>
void band_base(KFE_HOG_BAND_ARGS) {
  KFE_HOG_BAND_CALL;
}

template <typename scalar_t, typename acc_t>
using BandFn = void (*)(KFE_HOG_BAND_ARGS);

template <int NB, typename scalar_t, typename acc_t>
BandFn<scalar_t, acc_t> pick_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    return band_avx512<NB, scalar_t, acc_t>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return band_avx2<NB, scalar_t, acc_t>;
  return band_base<NB, scalar_t, acc_t>;
}

// MaskFeat's 9 bins get the unrolled kernel; any other count the run-time loop.
template <typename scalar_t, typename acc_t>
BandFn<scalar_t, acc_t> pick_band(int64_t nbins) {
  return nbins == 9 ? pick_isa<9, scalar_t, acc_t>() : pick_isa<0, scalar_t, acc_t>();
}

// L2-normalise each of the ncx cells' nbins values over the bins (F.normalize, eps 1e-12) and store
// them with out_of(cell index, bin).
template <typename acc_t, typename OutFn>
void normalise_and_store(const acc_t* hist, int64_t ncx, int64_t nbins, OutFn out_of) {
  for (int64_t i = 0; i < ncx; ++i) {
    const acc_t* hc = hist + i * nbins;
    acc_t ss = 0;
    for (int64_t b = 0; b < nbins; ++b) ss += hc[b] * hc[b];
    const acc_t denom = std::max(std::sqrt(ss), acc_t(1e-12));
    for (int64_t b = 0; b < nbins; ++b) *out_of(i, b) = hc[b] / denom;
  }
}

// Runs body(task, scratch, hist) for task in [0, tasks) on at::parallel_for's threads, handing out tasks
// from a shared counter rather than in fixed slices: on a busy machine (a data loader next to other
// work) a thread that is descheduled holds up one task, not a whole slice of the batch.
template <typename acc_t, typename Body>
void dynamic_for(int64_t tasks, const Geometry& g, Body body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch<acc_t> s(g, g.W);
    std::vector<acc_t> hist(g.w * g.nbins);
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) body(task, s, hist.data());
  });
}

template <typename scalar_t>
void hog_typed(const at::Tensor& x, const at::Tensor& table_t, const at::Tensor& gk_t, const int64_t* index,
               int64_t count, const Geometry& g, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* table = table_t.data_ptr<acc_t>();
  const acc_t* gk = gk_t.data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();
  const BandFn<scalar_t, acc_t> band = pick_band<scalar_t, acc_t>(g.nbins);
  const int64_t plane_size = g.H * g.W;
  auto plane_of = [&](int64_t f, int64_t c) { return xp + (((f / g.T) * g.C + c) * g.T + f % g.T) * plane_size; };

  if (index != nullptr) {  // masked targets: only the listed tokens, token index[k] written to row k
    const int64_t u = g.u, ntx = g.w / u, per_frame = (g.h / u) * ntx, D = g.C * g.nbins * u * u;
    // Runs of consecutive listed tokens in one token row share their bands (fewer, wider vector loops).
    std::vector<int64_t> runs;  // first k of each run, then count
    for (int64_t k = 0; k < count; ++k)
      if (k == 0 || index[k] != index[k - 1] + 1 || index[k] % ntx == 0) runs.push_back(k);
    runs.push_back(count);
    dynamic_for<acc_t>(static_cast<int64_t>(runs.size()) - 1, g, [&](int64_t r, Scratch<acc_t>& s, acc_t* hist) {
      const int64_t k0 = runs[r], n = runs[r + 1] - k0, tok = index[k0];
      const int64_t f = tok / per_frame, ty = (tok % per_frame) / ntx, tx = tok % ntx;
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t iy = 0; iy < u; ++iy) {
          band(plane_of(f, c), g, table, gk, ty * u + iy, tx * u, n * u, s, hist);
          acc_t* row = op + k0 * D + c * g.nbins * u * u + iy * u;  // cell j: token k0 + j/u, column j%u
          normalise_and_store(hist, n * u, g.nbins,
                              [&](int64_t j, int64_t b) { return row + (j / u) * D + b * u * u + j % u; });
        }
    });
    return;
  }
  // Every cell: one task per (frame, cell row), full width.
  dynamic_for<acc_t>(g.B * g.T * g.h, g, [&](int64_t task, Scratch<acc_t>& s, acc_t* hist) {
    const int64_t f = task / g.h, cy = task % g.h;
    for (int64_t c = 0; c < g.C; ++c) {
      band(plane_of(f, c), g, table, gk, cy, 0, g.w, s, hist);
      if (g.u == 0) {  // (B, T, C, nbins, h, w)
        acc_t* base = op + ((f * g.C + c) * g.nbins * g.h + cy) * g.w;
        normalise_and_store(hist, g.w, g.nbins, [&](int64_t cx, int64_t b) { return base + b * g.h * g.w + cx; });
      } else {  // tokens (B*T*Lf, D): token (f, cy/u, cx/u), entry (c, b, cy%u, cx%u)
        const int64_t u = g.u, ntx = g.w / u, D = g.C * g.nbins * u * u;
        acc_t* base = op + (f * (g.h / u) + cy / u) * ntx * D + c * g.nbins * u * u + (cy % u) * u;
        normalise_and_store(hist, g.w, g.nbins,
                            [&](int64_t cx, int64_t b) { return base + (cx / u) * D + b * u * u + cx % u; });
      }
    }
  });
}

void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel, "kfe hog (cpp): ", name,
              " must be contiguous ", dtype, " with ", numel, " elements");
}

// x (B, C, T, H, W) contiguous; table (max(nbins-1, 1), 4) and gk (gw*gw or 1,) in the math dtype;
// patch = 0: out is kfe::hog's (B, T, C, nbins, h, w); else the targets (tokens or index rows, D).
void hog_cpp(const at::Tensor& x, const at::Tensor& table, const at::Tensor& gk, const std::optional<at::Tensor>& index,
             int64_t nbins, int64_t cell, int64_t gaussian_window, int64_t patch, at::Tensor out) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(), "kfe hog (cpp): x must be contiguous (B, C, T, H, W)");
  TORCH_CHECK(nbins >= 1 && cell >= 1 && gaussian_window >= 0 && patch >= 0 && patch % cell == 0,
              "kfe hog (cpp): bad nbins/cell/gaussian_window/patch");
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), x.size(3) / cell, x.size(4) / cell,
                   nbins, cell, gaussian_window, patch / cell};
  TORCH_CHECK(g.H % cell == 0 && g.W % cell == 0 && g.H >= 2 && g.W >= 2, "kfe hog (cpp): H, W must be multiples of cell, >= 2");
  TORCH_CHECK(g.u == 0 || (g.h % g.u == 0 && g.w % g.u == 0), "kfe hog (cpp): H, W must be multiples of patch");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_buffer(table, acc, 4 * std::max<int64_t>(nbins - 1, 1), "table");
  check_buffer(gk, acc, gaussian_window ? gaussian_window * gaussian_window : 1, "gk");
  const int64_t* idx = nullptr;
  int64_t count = 0;
  const int64_t D = g.C * nbins * g.u * g.u;
  if (index.has_value()) {
    TORCH_CHECK(g.u > 0, "kfe hog (cpp): a token index needs patch > 0");
    count = index->numel();
    check_buffer(*index, at::kLong, count, "index");
    idx = index->data_ptr<int64_t>();
    check_buffer(out, acc, count * D, "out");
  } else {
    check_buffer(out, acc, g.B * g.T * g.C * nbins * g.h * g.w, "out");
  }
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hog_cpp",
                                  [&] { hog_typed<scalar_t>(x, table, gk, idx, count, g, out); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kfe, m) {
  m.def("_hog_cpp(Tensor x, Tensor table, Tensor gk, Tensor? index, int nbins, int cell, int gaussian_window,"
        " int patch, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(kfe, CPU, m) { m.impl("_hog_cpp", &hog_cpp); }
