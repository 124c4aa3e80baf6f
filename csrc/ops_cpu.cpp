// CPU entry points of the zygote_torch custom ops, the op schemas (TORCH_LIBRARY) and the Python
// module init of the extension.
//
// Layout: every op takes contiguous row-major tensors (the Python wrappers reshape and call
// .contiguous()). The functions here check arguments, allocate the results and split rows (or
// elements) over threads with at::parallel_for; the arithmetic is in the vectorised kernels of
// ops_cpu_kernels.h (at::vec::Vectorized), compiled for the baseline instruction set here and
// for AVX2 / AVX512 in ops_cpu_avx2.cpp / ops_cpu_avx512.cpp; cpu_kernels() picks one at run
// time. Accumulation is in float for float / bfloat16 / half and in double for double.
//
// Reductions over rows (dweight, dbias of the norms) use a fixed number of row blocks that does
// not depend on the thread count, each with its own partial sum, then sum the partials in order:
// the results are deterministic.
#include <Python.h>

#include "ops_cpu_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common.h"

#define ZT_PRAGMA(x) _Pragma(x)

namespace zt {

// The kernels for this CPU: the widest instruction set that torch itself uses on it
// (at::get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ..., which follows ATEN_CPU_CAPABILITY)
// and that this build has and the CPU reports.
const CpuKernels& cpu_kernels() {
  static const CpuKernels* const table = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (cap == "AVX512" && avx512 && cpu_kernels_avx512()) return cpu_kernels_avx512();
    if ((cap == "AVX512" || cap == "AVX2") && avx2 && cpu_kernels_avx2()) return cpu_kernels_avx2();
#endif
    return cpu_kernels_default();
  }();
  return *table;
}

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

void check_cross_entropy_fwd_args(const Tensor& logits, const Tensor& target) {
  check_float("cross_entropy_fwd", logits);
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0),
              "zygote_torch::cross_entropy_fwd: expected logits [N, C] and target [N], got ", logits.sizes(), " and ",
              target.sizes());
}

void check_cross_entropy_bwd_args(const Tensor& grad, const Tensor& logits, const Tensor& target, const Tensor& lse) {
  check_float("cross_entropy_bwd", logits);
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0) &&
                  lse.numel() == logits.size(0),
              "zygote_torch::cross_entropy_bwd: expected logits [N, C], target [N], lse [N]");
  TORCH_CHECK(grad.numel() == 1 || grad.numel() == logits.size(0),
              "zygote_torch::cross_entropy_bwd: grad must have 1 or N elements, got ", grad.numel());
}

void check_norm_bwd_args(const char* op, const Tensor& dy, const Tensor& x) {
  check_float(op, x);
  check_same(op, dy, x);
  TORCH_CHECK(x.dim() == 2, "zygote_torch::", op, ": expected x [M, N], got ", x.sizes());
}

void check_softmax_bwd_args(const char* op, const Tensor& dy, const Tensor& y) {
  check_float(op, y);
  check_same(op, dy, y);
  TORCH_CHECK(y.dim() == 2, "zygote_torch::", op, ": expected [M, N], got ", y.sizes());
}

void check_embedding_bwd_args(const Tensor& dy, const Tensor& indices, int64_t num_weights) {
  check_float("embedding_bwd", dy);
  TORCH_CHECK(dy.dim() == 2 && indices.dim() == 1 && dy.size(0) == indices.size(0),
              "zygote_torch::embedding_bwd: expected dy [n, D] and indices [n]");
  TORCH_CHECK(num_weights >= 0, "zygote_torch::embedding_bwd: num_weights must be >= 0");
}

int gelu_mode(const std::string& approximate) {
  if (approximate == "none") return 0;
  if (approximate == "tanh") return 1;
  TORCH_CHECK(false, "zygote_torch::gelu_bwd: approximate must be 'none' or 'tanh', got '", approximate, "'");
}

namespace {

inline at::ScalarType acc_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline Dt dt_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kDouble: return Dt::F64;
    case at::kBFloat16: return Dt::BF16;
    case at::kHalf: return Dt::F16;
    default: TORCH_CHECK(false, "zygote_torch: unsupported dtype ", x.scalar_type());
  }
}

inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }
constexpr int64_t kGrainElems = 32768;

// Number of fixed row blocks for deterministic column reductions.
inline int64_t num_row_blocks(int64_t M, int64_t N) {
  int64_t p = std::min<int64_t>(64, std::max<int64_t>(1, (M * N) / 65536));
  return std::max<int64_t>(1, std::min(p, M));
}

// out[c] = sum_p part[p * N + c], in the order p = 0, 1, ...: the fixed-order sum of the row
// blocks' partial column sums (deterministic whatever the thread count).
template <typename acc>
void sum_row_blocks(const acc* part, int64_t P, int64_t N, acc* out) {
  at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
    std::copy(part + b, part + e, out + b);
    for (int64_t p = 1; p < P; ++p) {
      const acc* row = part + p * N;
ZT_PRAGMA("omp simd")
      for (int64_t c = b; c < e; ++c) out[c] += row[c];
    }
  });
}

void check_targets(const char* op, const Tensor& t, int64_t C, int64_t ignore_index) {
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t tg = tp[i];
    TORCH_CHECK(tg == ignore_index || (tg >= 0 && tg < C), "zygote_torch::", op, ": target ", tg,
                " out of bounds [0, ", C, ")");
  }
}

// -------------------------------------------------------------------------------------------
// cross-entropy (rows of [N, C] logits)

std::tuple<Tensor, Tensor> cross_entropy_fwd_cpu(const Tensor& logits_, const Tensor& target_, int64_t ignore_index,
                                                 double smoothing) {
  check_cross_entropy_fwd_args(logits_, target_);
  auto x = logits_.contiguous();
  auto t = target_.to(at::kLong).contiguous();
  const int64_t M = x.size(0), C = x.size(1);
  check_targets("cross_entropy_fwd", t, C, ignore_index);
  auto loss = at::empty({M}, x.options().dtype(acc_dtype(x)));
  auto lse = at::empty({M}, x.options().dtype(acc_dtype(x)));
  const CpuKernels& k = cpu_kernels();
  const Dt dt = dt_of(x);
  const void* xp = x.const_data_ptr();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  void* lp = loss.mutable_data_ptr();
  void* sp = lse.mutable_data_ptr();
  at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
    k.cross_entropy_fwd(dt, xp, tp, lp, sp, C, ignore_index, smoothing, b, e);
  });
  return {loss, lse};
}

Tensor cross_entropy_bwd_cpu(const Tensor& grad_, const Tensor& logits_, const Tensor& target_, const Tensor& lse_,
                             int64_t ignore_index, double smoothing) {
  check_cross_entropy_bwd_args(grad_, logits_, target_, lse_);
  const int64_t M = logits_.size(0), C = logits_.size(1);
  auto x = logits_.contiguous();
  auto t = target_.to(at::kLong).contiguous();
  check_targets("cross_entropy_bwd", t, C, ignore_index);
  auto lse = lse_.to(acc_dtype(x)).contiguous();
  auto g = grad_.to(acc_dtype(x)).contiguous();
  const bool per_row = grad_.numel() == M && M != 1;
  auto dx = at::empty_like(x);
  const CpuKernels& k = cpu_kernels();
  const Dt dt = dt_of(x);
  const void* xp = x.const_data_ptr();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const void* lp = lse.const_data_ptr();
  const void* gp = g.const_data_ptr();
  void* dp = dx.mutable_data_ptr();
  at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
    k.cross_entropy_bwd(dt, xp, tp, lp, gp, per_row, dp, C, ignore_index, smoothing, b, e);
  });
  return dx;
}

