// CUDA kernels of zygote_torch: cross-entropy forward/backward, GELU/SiLU/SwiGLU, embedding
// backward (the design notes are at the top of ops_cuda_rows.cu).
#include "cuda_common.cuh"

namespace zt {
namespace {

// ---------------------------------------------------------------------------------------------
// cross-entropy forward: per row, lse = log sum exp(x) (online max/sum in one pass), and
// loss = (1 - eps) (lse - x_t) + eps (lse - mean(x)), 0 for ignored rows.

template <typename A>
__device__ __forceinline__ void lse_merge(A& m, A& s, A m2, A s2) {
  const A mm = m > m2 ? m : m2;
  if (mm == neg_inf<A>()) {
    s = s + s2;
  } else {
    s = s * d_exp(m - mm) + s2 * d_exp(m2 - mm);
  }
  m = mm;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(1024) ce_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ target,
                                                      acc_t<T>* __restrict__ loss, acc_t<T>* __restrict__ lse,
                                                      int64_t M, int C, int64_t ignore_index, acc_t<T> eps) {
  using A = acc_t<T>;
  using PK = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int tid = threadIdx.x, tpr = blockDim.x, nvec = C / VEC;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < M;
  A m = neg_inf<A>(), s = A(0), sx = A(0);
  if (active) {
    const PK* xr = reinterpret_cast<const PK*>(x + row * C);
#pragma unroll 4
    for (int j = tid; j < nvec; j += tpr) {
      const PK p = xr[j];
      A v[VEC];
      A pm = neg_inf<A>();
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[e] = static_cast<A>(p.v[e]);
        pm = v[e] > pm ? v[e] : pm;
        sx += v[e];
      }
      if (pm > m) {
        s = (m == neg_inf<A>()) ? A(0) : s * d_exp(m - pm);
        m = pm;
      }
      if (m != neg_inf<A>()) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += d_exp(v[e] - m);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += (v[e] != v[e]) ? v[e] : A(0);  // NaN propagates
      }
    }
  }
  // reduce (m, s) with lse_merge and sx with +, over the row's threads
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const A s2 = __shfl_xor_sync(0xffffffffu, s, o);
    sx += __shfl_xor_sync(0xffffffffu, sx, o);
    lse_merge(m, s, m2, s2);
  }
  const int nw = tpr >> 5;
  if (nw > 1) {
    A* sm = smem + threadIdx.y * nw * 3;
    const int lane = tid & 31, wi = tid >> 5;
    if (lane == 0) {
      sm[wi * 3] = m;
      sm[wi * 3 + 1] = s;
      sm[wi * 3 + 2] = sx;
    }
    __syncthreads();
    if (tid == 0) {
      for (int i = 1; i < nw; ++i) {
        lse_merge(m, s, sm[i * 3], sm[i * 3 + 1]);
        sx += sm[i * 3 + 2];
      }
    }
  }
  if (!active || tid != 0) return;
  const A l = (m == neg_inf<A>()) ? m : m + d_log(s);
  lse[row] = l;
  const int64_t t = target[row];
  if (t == ignore_index) {
    loss[row] = A(0);
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < C && "zygote_torch::cross_entropy_fwd: target out of bounds");
  A li = (A(1) - eps) * (l - static_cast<A>(x[row * C + t]));
  if (eps > A(0)) li += eps * (l - sx / static_cast<A>(C));
  loss[row] = li;
}

