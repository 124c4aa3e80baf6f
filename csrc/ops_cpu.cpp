// CPU kernels of the zygote_torch custom ops, the op schemas (TORCH_LIBRARY) and the Python
// module init of the extension.
//
// Layout: every kernel takes contiguous row-major tensors (the Python wrappers reshape and call
// .contiguous()). Rows are split over threads with at::parallel_for; inner loops are plain
// loops the compiler vectorises (`#pragma omp simd` for the reductions). Accumulation is in float
// for float / bfloat16 / half and in double for double.
//
// Reductions over rows (dweight, dbias of the norms) use a fixed number of row blocks that does
// not depend on the thread count, each with its own partial sum, then sum the partials in order:
// the results are deterministic.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

#define ZT_PRAGMA(x) _Pragma(x)

namespace zt {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

void check_same(const char* op, const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "zygote_torch::", op, ": shape mismatch ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "zygote_torch::", op, ": dtype mismatch ", a.scalar_type(),
              " vs ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "zygote_torch::", op, ": device mismatch");
}

void check_float(const char* op, const Tensor& a) {
  auto t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, "zygote_torch::", op,
              ": expected a float32/float64/bfloat16/float16 tensor, got ", t);
}

int gelu_mode(const std::string& approximate) {
  if (approximate == "none") return 0;
  if (approximate == "tanh") return 1;
  TORCH_CHECK(false, "zygote_torch::gelu_bwd: approximate must be 'none' or 'tanh', got '", approximate, "'");
}

namespace {

inline at::ScalarType acc_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }
constexpr int64_t kGrainElems = 32768;

// Number of fixed row blocks for deterministic column reductions.
inline int64_t num_row_blocks(int64_t M, int64_t N) {
  int64_t p = std::min<int64_t>(64, std::max<int64_t>(1, (M * N) / 65536));
  return std::max<int64_t>(1, std::min(p, M));
}

// -------------------------------------------------------------------------------------------
// cross-entropy

std::tuple<Tensor, Tensor> cross_entropy_fwd_cpu(const Tensor& logits_, const Tensor& target_, int64_t ignore_index,
                                                 double smoothing) {
  check_float("cross_entropy_fwd", logits_);
  TORCH_CHECK(logits_.dim() == 2 && target_.dim() == 1 && target_.size(0) == logits_.size(0),
              "zygote_torch::cross_entropy_fwd: expected logits [N, C] and target [N], got ", logits_.sizes(), " and ",
              target_.sizes());
  auto x = logits_.contiguous();
  auto t = target_.to(at::kLong).contiguous();
  const int64_t M = x.size(0), C = x.size(1);
  auto loss = at::empty({M}, x.options().dtype(acc_dtype(x)));
  auto lse = at::empty({M}, x.options().dtype(acc_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    acc* lp = loss.mutable_data_ptr<acc>();
    acc* sp = lse.mutable_data_ptr<acc>();
    const acc eps = static_cast<acc>(smoothing);
    at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xr = xp + i * C;
        acc m = -std::numeric_limits<acc>::infinity();
        for (int64_t c = 0; c < C; ++c) {
          acc v = static_cast<acc>(xr[c]);
          m = v > m ? v : m;
        }
        const acc shift = std::isinf(m) ? acc(0) : m;  // all -inf (or +inf) row: keep exp finite/NaN as torch
        // The row sums are accumulated in double: a row may have 10^5 classes.
        double s = 0, sx = 0;
ZT_PRAGMA("omp simd reduction(+ : s, sx)")
        for (int64_t c = 0; c < C; ++c) {
          acc v = static_cast<acc>(xr[c]);
          s += static_cast<double>(std::exp(v - shift));
          sx += static_cast<double>(v);
        }
        const acc l = static_cast<acc>(static_cast<double>(shift) + std::log(s));
        sp[i] = l;
        const int64_t tg = tp[i];
        if (tg == ignore_index) {
          lp[i] = 0;
          continue;
        }
        TORCH_CHECK(tg >= 0 && tg < C, "zygote_torch::cross_entropy_fwd: target ", tg, " out of bounds [0, ", C, ")");
        acc li = (1 - eps) * (l - static_cast<acc>(xr[tg]));
        if (eps > 0) li += eps * (l - static_cast<acc>(sx / static_cast<double>(C)));
        lp[i] = li;
      }
    });
  });
  return {loss, lse};
}