// -------------------------------------------------------------------------------------------
// layer_norm / rms_norm backward. Rows are split into P fixed blocks (independent of the thread
// count), each with its own partial dweight / dbias row, summed in block order afterwards.

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w,  xhat = (x - mean) * rstd;
// dw = sum_rows(dy * xhat),  db = sum_rows(dy).
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy_, const Tensor& x_, const Tensor& mean_,
                                                      const Tensor& rstd_, const c10::optional<Tensor>& weight_) {
  check_norm_bwd_args("layer_norm_bwd", dy_, x_);
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(mean_.numel() == M && rstd_.numel() == M, "zygote_torch::layer_norm_bwd: mean/rstd must have M elements");
  const bool has_w = weight_.has_value() && weight_->defined();
  if (has_w) {
    TORCH_CHECK(weight_->numel() == N && weight_->scalar_type() == x_.scalar_type(),
                "zygote_torch::layer_norm_bwd: weight must have N elements and x's dtype");
  }
  auto x = x_.contiguous(), dy = dy_.contiguous();
  const auto acc = acc_dtype(x);
  auto mean = mean_.to(acc).contiguous(), rstd = rstd_.to(acc).contiguous();
  Tensor w = has_w ? weight_->to(acc).contiguous() : Tensor();
  auto dx = at::empty_like(x);
  const int64_t P = num_row_blocks(M, N);
  auto part = at::zeros({2, P, N}, x.options().dtype(acc));
  auto dw = at::empty({N}, x.options().dtype(acc));
  auto db = at::empty({N}, x.options().dtype(acc));
  const CpuKernels& k = cpu_kernels();
  const Dt dt = dt_of(x);
  const int64_t rows_per = (M + P - 1) / P;
  const size_t esz = acc == at::kDouble ? sizeof(double) : sizeof(float);
  char* pw = static_cast<char*>(part.mutable_data_ptr());
  char* pb = pw + P * N * esz;
  const void *gp = dy.const_data_ptr(), *xp = x.const_data_ptr(), *mp = mean.const_data_ptr(),
             *rp = rstd.const_data_ptr(), *wp = has_w ? w.const_data_ptr() : nullptr;
  void* dxp = dx.mutable_data_ptr();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      k.layer_norm_bwd(dt, gp, xp, mp, rp, wp, dxp, pw + p * N * esz, pb + p * N * esz, N, p * rows_per,
                       std::min(M, (p + 1) * rows_per));
    }
  });
  AT_DISPATCH_FLOATING_TYPES(acc, "layer_norm_bwd_cpu", [&] {
    const scalar_t* parts = part.const_data_ptr<scalar_t>();
    sum_row_blocks(parts, P, N, dw.mutable_data_ptr<scalar_t>());
    sum_row_blocks(parts + P * N, P, N, db.mutable_data_ptr<scalar_t>());
  });
  return {dx, dw, db};
}

// rstd = 1 / sqrt(mean(x^2) + eps) (recomputed when not given);  xhat = x * rstd,  g = dy * w;
// dx = rstd * (g - xhat * mean(g * xhat));  dw = sum_rows(dy * xhat).
std::tuple<Tensor, Tensor> rms_norm_bwd_cpu(const Tensor& dy_, const Tensor& x_, const c10::optional<Tensor>& rstd_,
                                            const c10::optional<Tensor>& weight_, double eps) {
  check_norm_bwd_args("rms_norm_bwd", dy_, x_);
  const int64_t M = x_.size(0), N = x_.size(1);
  const bool has_r = rstd_.has_value() && rstd_->defined();
  const bool has_w = weight_.has_value() && weight_->defined();
  if (has_r) TORCH_CHECK(rstd_->numel() == M, "zygote_torch::rms_norm_bwd: rstd must have M elements");
  if (has_w) {
    TORCH_CHECK(weight_->numel() == N && weight_->scalar_type() == x_.scalar_type(),
                "zygote_torch::rms_norm_bwd: weight must have N elements and x's dtype");
  }
  auto x = x_.contiguous(), dy = dy_.contiguous();
  const auto acc = acc_dtype(x);
  Tensor rstd = has_r ? rstd_->to(acc).contiguous() : Tensor();
  Tensor w = has_w ? weight_->to(acc).contiguous() : Tensor();
  auto dx = at::empty_like(x);
  const int64_t P = num_row_blocks(M, N);
  auto part = at::zeros({P, N}, x.options().dtype(acc));
  auto dw = at::empty({N}, x.options().dtype(acc));
  const CpuKernels& k = cpu_kernels();
  const Dt dt = dt_of(x);
  const int64_t rows_per = (M + P - 1) / P;
  const size_t esz = acc == at::kDouble ? sizeof(double) : sizeof(float);
  char* pw = static_cast<char*>(part.mutable_data_ptr());
  const void *gp = dy.const_data_ptr(), *xp = x.const_data_ptr(), *rp = has_r ? rstd.const_data_ptr() : nullptr,
             *wp = has_w ? w.const_data_ptr() : nullptr;
  void* dxp = dx.mutable_data_ptr();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      k.rms_norm_bwd(dt, gp, xp, rp, wp, eps, dxp, pw + p * N * esz, N, p * rows_per, std::min(M, (p + 1) * rows_per));
    }
  });
  AT_DISPATCH_FLOATING_TYPES(acc, "rms_norm_bwd_cpu", [&] {
    sum_row_blocks(part.const_data_ptr<scalar_t>(), P, N, dw.mutable_data_ptr<scalar_t>());
  });
  return {dx, dw};
}