template <typename T, int VEC>
void launch_ce_fwd(const T* x, const int64_t* t, acc_t<T>* loss, acc_t<T>* lse, int64_t M, int C, int64_t ignore,
                   double eps) {
  using A = acc_t<T>;
  const int64_t nvec = C / VEC;
  const int tpr = clampi(pow2ceil((nvec + 7) / 8), 32, 1024);
  const int rpb = std::max(1, 256 / tpr);
  const size_t smem = sizeof(A) * 3 * static_cast<size_t>(rpb) * (tpr / 32);
  const int64_t grid = (M + rpb - 1) / rpb;
  ce_fwd_kernel<T, VEC><<<static_cast<unsigned>(grid), dim3(tpr, rpb), smem, c10::cuda::getCurrentCUDAStream()>>>(
      x, t, loss, lse, M, C, ignore, static_cast<A>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> cross_entropy_fwd_cuda(const Tensor& logits_, const Tensor& target_, int64_t ignore_index,
                                                  double smoothing) {
  check_cross_entropy_fwd_args(logits_, target_);
  TORCH_CHECK(target_.device() == logits_.device(), "zygote_torch::cross_entropy_fwd: device mismatch");
  const int64_t M = logits_.size(0), C = logits_.size(1);
  TORCH_CHECK(C < (int64_t(1) << 30) && M < (int64_t(1) << 31), "zygote_torch::cross_entropy_fwd: tensor too large");
  c10::cuda::CUDAGuard guard(logits_.device());
  const auto adt = logits_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto x = logits_.contiguous();
  auto t = target_.to(at::kLong).contiguous();
  auto loss = at::empty({M}, x.options().dtype(adt));
  auto lse = at::empty({M}, x.options().dtype(adt));
  if (M == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_fwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    constexpr int V = kVec<scalar_t>;
    if (C % V == 0 && aligned16(xp))
      launch_ce_fwd<scalar_t, V>(xp, t.const_data_ptr<int64_t>(), loss.mutable_data_ptr<A>(),
                                 lse.mutable_data_ptr<A>(), M, static_cast<int>(C), ignore_index, smoothing);
    else
      launch_ce_fwd<scalar_t, 1>(xp, t.const_data_ptr<int64_t>(), loss.mutable_data_ptr<A>(),
                                 lse.mutable_data_ptr<A>(), M, static_cast<int>(C), ignore_index, smoothing);
  });
  return {loss, lse};
}

// ---------------------------------------------------------------------------------------------
// cross-entropy backward: dx = g (exp(x - lse) - eps / C) - [c == t] g (1 - eps); 0 for ignored
// rows. A block takes a tile of UNROLL * blockDim.x vectors of one row.

template <typename T, int VEC, int UNROLL>
__global__ void __launch_bounds__(256) ce_bwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ target,
                                                     const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ grad,
                                                     bool per_row, T* __restrict__ dx, int64_t M, int C,
                                                     int64_t tiles, int64_t ignore_index, acc_t<T> eps) {
  using A = acc_t<T>;
  using PK = Pack<T, VEC>;
  const int nvec = C / VEC;
  const A off = eps / static_cast<A>(C);
  for (int64_t b = blockIdx.x; b < M * tiles; b += gridDim.x) {
    const int64_t row = b / tiles;
    const int tile = static_cast<int>(b - row * tiles);
    const int64_t t = target[row];
    const bool ignored = t == ignore_index;
    if (!ignored) {
      CUDA_KERNEL_ASSERT(t >= 0 && t < C && "zygote_torch::cross_entropy_bwd: target out of bounds");
    }
    const A g = ignored ? A(0) : grad[per_row ? row : 0];
    const A l = lse[row];
    const A gt = g * (A(1) - eps);
    const PK* xr = reinterpret_cast<const PK*>(x + row * C);
    PK* dr = reinterpret_cast<PK*>(dx + row * C);
    const int j0 = tile * UNROLL * blockDim.x + threadIdx.x;
    PK buf[UNROLL];
    if (!ignored) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int j = j0 + u * blockDim.x;
        if (j < nvec) buf[u] = xr[j];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int j = j0 + u * blockDim.x;
      if (j < nvec) {
        PK o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (ignored) {
            o.v[e] = static_cast<T>(A(0));
          } else {
            A d = g * (d_exp(static_cast<A>(buf[u].v[e]) - l) - off);
            if (j * VEC + e == t) d -= gt;
            o.v[e] = static_cast<T>(d);
          }
        }
        dr[j] = o;
      }
    }
  }
}