Tensor cross_entropy_bwd_cpu(const Tensor& grad_, const Tensor& logits_, const Tensor& target_, const Tensor& lse_,
                             int64_t ignore_index, double smoothing) {
  check_float("cross_entropy_bwd", logits_);
  TORCH_CHECK(logits_.dim() == 2 && target_.dim() == 1 && target_.size(0) == logits_.size(0) &&
                  lse_.numel() == logits_.size(0),
              "zygote_torch::cross_entropy_bwd: expected logits [N, C], target [N], lse [N]");
  const int64_t M = logits_.size(0), C = logits_.size(1);
  TORCH_CHECK(grad_.numel() == 1 || grad_.numel() == M,
              "zygote_torch::cross_entropy_bwd: grad must have 1 or N elements, got ", grad_.numel());
  auto x = logits_.contiguous();
  auto t = target_.to(at::kLong).contiguous();
  auto lse = lse_.to(acc_dtype(x)).contiguous();
  auto g = grad_.to(acc_dtype(x)).contiguous();
  const bool per_row = grad_.numel() == M && M != 1;
  auto dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const acc* lp = lse.const_data_ptr<acc>();
    const acc* gp = g.const_data_ptr<acc>();
    const acc eps = static_cast<acc>(smoothing);
    const acc off = eps / static_cast<acc>(C);
    at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xr = xp + i * C;
        scalar_t* dr = dp + i * C;
        const int64_t tg = tp[i];
        if (tg == ignore_index) {
          std::fill(dr, dr + C, scalar_t(0));
          continue;
        }
        TORCH_CHECK(tg >= 0 && tg < C, "zygote_torch::cross_entropy_bwd: target ", tg, " out of bounds [0, ", C, ")");
        const acc gi = gp[per_row ? i : 0];
        const acc l = lp[i];
        for (int64_t c = 0; c < C; ++c) dr[c] = static_cast<scalar_t>(gi * (std::exp(static_cast<acc>(xr[c]) - l) - off));
        dr[tg] = static_cast<scalar_t>(gi * (std::exp(static_cast<acc>(xr[tg]) - l) - off) - gi * (1 - eps));
      }
    });
  });
  return dx;
}