// -------------------------------------------------------------------------------------------
// softmax / log_softmax backward over the last dim of [M, N]

template <bool LOG>
Tensor softmax_bwd_impl(const char* name, const Tensor& dy_, const Tensor& y_) {
  check_softmax_bwd_args(name, dy_, y_);
  auto y = y_.contiguous(), dy = dy_.contiguous();
  const int64_t M = y.size(0), N = y.size(1);
  auto dx = at::empty_like(y);
  const CpuKernels& k = cpu_kernels();
  const Dt dt = dt_of(y);
  const void *gp = dy.const_data_ptr(), *yp = y.const_data_ptr();
  void* dp = dx.mutable_data_ptr();
  at::parallel_for(0, M, grain_rows(N), [&](int64_t b, int64_t e) { k.softmax_bwd(dt, LOG, gp, yp, dp, N, b, e); });
  return dx;
}

Tensor softmax_bwd_cpu(const Tensor& dy, const Tensor& y) { return softmax_bwd_impl<false>("softmax_bwd", dy, y); }
Tensor log_softmax_bwd_cpu(const Tensor& dy, const Tensor& y) { return softmax_bwd_impl<true>("log_softmax_bwd", dy, y); }

// -------------------------------------------------------------------------------------------
// elementwise: GELU, SiLU, SwiGLU (parallel over ranges of elements)

template <typename F>
void parallel_elems(int64_t n, const F& f) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t b, int64_t e) { f(b, e); });
}

// out[i] = f(a[i], b[i]) over contiguous copies of a and b (same shape and dtype: the caller
// checks), the kernel run by launch(kernels, dtype, a, b, out, begin, end) on ranges of elements.
template <typename Launch>
Tensor elementwise2(const Tensor& a_, const Tensor& b_, const Launch& launch) {
  auto a = a_.contiguous(), b = b_.contiguous();
  auto out = at::empty_like(b);
  const CpuKernels& k = cpu_kernels();
  const Dt dt = dt_of(b);
  const void *ap = a.const_data_ptr(), *bp = b.const_data_ptr();
  void* op = out.mutable_data_ptr();
  parallel_elems(b.numel(), [&](int64_t s, int64_t e) { launch(k, dt, ap, bp, op, s, e); });
  return out;
}

// dx = dy * gelu'(x)
Tensor gelu_bwd_cpu(const Tensor& dy, const Tensor& x, std::string approximate) {
  check_float("gelu_bwd", x);
  check_same("gelu_bwd", dy, x);
  const int mode = gelu_mode(approximate);
  return elementwise2(dy, x, [mode](const CpuKernels& k, Dt dt, const void* gp, const void* xp, void* dp, int64_t s,
                                    int64_t e) { k.gelu_bwd(dt, mode, gp, xp, dp, s, e); });
}

