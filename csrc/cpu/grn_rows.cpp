// kfe::grn_rows on the CPU: GRN on a sparse stage's rows (V, C), statistics per sample, sample n's
// rows being offsets[n]:offsets[n + 1] (any counts, empty samples included).
//
//   Gx[n,c] = ||x[rows of n, c]||_2,  D[n] = mean_c Gx[n,c] + eps,  y = x * (1 + gamma Gx / D) + beta
//
// One task per sample: a pass over its rows into (C,) sums in double, then the elementwise pass.
// The backward also writes per-sample dgamma / dbeta (N, C), summed over N in Python (fixed order).
// Python validates user input; the checks below only guard the raw-pointer contract.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

void check(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              "kfe grn_rows (cpp): ", name, " must be contiguous ", dtype, " with ", numel, " elements");
}

// mean_c Gx + eps, and Gx itself, from the per-channel sums of squares.
double denom_of(const std::vector<double>& sq, std::vector<double>& gx, double eps) {
  double total = 0;
  for (size_t c = 0; c < sq.size(); ++c) total += (gx[c] = std::sqrt(sq[c]));
  return total / static_cast<double>(sq.size()) + eps;
}

template <typename scalar_t>
void fwd_typed(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& gamma, const at::Tensor& beta,
               double eps, at::Tensor& y) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), N = offsets.numel() - 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const opmath_t* g = gamma.const_data_ptr<opmath_t>();
  const opmath_t* b = beta.const_data_ptr<opmath_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<double> sq(C), gx(C);
    std::vector<opmath_t> scale(C);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(sq.begin(), sq.end(), 0.0);
      for (int64_t r = off[n]; r < off[n + 1]; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const double v = static_cast<double>(static_cast<opmath_t>(xp[r * C + c]));
          sq[c] += v * v;
        }
      const double denom = denom_of(sq, gx, eps);
      for (int64_t c = 0; c < C; ++c) scale[c] = static_cast<opmath_t>(1.0 + g[c] * (gx[c] / denom));
      for (int64_t r = off[n]; r < off[n + 1]; ++r)
        for (int64_t c = 0; c < C; ++c)
          yp[r * C + c] = static_cast<scalar_t>(static_cast<opmath_t>(xp[r * C + c]) * scale[c] + b[c]);
    }
  });
}

template <typename scalar_t>
void bwd_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& gamma,
               double eps, at::Tensor& dx, at::Tensor& dgamma, at::Tensor& dbeta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), N = offsets.numel() - 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const opmath_t* g = gamma.const_data_ptr<opmath_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  opmath_t* dgp = dgamma.mutable_data_ptr<opmath_t>();  // (N, C)
  opmath_t* dbp = dbeta.mutable_data_ptr<opmath_t>();   // (N, C)
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<double> sq(C), s(C), sb(C), gx(C);
    std::vector<opmath_t> scale(C), shift(C);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(sq.begin(), sq.end(), 0.0);
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(sb.begin(), sb.end(), 0.0);
      for (int64_t r = off[n]; r < off[n + 1]; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const double v = static_cast<double>(static_cast<opmath_t>(xp[r * C + c]));
          const double d = static_cast<double>(static_cast<opmath_t>(dyp[r * C + c]));
          sq[c] += v * v;
          s[c] += d * v;
          sb[c] += d;
        }
      const double denom = denom_of(sq, gx, eps);
      double cross = 0;  // sum_c gamma s Gx
      for (int64_t c = 0; c < C; ++c) cross += g[c] * s[c] * gx[c];
      for (int64_t c = 0; c < C; ++c) {
        const double nx = gx[c] / denom;
        const double dgx = g[c] * s[c] / denom - cross / (denom * denom * static_cast<double>(C));
        scale[c] = static_cast<opmath_t>(1.0 + g[c] * nx);
        shift[c] = static_cast<opmath_t>(gx[c] > 0 ? dgx / gx[c] : 0.0);  // dGx/dx = x / Gx, 0 at Gx = 0
        dgp[n * C + c] = static_cast<opmath_t>(s[c] * nx);
        dbp[n * C + c] = static_cast<opmath_t>(sb[c]);
      }
      for (int64_t r = off[n]; r < off[n + 1]; ++r)
        for (int64_t c = 0; c < C; ++c)
          dxp[r * C + c] = static_cast<scalar_t>(static_cast<opmath_t>(dyp[r * C + c]) * scale[c] +
                                                 static_cast<opmath_t>(xp[r * C + c]) * shift[c]);
    }
  });
}

at::ScalarType opmath_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rows(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "kfe grn_rows (cpp): x must be contiguous (V, C)");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous(), "kfe grn_rows (cpp): offsets must be contiguous int64 (N + 1,)");
}

void grn_rows_fwd_cpp(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& gamma,
                      const at::Tensor& beta, double eps, at::Tensor y) {
  check_rows(x, offsets);
  const int64_t C = x.size(1);
  check(gamma, opmath_of(x), C, "gamma");
  check(beta, opmath_of(x), C, "beta");
  check(y, x.scalar_type(), x.numel(), "y");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_rows_fwd_cpp",
                                  [&] { fwd_typed<scalar_t>(x, offsets, gamma, beta, eps, y); });
}

void grn_rows_bwd_cpp(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& gamma,
                      double eps, at::Tensor dx, at::Tensor dgamma, at::Tensor dbeta) {
  check_rows(x, offsets);
  const int64_t C = x.size(1), N = offsets.numel() - 1;
  check(dy, x.scalar_type(), x.numel(), "dy");
  check(gamma, opmath_of(x), C, "gamma");
  check(dx, x.scalar_type(), x.numel(), "dx");
  check(dgamma, opmath_of(x), N * C, "dgamma");
  check(dbeta, opmath_of(x), N * C, "dbeta");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_rows_bwd_cpp",
                                  [&] { bwd_typed<scalar_t>(dy, x, offsets, gamma, eps, dx, dgamma, dbeta); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kfe, m) {
  m.def("_grn_rows_fwd_cpp(Tensor x, Tensor offsets, Tensor gamma, Tensor beta, float eps, Tensor(a!) y) -> ()");
  m.def("_grn_rows_bwd_cpp(Tensor dy, Tensor x, Tensor offsets, Tensor gamma, float eps, Tensor(a!) dx,"
        " Tensor(b!) dgamma, Tensor(c!) dbeta) -> ()");
}

TORCH_LIBRARY_IMPL(kfe, CPU, m) {
  m.impl("_grn_rows_fwd_cpp", &grn_rows_fwd_cpp);
  m.impl("_grn_rows_bwd_cpp", &grn_rows_bwd_cpp);
}