// -------------------------------------------------------------------------------------------
// layer_norm / rms_norm backward

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w,  xhat = (x - mean) * rstd;
// dw = sum_rows(dy * xhat),  db = sum_rows(dy).
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy_, const Tensor& x_, const Tensor& mean_,
                                                      const Tensor& rstd_, const c10::optional<Tensor>& weight_) {
  check_float("layer_norm_bwd", x_);
  check_same("layer_norm_bwd", dy_, x_);
  TORCH_CHECK(x_.dim() == 2, "zygote_torch::layer_norm_bwd: expected x [M, N], got ", x_.sizes());
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(mean_.numel() == M && rstd_.numel() == M, "zygote_torch::layer_norm_bwd: mean/rstd must have M elements");
  const bool has_w = weight_.has_value() && weight_->defined();
  if (has_w) {
    TORCH_CHECK(weight_->numel() == N && weight_->scalar_type() == x_.scalar_type(),
                "zygote_torch::layer_norm_bwd: weight must have N elements and x's dtype");
  }
  auto x = x_.contiguous(), dy = dy_.contiguous();
  auto mean = mean_.to(acc_dtype(x)).contiguous(), rstd = rstd_.to(acc_dtype(x)).contiguous();
  Tensor w = has_w ? weight_->contiguous() : Tensor();
  auto dx = at::empty_like(x);
  const int64_t P = num_row_blocks(M, N);
  auto part = at::zeros({2, P, N}, x.options().dtype(acc_dtype(x)));
  auto dw = at::empty({N}, x.options().dtype(acc_dtype(x)));
  auto db = at::empty({N}, x.options().dtype(acc_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.const_data_ptr<scalar_t>() : nullptr;
    const acc* mp = mean.const_data_ptr<acc>();
    const acc* rp = rstd.const_data_ptr<acc>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    acc* pw = part.mutable_data_ptr<acc>();
    acc* pb = pw + P * N;
    const acc invN = N > 0 ? acc(1) / static_cast<acc>(N) : acc(0);
    const int64_t rows_per = (M + P - 1) / P;
    at::parallel_for(0, P, 1, [&](int64_t pb0, int64_t pe0) {
      std::vector<acc> wbuf(N, acc(1));
      if (wp) for (int64_t c = 0; c < N; ++c) wbuf[c] = static_cast<acc>(wp[c]);
      const acc* wv = wbuf.data();
      for (int64_t p = pb0; p < pe0; ++p) {
        acc* dwp = pw + p * N;
        acc* dbp = pb + p * N;
        for (int64_t i = p * rows_per; i < std::min(M, (p + 1) * rows_per); ++i) {
          const scalar_t* xr = xp + i * N;
          const scalar_t* gr = gp + i * N;
          scalar_t* dr = dxp + i * N;
          const acc mu = mp[i], rs = rp[i];
          acc s1 = 0, s2 = 0;
ZT_PRAGMA("omp simd reduction(+ : s1, s2)")
          for (int64_t c = 0; c < N; ++c) {
            acc xh = (static_cast<acc>(xr[c]) - mu) * rs;
            acc g = static_cast<acc>(gr[c]) * wv[c];
            s1 += g;
            s2 += g * xh;
          }
          s1 *= invN;
          s2 *= invN;
ZT_PRAGMA("omp simd")
          for (int64_t c = 0; c < N; ++c) {
            acc xh = (static_cast<acc>(xr[c]) - mu) * rs;
            acc d = static_cast<acc>(gr[c]);
            dr[c] = static_cast<scalar_t>(rs * (d * wv[c] - s1 - xh * s2));
            dwp[c] += d * xh;
            dbp[c] += d;
          }
        }
      }
    });
    acc* dwo = dw.mutable_data_ptr<acc>();
    acc* dbo = db.mutable_data_ptr<acc>();
    at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        acc a = 0, bb = 0;
        for (int64_t p = 0; p < P; ++p) {
          a += pw[p * N + c];
          bb += pb[p * N + c];
        }
        dwo[c] = a;
        dbo[c] = bb;
      }
    });
  });
  return {dx, dw, db};
}

