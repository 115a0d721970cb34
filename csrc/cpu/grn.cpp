// GRN (ConvNeXt V2, arXiv 2301.00808, Alg. 1) on the CPU: forward and backward, channels-last.
//
//   Gx[n,c] = ||x[n,:,:,c]||_2 over visible sites,  D[n] = mean_c Gx[n,c] + eps,  Nx = Gx / D,
//   y = gamma * (x * Nx) + beta + x  at visible sites, exactly 0 at masked ones.
//
// Each direction is two passes over memory: a reduction over H*W into (N, C) tables, then an
// elementwise pass (y = x * scale[n,c] + beta[c]; dx = dy * scale[n,c] + x * shift[n,c]).
// Sums over H*W accumulate in blocks of 32 rows in opmath (float for half/bfloat16/float, double for
// double), then in double across blocks (3136 rows at ConvNeXt stage 1). Outputs are written into buffers the caller
// allocates, so tests can poison them. Python validates user input; the checks below only guard
// the raw-pointer contract with the Python side.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // channels one reduction task owns; its accumulators stay in L1

struct Dims {
  int64_t N, HW, C;
};

Dims dims_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "kfe grn (cpp): x must be contiguous (N, H, W, C)");
  return {x.size(0), x.size(1) * x.size(2), x.size(3)};
}

void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel, "kfe grn (cpp): ", name,
              " must be contiguous ", dtype, " with ", numel, " elements");
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask, const Dims& d) {
  if (!mask.has_value()) return nullptr;
  check_buffer(*mask, at::kBool, d.N * d.HW, "mask");
  return mask->data_ptr<bool>();
}

// For every (n, c): out[k][n*C + c] = sum over visible rows of the k-th term that row_fn adds into
// acc[k*kChunk + c]. One task per (sample, channel chunk); channels are the contiguous inner loop.
// row_fn accumulates in opmath (vectorizes); every kRowBlock rows the block is flushed into double,
// so long H*W sums keep double accuracy at float speed.
constexpr int64_t kRowBlock = 32;

template <typename opmath_t, typename RowFn>
void reduce_rows(const Dims& d, const bool* mask, RowFn row_fn, const std::vector<double*>& out) {
  const int64_t chunks = (d.C + kChunk - 1) / kChunk;
  const size_t terms = out.size();
  at::parallel_for(0, d.N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total(terms * kChunk);
    std::vector<opmath_t> block(terms * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, c0 = (task % chunks) * kChunk, width = std::min(kChunk, d.C - c0);
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t h0 = 0; h0 < d.HW; h0 += kRowBlock) {
        std::fill(block.begin(), block.end(), opmath_t(0));
        for (int64_t hw = h0; hw < std::min(h0 + kRowBlock, d.HW); ++hw) {
          const int64_t row = n * d.HW + hw;
          if (!mask || mask[row]) row_fn(row * d.C + c0, width, block.data());
        }
        for (size_t i = 0; i < total.size(); ++i) total[i] += block[i];
      }
      for (size_t k = 0; k < terms; ++k)
        std::copy(total.begin() + k * kChunk, total.begin() + k * kChunk + width, out[k] + n * d.C + c0);
    }
  });
}

// dst[row, :] = visible ? f(row, c) : 0, rows in parallel.
template <typename scalar_t, typename ElemFn>
void map_rows(const Dims& d, const bool* mask, scalar_t* dst, ElemFn f) {
  at::parallel_for(0, d.N * d.HW, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* out = dst + row * d.C;
      if (mask && !mask[row]) {
        std::fill(out, out + d.C, scalar_t(0));
        continue;
      }
      const int64_t off = row * d.C, table = (row / d.HW) * d.C;
      for (int64_t c = 0; c < d.C; ++c) out[c] = static_cast<scalar_t>(f(off + c, table + c, c));
    }
  });
}

template <typename scalar_t>
void grn_fwd_typed(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const bool* mask,
                   double eps, at::Tensor& y) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Dims d = dims_of(x);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const opmath_t* gam = gamma.data_ptr<opmath_t>();
  const opmath_t* bet = beta.data_ptr<opmath_t>();

  std::vector<double> sumsq(d.N * d.C);
  reduce_rows<opmath_t>(d, mask, [&](int64_t off, int64_t width, opmath_t* acc) {
    for (int64_t c = 0; c < width; ++c) {
      const opmath_t v = static_cast<opmath_t>(xp[off + c]);
      acc[c] += v * v;
    }
  }, {sumsq.data()});

  std::vector<opmath_t> scale(d.N * d.C);  // y = x * (1 + gamma * Nx) + beta
  for (int64_t n = 0; n < d.N; ++n) {
    double* g = sumsq.data() + n * d.C;
    double total = 0;
    for (int64_t c = 0; c < d.C; ++c) total += (g[c] = std::sqrt(g[c]));
    const double denom = total / d.C + eps;
    for (int64_t c = 0; c < d.C; ++c) scale[n * d.C + c] = static_cast<opmath_t>(1.0 + gam[c] * (g[c] / denom));
  }
  map_rows(d, mask, y.data_ptr<scalar_t>(), [&](int64_t i, int64_t t, int64_t c) {
    return static_cast<opmath_t>(xp[i]) * scale[t] + bet[c];
  });
}

