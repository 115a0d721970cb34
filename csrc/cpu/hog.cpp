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
// Gradients are computed in double whatever the input type, as the reference does: the Sobel sums of
// ordinary float32 images are exact there (engine/ops/hog/plan.py), where float rounding would move
// pixels near a boundary to the neighbouring bin. Binning is atan2-free (plan.py): fold
// (X, Y) = (gy, gx) into the upper half-plane, then bin = #{k : c_k*Y - s_k*X >= 0} with each constant
// split into a 12-bit head and a tail (exact direction vectors for the rational boundaries). For
// float/half/bf16 input the boundary tests, magnitudes and sums run in float (twice the vector lanes)
// on the exact gradient rounded to float, and the rare pixel whose float cross product is within its
// error bound of zero is re-binned in double afterwards; double input runs in double throughout (9 bins
// from float/half/bf16, MaskFeat's case, take band9_impl: the same arithmetic with less work). The
// band kernel is compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time, since setup.py
// builds for the baseline ISA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

struct Geometry {
  int64_t B, C, T, H, W, h, w;
  int64_t nbins, cell, gw, u;  // u = patch / cell for targets, 0 for kfe::hog's layout
};

template <typename acc_t>
struct Scratch {
  std::vector<double> rows;  // the band's input rows, reflect-padded, as double (band9: a row + 3 h/s rows)
  // nb, near (float path): boundaries passed per column, and a 0/1 near-boundary flag, kept in acc_t
  // like everything else in the vote loop (mixed element widths keep it from vectorising well).
  // band9 keeps mag and nb (its bins) for all `cell` rows of the band: cell * width each.
  std::vector<acc_t> weight, past, mag, X, Y, sums, nb, near;
  std::vector<float> tree;  // band9's pairwise cell sums
  explicit Scratch(const Geometry& g, int64_t width)
      : rows(std::max(g.cell + 2, int64_t(7)) * (width + 2)), weight(width, acc_t(1)), past(g.nbins * width),
        mag(g.cell * width), X(width), Y(width), sums(g.nbins * (width / g.cell)), nb(g.cell * width), near(width),
        tree(g.nbins * width / 2 + 1) {}
};

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

// Cross product of the folded gradient (X, Y) with boundary t = (c_hi, c_lo, s_hi, s_lo): >= 0 on or past it.
template <typename acc_t>
inline __attribute__((always_inline)) acc_t cross(const acc_t* t, acc_t X, acc_t Y) {
  return (t[0] * Y - t[2] * X) + (t[1] * Y - t[3] * X);
}

// Float cross products of a gradient rounded to float are within ~6 * 2^-24 (|X| + |Y|) of the exact
// ones (rounding of X and Y, four products and three sums with the split constants); a pixel within
// NEAR (2^-18, 10x margin) of that of a boundary is re-binned in double. Below |X| + |Y| = TINY the float
// products could underflow: those (nonzero) gradients vote in double only.
constexpr float NEAR = 0x1p-18f, TINY = 0x1p-100f;