// rstd = 1 / sqrt(mean(x^2) + eps) (recomputed when not given);  xhat = x * rstd,  g = dy * w;
// dx = rstd * (g - xhat * mean(g * xhat));  dw = sum_rows(dy * xhat).
std::tuple<Tensor, Tensor> rms_norm_bwd_cpu(const Tensor& dy_, const Tensor& x_, const c10::optional<Tensor>& rstd_,
                                            const c10::optional<Tensor>& weight_, double eps) {
  check_float("rms_norm_bwd", x_);
  check_same("rms_norm_bwd", dy_, x_);
  TORCH_CHECK(x_.dim() == 2, "zygote_torch::rms_norm_bwd: expected x [M, N], got ", x_.sizes());
  const int64_t M = x_.size(0), N = x_.size(1);
  const bool has_r = rstd_.has_value() && rstd_->defined();
  const bool has_w = weight_.has_value() && weight_->defined();
  if (has_r) TORCH_CHECK(rstd_->numel() == M, "zygote_torch::rms_norm_bwd: rstd must have M elements");
  if (has_w) {
    TORCH_CHECK(weight_->numel() == N && weight_->scalar_type() == x_.scalar_type(),
                "zygote_torch::rms_norm_bwd: weight must have N elements and x's dtype");
  }
  auto x = x_.contiguous(), dy = dy_.contiguous();
  Tensor rstd = has_r ? rstd_->to(acc_dtype(x)).contiguous() : Tensor();
  Tensor w = has_w ? weight_->contiguous() : Tensor();
  auto dx = at::empty_like(x);
  const int64_t P = num_row_blocks(M, N);
  auto part = at::zeros({P, N}, x.options().dtype(acc_dtype(x)));
  auto dw = at::empty({N}, x.options().dtype(acc_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.const_data_ptr<scalar_t>() : nullptr;
    const acc* rp = has_r ? rstd.const_data_ptr<acc>() : nullptr;
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    acc* pw = part.mutable_data_ptr<acc>();
    const acc invN = N > 0 ? acc(1) / static_cast<acc>(N) : acc(0);
    const acc e = static_cast<acc>(eps);
    const int64_t rows_per = (M + P - 1) / P;
    at::parallel_for(0, P, 1, [&](int64_t pb0, int64_t pe0) {
      std::vector<acc> wbuf(N, acc(1));
      if (wp) for (int64_t c = 0; c < N; ++c) wbuf[c] = static_cast<acc>(wp[c]);
      const acc* wv = wbuf.data();
      for (int64_t p = pb0; p < pe0; ++p) {
        acc* dwp = pw + p * N;
        for (int64_t i = p * rows_per; i < std::min(M, (p + 1) * rows_per); ++i) {
          const scalar_t* xr = xp + i * N;
          const scalar_t* gr = gp + i * N;
          scalar_t* dr = dxp + i * N;
          acc ss = 0, sgx = 0;
ZT_PRAGMA("omp simd reduction(+ : ss, sgx)")
          for (int64_t c = 0; c < N; ++c) {
            acc xv = static_cast<acc>(xr[c]);
            ss += xv * xv;
            sgx += static_cast<acc>(gr[c]) * wv[c] * xv;
          }
          const acc rs = rp ? rp[i] : acc(1) / std::sqrt(ss * invN + e);
          const acc k = rs * rs * sgx * invN;  // mean(g * xhat) * rstd
ZT_PRAGMA("omp simd")
          for (int64_t c = 0; c < N; ++c) {
            acc xv = static_cast<acc>(xr[c]);
            acc d = static_cast<acc>(gr[c]);
            dr[c] = static_cast<scalar_t>(rs * (d * wv[c] - xv * k));
            dwp[c] += d * xv * rs;
          }
        }
      }
    });
    acc* dwo = dw.mutable_data_ptr<acc>();
    at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e2) {
      for (int64_t c = b; c < e2; ++c) {
        acc a = 0;
        for (int64_t p = 0; p < P; ++p) a += pw[p * N + c];
        dwo[c] = a;
      }
    });
  });
  return {dx, dw};
}

// -------------------------------------------------------------------------------------------
// softmax / log_softmax backward over the last dim of [M, N]

template <bool LOG>
Tensor softmax_bwd_impl(const char* name, const Tensor& dy_, const Tensor& y_) {
  check_float(name, y_);
  check_same(name, dy_, y_);
  TORCH_CHECK(y_.dim() == 2, "zygote_torch::", name, ": expected [M, N], got ", y_.sizes());
  auto y = y_.contiguous(), dy = dy_.contiguous();
  const int64_t M = y.size(0), N = y.size(1);
  auto dx = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "softmax_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, grain_rows(N), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* yr = yp + i * N;
        const scalar_t* gr = gp + i * N;
        scalar_t* dr = dp + i * N;
        acc s = 0;
        if (LOG) {
ZT_PRAGMA("omp simd reduction(+ : s)")
          for (int64_t c = 0; c < N; ++c) s += static_cast<acc>(gr[c]);
          for (int64_t c = 0; c < N; ++c)
            dr[c] = static_cast<scalar_t>(static_cast<acc>(gr[c]) - std::exp(static_cast<acc>(yr[c])) * s);
        } else {
ZT_PRAGMA("omp simd reduction(+ : s)")
          for (int64_t c = 0; c < N; ++c) s += static_cast<acc>(gr[c]) * static_cast<acc>(yr[c]);
ZT_PRAGMA("omp simd")
          for (int64_t c = 0; c < N; ++c)
            dr[c] = static_cast<scalar_t>(static_cast<acc>(yr[c]) * (static_cast<acc>(gr[c]) - s));
        }
      }
    });
  });
  return dx;
}