template <typename T, int VEC>
void launch_ce_bwd(const T* x, const int64_t* t, const acc_t<T>* lse, const acc_t<T>* g, bool per_row, T* dx,
                   int64_t M, int C, int64_t ignore, double eps) {
  using A = acc_t<T>;
  constexpr int UNROLL = 4;
  const int64_t nvec = C / VEC;
  const int threads = clampi(pow2ceil((nvec + UNROLL - 1) / UNROLL), 32, 256);
  const int64_t tiles = std::max<int64_t>(1, (nvec + int64_t(threads) * UNROLL - 1) / (int64_t(threads) * UNROLL));
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(M * tiles, int64_t(1) << 30));
  ce_bwd_kernel<T, VEC, UNROLL><<<static_cast<unsigned>(grid), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x, t, lse, g, per_row, dx, M, C, tiles, ignore, static_cast<A>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor cross_entropy_bwd_cuda(const Tensor& grad_, const Tensor& logits_, const Tensor& target_, const Tensor& lse_,
                              int64_t ignore_index, double smoothing) {
  check_cross_entropy_bwd_args(grad_, logits_, target_, lse_);
  const int64_t M = logits_.size(0), C = logits_.size(1);
  TORCH_CHECK(C < (int64_t(1) << 30), "zygote_torch::cross_entropy_bwd: too many classes");
  c10::cuda::CUDAGuard guard(logits_.device());
  const auto adt = logits_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto x = logits_.contiguous();
  auto t = target_.to(x.device(), at::kLong).contiguous();
  auto lse = lse_.to(x.device(), adt).contiguous();
  auto g = grad_.to(x.device(), adt).contiguous();
  const bool per_row = grad_.numel() == M && M != 1;
  auto dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (M == 0 || C == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    constexpr int V = kVec<scalar_t>;
    if (C % V == 0 && aligned16(xp) && aligned16(dp))
      launch_ce_bwd<scalar_t, V>(xp, t.const_data_ptr<int64_t>(), lse.const_data_ptr<A>(), g.const_data_ptr<A>(),
                                 per_row, dp, M, static_cast<int>(C), ignore_index, smoothing);
    else
      launch_ce_bwd<scalar_t, 1>(xp, t.const_data_ptr<int64_t>(), lse.const_data_ptr<A>(), g.const_data_ptr<A>(),
                                 per_row, dp, M, static_cast<int>(C), ignore_index, smoothing);
  });
  return dx;
}

// ---------------------------------------------------------------------------------------------
// elementwise: NIN inputs, NOUT outputs of one dtype, functor on accumulation-type values.

struct GeluGrad {  // (dy, x) -> dy * gelu'(x)
  int mode;
  template <typename A> __device__ __forceinline__ void operator()(const A* in, A* out) const {
    const A g = in[0], xv = in[1];
    A local;
    if (mode == 1) {
      const A k0 = A(0.7978845608028654), k1 = A(0.044715);
      const A x2 = xv * xv;
      const A t = d_tanh(k0 * (xv + k1 * x2 * xv));
      local = A(0.5) * (A(1) + t) + A(0.5) * xv * (A(1) - t * t) * (k0 * (A(1) + A(3) * k1 * x2));
    } else {
      local = A(0.5) * (A(1) + d_erf(xv * A(0.7071067811865476))) + xv * d_exp(A(-0.5) * xv * xv) * A(0.3989422804014327);
    }
    out[0] = g * local;
  }
};

struct SiluGrad {  // (dy, x) -> dy * s (1 + x (1 - s))
  template <typename A> __device__ __forceinline__ void operator()(const A* in, A* out) const {
    const A xv = in[1];
    const A s = A(1) / (A(1) + d_exp(-xv));
    out[0] = in[0] * s * (A(1) + xv * (A(1) - s));
  }
};

struct SwigluFwd {  // (a, b) -> silu(a) b
  template <typename A> __device__ __forceinline__ void operator()(const A* in, A* out) const {
    const A a = in[0];
    out[0] = a / (A(1) + d_exp(-a)) * in[1];
  }
};

struct SwigluGrad {  // (dy, a, b) -> (dy b silu'(a), dy silu(a))
  template <typename A> __device__ __forceinline__ void operator()(const A* in, A* out) const {
    const A g = in[0], a = in[1], b = in[2];
    const A s = A(1) / (A(1) + d_exp(-a));
    out[0] = g * b * s * (A(1) + a * (A(1) - s));
    out[1] = g * a * s;
  }
};