template <typename scalar_t>
void grn_bwd_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma, const bool* mask,
                   double eps, at::Tensor& dx, at::Tensor& dgamma, at::Tensor& dbeta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Dims d = dims_of(x);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = dy.data_ptr<scalar_t>();
  const opmath_t* gam = gamma.data_ptr<opmath_t>();

  // One read of (x, dy): Q = sum x^2 (Gx = sqrt Q), S = sum dy*x, B = sum dy, over visible rows.
  std::vector<double> Q(d.N * d.C), S(d.N * d.C), B(d.N * d.C);
  reduce_rows<opmath_t>(d, mask, [&](int64_t off, int64_t width, opmath_t* acc) {
    for (int64_t c = 0; c < width; ++c) {
      const opmath_t v = static_cast<opmath_t>(xp[off + c]), g = static_cast<opmath_t>(gp[off + c]);
      acc[c] += v * v;
      acc[kChunk + c] += g * v;
      acc[2 * kChunk + c] += g;
    }
  }, {Q.data(), S.data(), B.data()});

  // Per sample: dNx = gamma*S, dGx = dNx/D - sum_c(dNx*Gx)/(D^2 C),
  // dx = dy*(1 + gamma*Nx) + x * dGx/Gx (0 where Gx = 0: the subgradient torch.norm uses).
  std::vector<opmath_t> scale(d.N * d.C), shift(d.N * d.C);
  std::vector<double> dg(d.C, 0.0), db(d.C, 0.0);
  for (int64_t n = 0; n < d.N; ++n) {
    const int64_t o = n * d.C;
    double total = 0, cross = 0;
    for (int64_t c = 0; c < d.C; ++c) {
      Q[o + c] = std::sqrt(Q[o + c]);
      total += Q[o + c];
      cross += gam[c] * S[o + c] * Q[o + c];
    }
    const double denom = total / d.C + eps;
    for (int64_t c = 0; c < d.C; ++c) {
      const double gx = Q[o + c], nx = gx / denom;
      const double dgx = gam[c] * S[o + c] / denom - cross / (denom * denom * d.C);
      scale[o + c] = static_cast<opmath_t>(1.0 + gam[c] * nx);
      shift[o + c] = static_cast<opmath_t>(gx > 0 ? dgx / gx : 0.0);
      dg[c] += S[o + c] * nx;
      db[c] += B[o + c];
    }
  }
  map_rows(d, mask, dx.data_ptr<scalar_t>(), [&](int64_t i, int64_t t, int64_t) {
    return static_cast<opmath_t>(gp[i]) * scale[t] + static_cast<opmath_t>(xp[i]) * shift[t];
  });
  opmath_t* dgp = dgamma.data_ptr<opmath_t>();
  opmath_t* dbp = dbeta.data_ptr<opmath_t>();
  for (int64_t c = 0; c < d.C; ++c) {
    dgp[c] = static_cast<opmath_t>(dg[c]);
    dbp[c] = static_cast<opmath_t>(db[c]);
  }
}

at::ScalarType opmath_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void grn_fwd_cpp(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                 const std::optional<at::Tensor>& mask, double eps, at::Tensor y) {
  const Dims d = dims_of(x);
  check_buffer(gamma, opmath_of(x), d.C, "gamma");
  check_buffer(beta, opmath_of(x), d.C, "beta");
  check_buffer(y, x.scalar_type(), x.numel(), "y");
  const bool* m = mask_ptr(mask, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_fwd_cpp",
                                  [&] { grn_fwd_typed<scalar_t>(x, gamma, beta, m, eps, y); });
}

void grn_bwd_cpp(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
                 const std::optional<at::Tensor>& mask, double eps, at::Tensor dx, at::Tensor dgamma,
                 at::Tensor dbeta) {
  const Dims d = dims_of(x);
  check_buffer(dy, x.scalar_type(), x.numel(), "dy");
  check_buffer(gamma, opmath_of(x), d.C, "gamma");
  check_buffer(dx, x.scalar_type(), x.numel(), "dx");
  check_buffer(dgamma, opmath_of(x), d.C, "dgamma");
  check_buffer(dbeta, opmath_of(x), d.C, "dbeta");
  const bool* m = mask_ptr(mask, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_bwd_cpp",
                                  [&] { grn_bwd_typed<scalar_t>(dy, x, gamma, m, eps, dx, dgamma, dbeta); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kfe, m) {
  m.def("_grn_fwd_cpp(Tensor x, Tensor gamma, Tensor beta, Tensor? mask, float eps, Tensor(a!) y) -> ()");
  m.def("_grn_bwd_cpp(Tensor dy, Tensor x, Tensor gamma, Tensor? mask, float eps, Tensor(a!) dx,"
        " Tensor(b!) dgamma, Tensor(c!) dbeta) -> ()");
}

TORCH_LIBRARY_IMPL(kfe, CPU, m) {
  m.impl("_grn_fwd_cpp", &grn_fwd_cpp);
  m.impl("_grn_bwd_cpp", &grn_bwd_cpp);
}