Tensor softmax_bwd_cpu(const Tensor& dy, const Tensor& y) { return softmax_bwd_impl<false>("softmax_bwd", dy, y); }
Tensor log_softmax_bwd_cpu(const Tensor& dy, const Tensor& y) { return softmax_bwd_impl<true>("log_softmax_bwd", dy, y); }

// -------------------------------------------------------------------------------------------
// elementwise: GELU, SiLU, SwiGLU

template <typename F>
void parallel_elems(int64_t n, const F& f) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t b, int64_t e) { f(b, e); });
}

template <typename acc>
inline acc gelu_grad(acc x, int mode) {
  if (mode == 1) {
    const acc k0 = acc(0.7978845608028654), k1 = acc(0.044715);
    const acc x2 = x * x;
    const acc t = std::tanh(k0 * (x + k1 * x2 * x));
    return acc(0.5) * (1 + t) + acc(0.5) * x * (1 - t * t) * (k0 * (1 + 3 * k1 * x2));
  }
  const acc cdf = acc(0.5) * (1 + std::erf(x * acc(0.7071067811865476)));
  const acc pdf = std::exp(acc(-0.5) * x * x) * acc(0.3989422804014327);
  return cdf + x * pdf;
}

// dx = dy * gelu'(x)
Tensor gelu_bwd_cpu(const Tensor& dy_, const Tensor& x_, std::string approximate) {
  check_float("gelu_bwd", x_);
  check_same("gelu_bwd", dy_, x_);
  const int mode = gelu_mode(approximate);
  auto x = x_.contiguous(), dy = dy_.contiguous();
  auto dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gelu_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    parallel_elems(x.numel(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        dp[i] = static_cast<scalar_t>(static_cast<acc>(gp[i]) * gelu_grad<acc>(static_cast<acc>(xp[i]), mode));
    });
  });
  return dx;
}

template <typename acc>
inline acc sigmoid(acc x) { return acc(1) / (acc(1) + std::exp(-x)); }

// dx = dy * s * (1 + x * (1 - s)),  s = sigmoid(x)
Tensor silu_bwd_cpu(const Tensor& dy_, const Tensor& x_) {
  check_float("silu_bwd", x_);
  check_same("silu_bwd", dy_, x_);
  auto x = x_.contiguous(), dy = dy_.contiguous();
  auto dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    parallel_elems(x.numel(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc xv = static_cast<acc>(xp[i]);
        const acc s = sigmoid(xv);
        dp[i] = static_cast<scalar_t>(static_cast<acc>(gp[i]) * s * (1 + xv * (1 - s)));
      }
    });
  });
  return dx;
}

// y = silu(a) * b
Tensor swiglu_fwd_cpu(const Tensor& a_, const Tensor& b_) {
  check_float("swiglu_fwd", a_);
  check_same("swiglu_fwd", a_, b_);
  auto a = a_.contiguous(), b = b_.contiguous();
  auto y = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "swiglu_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    parallel_elems(a.numel(), [&](int64_t s0, int64_t e) {
      for (int64_t i = s0; i < e; ++i) {
        const acc av = static_cast<acc>(ap[i]);
        yp[i] = static_cast<scalar_t>(av * sigmoid(av) * static_cast<acc>(bp[i]));
      }
    });
  });
  return y;
}

// da = dy * b * silu'(a),  db = dy * silu(a)
std::tuple<Tensor, Tensor> swiglu_bwd_cpu(const Tensor& dy_, const Tensor& a_, const Tensor& b_) {
  check_float("swiglu_bwd", a_);
  check_same("swiglu_bwd", a_, b_);
  check_same("swiglu_bwd", dy_, a_);
  auto a = a_.contiguous(), b = b_.contiguous(), dy = dy_.contiguous();
  auto da = at::empty_like(a), db = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "swiglu_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dap = da.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
    parallel_elems(a.numel(), [&](int64_t s0, int64_t e) {
      for (int64_t i = s0; i < e; ++i) {
        const acc av = static_cast<acc>(ap[i]), g = static_cast<acc>(gp[i]);
        const acc s = sigmoid(av);
        dap[i] = static_cast<scalar_t>(g * static_cast<acc>(bp[i]) * s * (1 + av * (1 - s)));
        dbp[i] = static_cast<scalar_t>(g * av * s);
      }
    });
  });
  return {da, db};
}