template <typename T, int VEC, int NIN, int NOUT, typename F>
__global__ void __launch_bounds__(256) elementwise_kernel(int64_t n, F f, const T* __restrict__ i0,
                                                          const T* __restrict__ i1, const T* __restrict__ i2,
                                                          T* __restrict__ o0, T* __restrict__ o1) {
  using A = acc_t<T>;
  using PK = Pack<T, VEC>;
  const T* ins[3] = {i0, i1, i2};
  T* outs[2] = {o0, o1};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nv = n / VEC;
  for (int64_t i = start; i < nv; i += stride) {
    PK p[NIN];
#pragma unroll
    for (int a = 0; a < NIN; ++a) p[a] = reinterpret_cast<const PK*>(ins[a])[i];
    PK q[NOUT];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      A in[NIN], out[NOUT];
#pragma unroll
      for (int a = 0; a < NIN; ++a) in[a] = static_cast<A>(p[a].v[e]);
      f(in, out);
#pragma unroll
      for (int a = 0; a < NOUT; ++a) q[a].v[e] = static_cast<T>(out[a]);
    }
#pragma unroll
    for (int a = 0; a < NOUT; ++a) reinterpret_cast<PK*>(outs[a])[i] = q[a];
  }
  for (int64_t i = nv * VEC + start; i < n; i += stride) {  // remainder, scalar
    A in[NIN], out[NOUT];
#pragma unroll
    for (int a = 0; a < NIN; ++a) in[a] = static_cast<A>(ins[a][i]);
    f(in, out);
#pragma unroll
    for (int a = 0; a < NOUT; ++a) outs[a][i] = static_cast<T>(out[a]);
  }
}