// dx = dy * s * (1 + x * (1 - s)),  s = sigmoid(x)
Tensor silu_bwd_cpu(const Tensor& dy, const Tensor& x) {
  check_float("silu_bwd", x);
  check_same("silu_bwd", dy, x);
  return elementwise2(dy, x, [](const CpuKernels& k, Dt dt, const void* gp, const void* xp, void* dp, int64_t s,
                                int64_t e) { k.silu_bwd(dt, gp, xp, dp, s, e); });
}

// y = silu(a) * b
Tensor swiglu_fwd_cpu(const Tensor& a, const Tensor& b) {
  check_float("swiglu_fwd", a);
  check_same("swiglu_fwd", a, b);
  return elementwise2(a, b, [](const CpuKernels& k, Dt dt, const void* ap, const void* bp, void* yp, int64_t s,
                               int64_t e) { k.swiglu_fwd(dt, ap, bp, yp, s, e); });
}

// da = dy * b * silu'(a),  db = dy * silu(a)
std::tuple<Tensor, Tensor> swiglu_bwd_cpu(const Tensor& dy_, const Tensor& a_, const Tensor& b_) {
  check_float("swiglu_bwd", a_);
  check_same("swiglu_bwd", a_, b_);
  check_same("swiglu_bwd", dy_, a_);
  auto a = a_.contiguous(), b = b_.contiguous(), dy = dy_.contiguous();
  auto da = at::empty_like(a), db = at::empty_like(b);
  const CpuKernels& k = cpu_kernels();
  const Dt dt = dt_of(a);
  const void *gp = dy.const_data_ptr(), *ap = a.const_data_ptr(), *bp = b.const_data_ptr();
  void *dap = da.mutable_data_ptr(), *dbp = db.mutable_data_ptr();
  parallel_elems(a.numel(), [&](int64_t s, int64_t e) { k.swiglu_bwd(dt, gp, ap, bp, dap, dbp, s, e); });
  return {da, db};
}

// -------------------------------------------------------------------------------------------
// embedding backward: dW[w] = sum over positions k with indices[k] == w of dy[k] (in position
// order, accumulated in float), 0 for padding_idx. A counting sort groups positions by weight
// row; rows are then summed in parallel, each by one thread: deterministic.

Tensor embedding_bwd_cpu(const Tensor& dy_, const Tensor& indices_, int64_t num_weights, int64_t padding_idx) {
  check_embedding_bwd_args(dy_, indices_, num_weights);
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
  const CpuKernels& kt = cpu_kernels();
  const Dt dt = dt_of(dy);
  const void* gp = dy.const_data_ptr();
  void* op = dW.mutable_data_ptr();
  at::parallel_for(0, num_weights, grain_rows(D), [&](int64_t b, int64_t e) {
    kt.embedding_bwd(dt, gp, order.data(), offs.data(), op, D, padding_idx, b, e);
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

// The extension is a Python module so that importing it loads the library (and runs the
// registrations above). cpu_capability() names the instruction set of the CPU kernels in use
// ("avx512", "avx2" or "default"); replay_handler and replay_configure are csrc/replay.cpp's. Its
// name is set by setup.py (_C for the CPU build, _C_cuda for the build that also holds the CUDA
// kernels).
#ifndef ZT_EXT_NAME
#define ZT_EXT_NAME _C
#endif
#define ZT_CAT_(a, b) a##b
#define ZT_CAT(a, b) ZT_CAT_(a, b)
#define ZT_STR_(a) #a
#define ZT_STR(a) ZT_STR_(a)

static PyObject* zt_cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(zt::cpu_kernels().isa);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyMethodDef zt_methods[] = {
    {"cpu_capability", zt_cpu_capability, METH_NOARGS,
     "The instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'default'."},
    {nullptr, nullptr, 0, nullptr}};

namespace zt {
extern PyMethodDef replay_methods[];  // csrc/replay.cpp: the replay's recorder
}

extern "C" PyMODINIT_FUNC ZT_CAT(PyInit_, ZT_EXT_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, ZT_STR(ZT_EXT_NAME), "zygote_torch custom ops", -1,
                                   zt_methods};
  PyObject* module = PyModule_Create(&def);
  if (module != nullptr && PyModule_AddFunctions(module, zt::replay_methods) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