// -------------------------------------------------------------------------------------------
// embedding backward: dW[w] = sum over positions k with indices[k] == w of dy[k] (in position
// order, accumulated in float), 0 for padding_idx. A counting sort groups positions by weight
// row; rows are then summed in parallel, each by one thread: deterministic.

Tensor embedding_bwd_cpu(const Tensor& dy_, const Tensor& indices_, int64_t num_weights, int64_t padding_idx) {
  check_float("embedding_bwd", dy_);
  TORCH_CHECK(dy_.dim() == 2 && indices_.dim() == 1 && dy_.size(0) == indices_.size(0),
              "zygote_torch::embedding_bwd: expected dy [n, D] and indices [n]");
  TORCH_CHECK(num_weights >= 0, "zygote_torch::embedding_bwd: num_weights must be >= 0");
  auto dy = dy_.contiguous();
  auto idx = indices_.to(at::kLong).contiguous();
  const int64_t n = dy.size(0), D = dy.size(1);
  auto dW = at::empty({num_weights, D}, dy.options());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  std::vector<int64_t> offs(num_weights + 1, 0), order(n);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t w = ip[k];
    TORCH_CHECK(w >= 0 && w < num_weights, "zygote_torch::embedding_bwd: index ", w, " out of range [0, ",
                num_weights, ")");
    offs[w + 1]++;
  }
  for (int64_t w = 0; w < num_weights; ++w) offs[w + 1] += offs[w];
  {
    std::vector<int64_t> fill(offs.begin(), offs.end() - 1);
    for (int64_t k = 0; k < n; ++k) order[fill[ip[k]]++] = k;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "embedding_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* op = dW.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_weights, grain_rows(D), [&](int64_t b, int64_t e) {
      std::vector<acc> buf(D);
      for (int64_t w = b; w < e; ++w) {
        std::fill(buf.begin(), buf.end(), acc(0));
        if (w != padding_idx) {
          for (int64_t k = offs[w]; k < offs[w + 1]; ++k) {
            const scalar_t* gr = gp + order[k] * D;
ZT_PRAGMA("omp simd")
            for (int64_t c = 0; c < D; ++c) buf[c] += static_cast<acc>(gr[c]);
          }
        }
        scalar_t* orow = op + w * D;
        for (int64_t c = 0; c < D; ++c) orow[c] = static_cast<scalar_t>(buf[c]);
      }
    });
  });
  return dW;
}

}  // namespace

TORCH_LIBRARY(zygote_torch, m) {
  for (const char* s : kSchemas) m.def(s);
}

TORCH_LIBRARY_IMPL(zygote_torch, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("softmax_bwd", &softmax_bwd_cpu);
  m.impl("log_softmax_bwd", &log_softmax_bwd_cpu);
  m.impl("gelu_bwd", &gelu_bwd_cpu);
  m.impl("silu_bwd", &silu_bwd_cpu);
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
  m.impl("embedding_bwd", &embedding_bwd_cpu);
}

}  // namespace zt

// The extension is a Python module only so that importing it loads the library (and runs the
// registrations above); it has no Python-level functions. Its name is set by setup.py
// (_C for the CPU build, _C_cuda for the build that also holds the CUDA kernels).
#ifndef ZT_EXT_NAME
#define ZT_EXT_NAME _C
#endif
#define ZT_CAT_(a, b) a##b
#define ZT_CAT(a, b) ZT_CAT_(a, b)
#define ZT_STR_(a) #a
#define ZT_STR(a) ZT_STR_(a)

extern "C" PyMODINIT_FUNC ZT_CAT(PyInit_, ZT_EXT_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, ZT_STR(ZT_EXT_NAME), "zygote_torch custom ops", -1, nullptr};
  return PyModule_Create(&def);
}