template <int NIN, int NOUT, typename F>
void launch_elementwise(const char* name, F f, const Tensor* ins, Tensor* outs) {
  const int64_t n = ins[0].numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ins[0].scalar_type(), "zygote_torch_elementwise_cuda", [&] {
    const scalar_t* ip[3] = {nullptr, nullptr, nullptr};
    scalar_t* op[2] = {nullptr, nullptr};
    bool al = true;
    for (int a = 0; a < NIN; ++a) {
      ip[a] = ins[a].const_data_ptr<scalar_t>();
      al = al && aligned16(ip[a]);
    }
    for (int a = 0; a < NOUT; ++a) {
      op[a] = outs[a].mutable_data_ptr<scalar_t>();
      al = al && aligned16(op[a]);
    }
    constexpr int V = kVec<scalar_t>;
    const int threads = 256;
    const int64_t units = al ? std::max<int64_t>(n / V, 1) : n;
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((units + threads - 1) / threads, int64_t(num_sms()) * 16));
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (al)
      elementwise_kernel<scalar_t, V, NIN, NOUT, F>
          <<<static_cast<unsigned>(grid), threads, 0, stream>>>(n, f, ip[0], ip[1], ip[2], op[0], op[1]);
    else
      elementwise_kernel<scalar_t, 1, NIN, NOUT, F>
          <<<static_cast<unsigned>(grid), threads, 0, stream>>>(n, f, ip[0], ip[1], ip[2], op[0], op[1]);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor gelu_bwd_cuda(const Tensor& dy_, const Tensor& x_, std::string approximate) {
  check_float("gelu_bwd", x_);
  check_same("gelu_bwd", dy_, x_);
  const int mode = gelu_mode(approximate);
  c10::cuda::CUDAGuard guard(x_.device());
  Tensor ins[2] = {dy_.contiguous(), x_.contiguous()};
  Tensor outs[1] = {at::empty_like(ins[1], at::MemoryFormat::Contiguous)};
  launch_elementwise<2, 1>("gelu_bwd_cuda", GeluGrad{mode}, ins, outs);
  return outs[0];
}

Tensor silu_bwd_cuda(const Tensor& dy_, const Tensor& x_) {
  check_float("silu_bwd", x_);
  check_same("silu_bwd", dy_, x_);
  c10::cuda::CUDAGuard guard(x_.device());
  Tensor ins[2] = {dy_.contiguous(), x_.contiguous()};
  Tensor outs[1] = {at::empty_like(ins[1], at::MemoryFormat::Contiguous)};
  launch_elementwise<2, 1>("silu_bwd_cuda", SiluGrad{}, ins, outs);
  return outs[0];
}

Tensor swiglu_fwd_cuda(const Tensor& a_, const Tensor& b_) {
  check_float("swiglu_fwd", a_);
  check_same("swiglu_fwd", a_, b_);
  c10::cuda::CUDAGuard guard(a_.device());
  Tensor ins[2] = {a_.contiguous(), b_.contiguous()};
  Tensor outs[1] = {at::empty_like(ins[0], at::MemoryFormat::Contiguous)};
  launch_elementwise<2, 1>("swiglu_fwd_cuda", SwigluFwd{}, ins, outs);
  return outs[0];
}

std::tuple<Tensor, Tensor> swiglu_bwd_cuda(const Tensor& dy_, const Tensor& a_, const Tensor& b_) {
  check_float("swiglu_bwd", a_);
  check_same("swiglu_bwd", a_, b_);
  check_same("swiglu_bwd", dy_, a_);
  c10::cuda::CUDAGuard guard(a_.device());
  Tensor ins[3] = {dy_.contiguous(), a_.contiguous(), b_.contiguous()};
  Tensor outs[2] = {at::empty_like(ins[1], at::MemoryFormat::Contiguous),
                    at::empty_like(ins[2], at::MemoryFormat::Contiguous)};
  launch_elementwise<3, 2>("swiglu_bwd_cuda", SwigluGrad{}, ins, outs);
  return {outs[0], outs[1]};
}

// ---------------------------------------------------------------------------------------------
// embedding backward: one warp per sorted position; the warp at the start of a run of equal
// indices sums the dy rows of the run in sorted (stable: original) order and writes the row.

template <typename T>
__global__ void __launch_bounds__(256) embedding_bwd_kernel(const T* __restrict__ dy,
                                                            const int64_t* __restrict__ sorted,
                                                            const int64_t* __restrict__ perm, T* __restrict__ out,
                                                            int64_t n, int D, int64_t num_weights,
                                                            int64_t padding_idx) {
  using A = acc_t<T>;
  constexpr int U = 4;
  const int64_t wid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (wid >= n) return;
  const int64_t w = sorted[wid];
  if (wid > 0 && sorted[wid - 1] == w) return;
  CUDA_KERNEL_ASSERT(w >= 0 && w < num_weights && "zygote_torch::embedding_bwd: index out of range");
  if (w == padding_idx) return;
  int64_t end = wid + 1;
  while (end < n && sorted[end] == w) ++end;
  for (int c0 = 0; c0 < D; c0 += 32 * U) {
    A s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) s[u] = A(0);
    for (int64_t k = wid; k < end; ++k) {
      const T* r = dy + perm[k] * D;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * 32 + lane;
        if (c < D) s[u] += static_cast<A>(r[c]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32 + lane;
      if (c < D) out[w * D + c] = static_cast<T>(s[u]);
    }
  }
}

Tensor embedding_bwd_cuda(const Tensor& dy_, const Tensor& indices_, int64_t num_weights, int64_t padding_idx) {
  check_embedding_bwd_args(dy_, indices_, num_weights);
  TORCH_CHECK(dy_.size(1) < (int64_t(1) << 30), "zygote_torch::embedding_bwd: rows too long");
  c10::cuda::CUDAGuard guard(dy_.device());
  auto dy = dy_.contiguous();
  const int64_t n = dy.size(0), D = dy.size(1);
  auto out = at::zeros({num_weights, D}, dy.options());
  if (n == 0 || D == 0) return out;
  auto idx = indices_.to(dy.device(), at::kLong).contiguous();
  auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto s = std::get<0>(sorted).contiguous();
  auto p = std::get<1>(sorted).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "embedding_bwd_cuda", [&] {
    const int threads = 256;
    const int64_t blocks = (n * 32 + threads - 1) / threads;
    TORCH_CHECK(blocks < (int64_t(1) << 31), "zygote_torch::embedding_bwd: too many indices");
    embedding_bwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dy.const_data_ptr<scalar_t>(), s.const_data_ptr<int64_t>(), p.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), n, static_cast<int>(D), num_weights, padding_idx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(zygote_torch, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("gelu_bwd", &gelu_bwd_cuda);
  m.impl("silu_bwd", &silu_bwd_cuda);
  m.impl("swiglu_fwd", &swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda);
  m.impl("embedding_bwd", &embedding_bwd_cuda);
}

}  // namespace zt