// Histograms (ncx * nbins, un-normalised) of cells [cx0, cx0 + ncx) in cell row cy of one channel plane.
//
// No per-pixel scatter: past[0][i] sums |g| of column i over the band's rows, past[k][i] only where the
// gradient lies past boundary k. The bins are nested (a pixel past boundary k is past every boundary
// before it), so per cell hist[b] = S_b - S_{b+1} with S_k the cell's sum of past[k]: every loop is a
// plain vector loop. NB > 0 unrolls the boundaries (the common nbins); NB = 0 takes nbins at run time.
// table: boundaries in acc_t; table64: the same in double (the re-binning); gk: the window in acc_t.
template <int NB, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void band_impl(const scalar_t* plane, const Geometry& g, const acc_t* table,
                                                     const double* table64, const acc_t* gk, int64_t cy, int64_t cx0,
                                                     int64_t ncx, Scratch<acc_t>& s, acc_t* hist) {
  constexpr bool rebin = !std::is_same_v<acc_t, double>;  // float tests on a rounded gradient
  const int64_t nbins = NB > 0 ? NB : g.nbins;
  const int64_t width = ncx * g.cell, x0 = cx0 * g.cell, stride = width + 2;
  double* __restrict rows = s.rows.data();
  for (int64_t r = 0; r < g.cell + 2; ++r) {  // image rows y0-1 .. y0+cell, reflect-padded, as double
    const scalar_t* src = plane + reflect(cy * g.cell + r - 1, g.H) * g.W;
    double* dst = rows + r * stride;
    dst[0] = static_cast<double>(src[reflect(x0 - 1, g.W)]);
    for (int64_t i = 0; i < width; ++i) dst[i + 1] = static_cast<double>(src[x0 + i]);
    dst[width + 1] = static_cast<double>(src[reflect(x0 + width, g.W)]);
  }
  acc_t* __restrict past = s.past.data();
  acc_t* __restrict weight = s.weight.data();  // all 1 without a Gaussian window
  acc_t *__restrict mags = s.mag.data(), *__restrict Xs = s.X.data(), *__restrict Ys = s.Y.data();
  acc_t *__restrict nb = s.nb.data(), *__restrict near = s.near.data();
  std::fill(past, past + nbins * width, acc_t(0));
  for (int64_t r = 0; r < g.cell; ++r) {
    if (g.gw) {
      const acc_t* wrow = gk + ((cy * g.cell + r) % g.gw) * g.gw;
      for (int64_t i = 0; i < width; ++i) weight[i] = wrow[(x0 + i) % g.gw];
    }
    const double *__restrict up = rows + r * stride, *__restrict mid = up + stride, *__restrict dn = mid + stride;
    _Pragma("omp simd") for (int64_t i = 0; i < width; ++i) {  // exact gradients, folded, rounded to acc_t
      // Kx = [[1,0,-1],[2,0,-2],[1,0,-1]], Ky = Kx^T, as cross-correlation.
      const double dx = (up[i] - up[i + 2]) + 2.0 * (mid[i] - mid[i + 2]) + (dn[i] - dn[i + 2]);
      const double dy = (up[i] + 2.0 * up[i + 1] + up[i + 2]) - (dn[i] + 2.0 * dn[i + 1] + dn[i + 2]);
      // Fold by a sign factor, not a branch or select (either keeps GCC from vectorising the loop).
      const double sign = 1.0 - 2.0 * ((dx < 0) | ((dx == 0) & (dy < 0)));
      Ys[i] = static_cast<acc_t>(sign * dx), Xs[i] = static_cast<acc_t>(sign * dy);
    }
    // Float arithmetic only (0/1 factors, no bools or branches), which GCC vectorises.
    acc_t any_near = 0;
    _Pragma("omp simd reduction(max:any_near)") for (int64_t i = 0; i < width; ++i) {
      const acc_t X = Xs[i], Y = Ys[i], size = std::fabs(X) + Y, tol = acc_t(NEAR) * size;
      const acc_t tiny = rebin && size < acc_t(TINY) ? acc_t(1) : acc_t(0);  // no float vote
      const acc_t mag = std::sqrt(X * X + Y * Y) * weight[i] * (acc_t(1) - tiny);
      acc_t n = 0, close = size > 0 ? tiny : acc_t(0);  // zero gradients: nothing to vote
      past[i] += mag;
      if constexpr (NB > 0) {  // all boundaries while the pixel is in registers
#pragma GCC unroll 32
        for (int k = 1; k < NB; ++k) {
          const acc_t c = cross(table + 4 * (k - 1), X, Y), passed = c >= 0 ? acc_t(1) : acc_t(0);
          past[k * width + i] += passed * mag;
          if constexpr (rebin) n += passed, close = std::max(close, std::fabs(c) <= tol ? acc_t(1) : acc_t(0));
        }
      }
      mags[i] = mag, nb[i] = n, near[i] = close;
      any_near = std::max(any_near, close);
    }
    if constexpr (NB == 0) {
      for (int64_t k = 1; k < nbins; ++k) {
        const acc_t* t = table + 4 * (k - 1);
        acc_t* __restrict pk = past + k * width;
        _Pragma("omp simd reduction(max:any_near)") for (int64_t i = 0; i < width; ++i) {
          const acc_t c = cross(t, Xs[i], Ys[i]), passed = c >= 0 ? acc_t(1) : acc_t(0);
          pk[i] += passed * mags[i];
          if constexpr (rebin) {
            const acc_t tol = acc_t(NEAR) * (std::fabs(Xs[i]) + Ys[i]);
            const acc_t close = std::max(near[i], std::fabs(c) <= tol ? acc_t(1) : acc_t(0));
            nb[i] += passed, near[i] = close, any_near = std::max(any_near, close);
          }
        }
      }
    }
    if (rebin && any_near > 0) {  // rare: re-bin in double the pixels the float tests could have misplaced
      for (int64_t i = 0; i < width; ++i) {
        if (near[i] == 0) continue;
        const double dx = (up[i] - up[i + 2]) + 2.0 * (mid[i] - mid[i + 2]) + (dn[i] - dn[i + 2]);
        const double dy = (up[i] + 2.0 * up[i + 1] + up[i + 2]) - (dn[i] + 2.0 * dn[i + 1] + dn[i + 2]);
        const bool flip = dx < 0 || (dx == 0 && dy < 0);
        const double Y = flip ? -dx : dx, X = flip ? -dy : dy;
        int64_t exact = 0;
        for (int64_t k = 1; k < nbins; ++k) exact += cross(table64 + 4 * (k - 1), X, Y) >= 0;
        // The float tests are right but at the one boundary near the pixel (boundaries are pi/nbins
        // apart), so the float vote went to past[0..nb[i]] (nested): move it to past[0..exact]. A tiny
        // gradient had no float vote (had = -1): it votes here.
        const bool tiny = std::fabs(Xs[i]) + Ys[i] < acc_t(TINY);
        const int64_t had = tiny ? -1 : static_cast<int64_t>(nb[i]);
        const acc_t mag = tiny ? std::sqrt(Xs[i] * Xs[i] + Ys[i] * Ys[i]) * weight[i] : mags[i];
        for (int64_t k = std::min(exact, had) + 1; k <= std::max(exact, had); ++k)
          past[k * width + i] += exact > had ? mag : -mag;
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

// band9's past[k][i] = sum over the band's `rows` rows of mag where bin >= k, for k = 0..8: the nine sums
// are named scalars (vector registers in the simd loop; an array would live in memory). ROWS > 0 fixes
// the row count (MaskFeat's cell of 8) so that the row loop unrolls.
template <int ROWS>
inline __attribute__((always_inline)) void column_sums9(const float* __restrict mags, const float* __restrict bins,
                                                        int64_t width, int64_t rows, float* __restrict past) {
  _Pragma("omp simd") for (int64_t i = 0; i < width; ++i) {
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
#pragma GCC unroll 8
    for (int64_t y = 0; y < (ROWS > 0 ? ROWS : rows); ++y) {
      const float m = mags[y * width + i], b = bins[y * width + i];
      a0 += m;
      a1 += b >= 1 ? m : 0.0f, a2 += b >= 2 ? m : 0.0f, a3 += b >= 3 ? m : 0.0f, a4 += b >= 4 ? m : 0.0f;
      a5 += b >= 5 ? m : 0.0f, a6 += b >= 6 ? m : 0.0f, a7 += b >= 7 ? m : 0.0f, a8 += b >= 8 ? m : 0.0f;
    }
    past[i] = a0, past[width + i] = a1, past[2 * width + i] = a2, past[3 * width + i] = a3;
    past[4 * width + i] = a4, past[5 * width + i] = a5, past[6 * width + i] = a6, past[7 * width + i] = a7;
    past[8 * width + i] = a8;
  }
}

// MaskFeat's case, 9 bins with float/half/bf16 input: the same histograms as band_impl, in about half
// the work. (1) The Sobel filter is separable: per padded row h = a[i] - a[i+2] and s = a[i] + 2a[i+1] +
// a[i+2] (double, exact), kept for three rows, give dx = h0 + 2h1 + h2 and dy = s0 - s2 (exact: the
// same values as band_impl's). (2) The boundaries are symmetric about pi/2 (theta_{9-j} = pi - theta_j),
// so with A = |X| four cross products decide the bin: n = #{j <= 4 : c_j Y - s_j A >= 0}, bin = n for
// X >= 0 and 8 - n for X < 0 (X < 0 lies past theta_{9-j} iff (A, Y) is not past theta_j; exact
// equality there is a tie in exact arithmetic only, which the near test below sends to double).
// Each float cross product (one rounded constant per side, X and Y rounded to float) is within
// ~4 * 2^-24 (|X| + Y) of the exact one: a pixel within NEAR (2^-18) of that of a boundary, or with a
// tiny gradient, is re-binned in double against the full table, as in band_impl.
template <typename scalar_t>
inline __attribute__((always_inline)) void band9_impl(const scalar_t* plane, const Geometry& g, const float* table,
                                                      const double* table64, const float* gk, int64_t cy,
                                                      int64_t cx0, int64_t ncx, Scratch<float>& s, float* hist) {
  constexpr int64_t nbins = 9;
  const int64_t width = ncx * g.cell, x0 = cx0 * g.cell;
  // The float constants (c_j, s_j) of boundaries j = 1..4, heads and tails summed in double first.
  float C[4], S[4];
  for (int j = 0; j < 4; ++j) {
    C[j] = static_cast<float>(table64[4 * j] + table64[4 * j + 1]);
    S[j] = static_cast<float>(table64[4 * j + 2] + table64[4 * j + 3]);
  }
  double* __restrict hs = s.rows.data();  // ring of 3 rows: h at hs + 2*slot*width, s after it
  float* __restrict past = s.past.data();
  float* __restrict weight = s.weight.data();  // all 1 without a Gaussian window
  // The vote loop stores each pixel's magnitude and bin per row; the histograms are summed afterwards,
  // per column over the band's rows in registers (one store per bin and column, not a load and a store
  // per bin and pixel).
  float *__restrict mags = s.mag.data(), *__restrict bins = s.nb.data(), *__restrict near = s.near.data();
  for (int64_t r = 0; r < g.cell + 2; ++r) {  // image rows y0-1 .. y0+cell, reflect-padded
    const scalar_t* src = plane + reflect(cy * g.cell + r - 1, g.H) * g.W;
    // The same row of the next band (the next task): fetched from memory while this band computes.
    if (const int64_t ahead = cy * g.cell + r - 1 + g.cell; ahead < g.H)
      for (int64_t i = 0; i < width; i += 64 / sizeof(scalar_t)) __builtin_prefetch(plane + ahead * g.W + x0 + i);
    double *__restrict h2 = hs + 2 * (r % 3) * width, *__restrict s2 = h2 + width;
    // Columns whose neighbours are inside the image straight from the input; the (at most two) others
    // through the reflect padding.
    const int64_t lo = x0 == 0 ? 1 : 0, hi = std::max(lo, x0 + width == g.W ? width - 1 : width);
    const scalar_t* __restrict a = src + x0 - 1;
    _Pragma("omp simd") for (int64_t i = lo; i < hi; ++i) {
      const double l = static_cast<double>(a[i]), m = static_cast<double>(a[i + 1]), rr = static_cast<double>(a[i + 2]);
      h2[i] = l - rr;
      s2[i] = (l + rr) + 2.0 * m;
    }
    for (int64_t i : {int64_t(0), width - 1}) {
      if (i >= lo && i < hi) continue;
      const double l = static_cast<double>(src[reflect(x0 + i - 1, g.W)]), m = static_cast<double>(src[x0 + i]),
                   rr = static_cast<double>(src[reflect(x0 + i + 1, g.W)]);
      h2[i] = l - rr;
      s2[i] = (l + rr) + 2.0 * m;
    }
    if (r < 2) continue;
    const int64_t y = r - 2;  // output row: image rows r-2, r-1, r of the band
    const double *__restrict h0 = hs + 2 * ((r - 2) % 3) * width, *__restrict s0 = h0 + width;
    const double *__restrict h1 = hs + 2 * ((r - 1) % 3) * width;
    if (g.gw) {
      const float* wrow = gk + ((cy * g.cell + y) % g.gw) * g.gw;
      for (int64_t i = 0; i < width; ++i) weight[i] = wrow[(x0 + i) % g.gw];
    }
    float *__restrict magr = mags + y * width, *__restrict binr = bins + y * width;
    float any_near = 0;
    _Pragma("omp simd reduction(max:any_near)") for (int64_t i = 0; i < width; ++i) {
      // Kx = [[1,0,-1],[2,0,-2],[1,0,-1]], Ky = Kx^T as cross-correlation; fold (X, Y) = (gy, gx) into
      // Y > 0 or (Y == 0, X >= 0) by a sign factor (rounding to float keeps signs and zeros).
      const float gx = static_cast<float>((h0[i] + h2[i]) + 2.0 * h1[i]), gy = static_cast<float>(s0[i] - s2[i]);
      const float sign = 1.0f - 2.0f * static_cast<float>((gx < 0) | ((gx == 0) & (gy < 0)));
      const float Y = sign * gx, X = sign * gy, A = std::fabs(X), size = A + Y, tol = NEAR * size;
      const float tiny = size < TINY ? 1.0f : 0.0f;  // no float vote
      const float mag = std::sqrt(X * X + Y * Y) * (g.gw ? weight[i] : 1.0f) * (1.0f - tiny);
      float n = 0, dist = 0x1p127f - 0x1p127f * tiny;  // the smallest |cross product| (0 if tiny)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const float c = C[j] * Y - S[j] * A;
        n += c >= 0 ? 1.0f : 0.0f;
        const float ac = std::fabs(c);
        dist = ac < dist ? ac : dist;
      }
      // Zero gradients (magnitude 0) vote nothing in any bin: never re-binned (flat image regions).
      const float close = (size > 0 ? 1.0f : 0.0f) * (dist <= tol ? 1.0f : 0.0f);
      magr[i] = mag, binr[i] = X < 0 ? 8.0f - n : n, near[i] = close;
      any_near = std::max(any_near, close);
    }
    if (any_near > 0) {  // rare: re-bin in double the pixels the float tests could have misplaced
      for (int64_t i = 0; i < width; ++i) {
        if (near[i] == 0) continue;
        const double dx = (h0[i] + h2[i]) + 2.0 * h1[i], dy = s0[i] - s2[i];
        const bool flip = dx < 0 || (dx == 0 && dy < 0);
        const double Yd = flip ? -dx : dx, Xd = flip ? -dy : dy;
        int64_t exact = 0;
        for (int64_t k = 1; k < nbins; ++k) exact += cross(table64 + 4 * (k - 1), Xd, Yd) >= 0;
        // The exact bin replaces the float one; a tiny gradient (no float vote, magnitude 0) gets its magnitude.
        const float Xf = static_cast<float>(Xd), Yf = static_cast<float>(Yd);
        if (std::fabs(Xf) + Yf < TINY) magr[i] = std::sqrt(Xf * Xf + Yf * Yf) * weight[i];
        binr[i] = static_cast<float>(exact);
      }
    }
  }
  // past[k][i]: column i's magnitudes with bin >= k over the band's rows (nested sums, as in band_impl).
  if (g.cell == 8)
    column_sums9<8>(mags, bins, width, 8, past);
  else
    column_sums9<0>(mags, bins, width, g.cell, past);
  // S_k per cell, sums[k * ncx + cx]: the cell's run of `cell` values in row k of past. For a power-of-two
  // cell (MaskFeat's 8) by pairwise sums over all of past at once (cells never straddle rows), which
  // vectorise where the strided sums below would gather.
  const float* sums = past;
  if ((g.cell & (g.cell - 1)) == 0) {
    float* bufs[2] = {s.tree.data(), past};
    for (int64_t len = nbins * width / 2, b = 0; len >= nbins * ncx; len /= 2, b ^= 1) {
      const float* __restrict src = sums;
      float* __restrict dst = bufs[b];
      _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) dst[i] = src[2 * i] + src[2 * i + 1];
      sums = dst;
    }
  } else {
    float* __restrict acc = s.sums.data();
    std::fill(acc, acc + nbins * ncx, 0.0f);
    for (int64_t k = 0; k < nbins; ++k)
      for (int64_t j = 0; j < g.cell; ++j) {
        const float* __restrict pk = past + k * width + j;
        float* __restrict sk = acc + k * ncx;
        _Pragma("omp simd") for (int64_t cx = 0; cx < ncx; ++cx) sk[cx] += pk[cx * g.cell];
      }
    sums = acc;
  }
  for (int64_t cx = 0; cx < ncx; ++cx)  // hist[b] = S_b - S_{b+1}
    for (int64_t k = 0; k < nbins; ++k)
      hist[cx * nbins + k] = sums[k * ncx + cx] - (k + 1 < nbins ? sums[(k + 1) * ncx + cx] : 0.0f);
}

#define KFE_HOG_BAND_ARGS                                                                                   \
  const scalar_t *plane, const Geometry &g, const acc_t *table, const double *table64, const acc_t *gk,     \
      int64_t cy, int64_t cx0, int64_t ncx, Scratch<acc_t> &s, acc_t *hist
#define KFE_HOG_BAND_CALL                                                        \
  if constexpr (NB == -9)                                                        \
    band9_impl<scalar_t>(plane, g, table, table64, gk, cy, cx0, ncx, s, hist);   \
  else                                                                           \
    band_impl<NB, scalar_t, acc_t>(plane, g, table, table64, gk, cy, cx0, ncx, s, hist)

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
  if constexpr (std::is_same_v<acc_t, float>)
    if (nbins == 9) return pick_isa<-9, scalar_t, acc_t>();  // band9_impl
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
  const double* table64 = table_t.data_ptr<double>();
  // The boundary table and window in acc_t: float heads are exact, float tails rounded (plan.bin_table).
  const std::vector<acc_t> table_acc(table64, table64 + table_t.numel());
  const std::vector<acc_t> gk_acc(gk_t.data_ptr<double>(), gk_t.data_ptr<double>() + gk_t.numel());
  const acc_t *table = table_acc.data(), *gk = gk_acc.data();
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
          band(plane_of(f, c), g, table, table64, gk, ty * u + iy, tx * u, n * u, s, hist);
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
      band(plane_of(f, c), g, table, table64, gk, cy, 0, g.w, s, hist);
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

// x (B, C, T, H, W) contiguous; table (max(nbins-1, 1), 4) and gk (gw*gw or 1,) double;
// out float (double for double x);
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
  check_buffer(table, at::kDouble, 4 * std::max<int64_t>(nbins - 1, 1), "table");
  check_buffer(gk, at::kDouble, gaussian_window ? gaussian_window * gaussian_window : 1, "gk");
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
