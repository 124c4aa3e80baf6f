// CUDA kernels of the zygote_torch custom ops (schemas: common.h; CPU kernels: ops_cpu.cpp).
//
// Design (bandwidth-bound ops; what each must move is read once, written once):
// - Row ops (layer_norm / rms_norm / softmax / log_softmax backward, cross-entropy forward): a row is
//   handled by `tpr` threads (a power of two, 32..1024), `rpb` rows per block; 16-byte vector
//   loads (Pack<T, 16 / sizeof(T)>) when the row length is a multiple of the vector width and the
//   pointers are 16-byte aligned, else scalar loads. The first MAXV vectors of each thread stay in
//   registers between the reduction and the write, so x and dy are read from memory once; longer
//   rows re-read the rest (from L2). Row sums: warp shuffles, then shared memory across warps, in
//   a fixed order (deterministic).
// - layer_norm / rms_norm dweight, dbias: a persistent grid (about 1024 threads per SM) loops over
//   rows, one row per block at a time; each thread owns fixed columns and accumulates their dw/db
//   in shared memory over all the rows its block visits; each block writes one partial row, and a
//   second small kernel sums the partials per column in order (two-stage, no atomics).
// - Cross-entropy backward: each block takes a tile of one row (lse and target per row are saved by
//   the forward): one read of the logits, one write of the gradient.
// - Elementwise (GELU, SiLU, SwiGLU): vectorised grid-stride loops.
// - Embedding backward: stable sort of the indices, then one warp per run of equal indices sums its
//   dy rows in order (deterministic, no atomics).
// Accumulation in float (double for double).
#include "cuda_common.cuh"

namespace zt {
namespace {

// ---------------------------------------------------------------------------------------------
// layer_norm / rms_norm backward

// dx = rstd * (g - c1 - xhat * c2),  g = dy * w;
//   layer_norm: xhat = (x - mean) * rstd, c1 = mean(g), c2 = mean(g * xhat);
//   rms_norm:   xhat = x * rstd,          c1 = 0,       c2 = mean(g * xhat)  (rstd recomputed
//               as 1 / sqrt(mean(x^2) + eps) when not given);
// dw += dy * xhat, db += dy (layer_norm only), per block, for all the rows the block visits.
//
// One row per block (tpr threads), a persistent grid. Thread `tid` owns the vectors j = tid +
// k * tpr of every row, so it alone updates their dw/db accumulators: these live in shared memory
// (layout [VEC][nvec], conflict-free), or, when a row is too long for shared memory, in the
// block's own partial row in global memory (zeroed by the host). At the end each block stores its
// accumulators as one partial row part[a][blockIdx.x][VEC * nvec] (same layout), and
// column_sum_kernel adds the partial rows up, in order.
template <typename T, int VEC, int MAXV, bool RMS>
__global__ void __launch_bounds__(1024) norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                        const acc_t<T>* __restrict__ mean,
                                                        const acc_t<T>* __restrict__ rstd, const T* __restrict__ w,
                                                        T* __restrict__ dx, acc_t<T>* __restrict__ part, int64_t M,
                                                        int N, acc_t<T> eps, int64_t P, bool smem_acc) {
  using A = acc_t<T>;
  using PK = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);
  const int tid = threadIdx.x, tpr = blockDim.x;
  const int nvec = N / VEC;
  const A invN = A(1) / A(N);
  A* pw = part + blockIdx.x * static_cast<int64_t>(N);
  A* pb = part + (P + blockIdx.x) * static_cast<int64_t>(N);
  A* accw = smem_acc ? red + 2 * (tpr / 32) : pw;
  A* accb = smem_acc ? accw + N : pb;
  if (smem_acc) {
    for (int c = tid; c < N; c += tpr) {
      accw[c] = A(0);
      if (!RMS) accb[c] = A(0);
    }
    __syncthreads();
  }
  const PK* wr = reinterpret_cast<const PK*>(w);

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const PK* xr = reinterpret_cast<const PK*>(x + row * N);
    const PK* gr = reinterpret_cast<const PK*>(dy + row * N);
    PK* dr = reinterpret_cast<PK*>(dx + row * N);
    PK xc[MAXV], gc[MAXV];
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = k * tpr + tid;
      if (j < nvec) {
        xc[k] = xr[j];
        gc[k] = gr[j];
      }
    }
    const A mu = RMS ? A(0) : mean[row];
    A rs = rstd != nullptr ? rstd[row] : A(0);
    A s[2] = {A(0), A(0)};
    auto accum = [&](const PK& xp, const PK& gp, int j) {
      PK wp;
      if (w != nullptr) wp = wr[j];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A xv = static_cast<A>(xp.v[e]);
        const A g = static_cast<A>(gp.v[e]) * (w != nullptr ? static_cast<A>(wp.v[e]) : A(1));
        if (RMS) {
          s[0] += xv * xv;
          s[1] += g * xv;
        } else {
          s[0] += g;
          s[1] += g * ((xv - mu) * rs);
        }
      }
    };
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = k * tpr + tid;
      if (j < nvec) accum(xc[k], gc[k], j);
    }
    for (int j = MAXV * tpr + tid; j < nvec; j += tpr) accum(xr[j], gr[j], j);
    row_sum<A, 2>(s, red);
    A c1, c2;
    if (RMS) {
      if (rstd == nullptr) rs = d_rsqrt(s[0] * invN + eps);
      c1 = A(0);
      c2 = s[1] * invN * rs;  // mean(g * xhat) = rstd * mean(g * x)
    } else {
      c1 = s[0] * invN;
      c2 = s[1] * invN;
    }
    auto emit = [&](const PK& xp, const PK& gp, int j) {
      PK wp, o;
      if (w != nullptr) wp = wr[j];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A xv = static_cast<A>(xp.v[e]);
        const A d = static_cast<A>(gp.v[e]);
        const A g = d * (w != nullptr ? static_cast<A>(wp.v[e]) : A(1));
        const A xh = RMS ? xv * rs : (xv - mu) * rs;
        o.v[e] = static_cast<T>(rs * (g - c1 - xh * c2));
        accw[e * nvec + j] += d * xh;
        if (!RMS) accb[e * nvec + j] += d;
      }
      dr[j] = o;
    };
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = k * tpr + tid;
      if (j < nvec) emit(xc[k], gc[k], j);
    }
    for (int j = MAXV * tpr + tid; j < nvec; j += tpr) emit(xr[j], gr[j], j);
  }
  if (smem_acc) {
    __syncthreads();
    for (int c = tid; c < N; c += tpr) {
      pw[c] = accw[c];
      if (!RMS) pb[c] = accb[c];
    }
  }
}

// out[a][(i % nvec) * VEC + i / nvec] = sum_p part[a][p][i] in order of p (the [VEC][nvec] layout
// back to columns). Block (32, 32), grid (ceil(N / 32), arrays).
template <typename A>
__global__ void __launch_bounds__(1024) column_sum_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t P,
                                                          int N, int nvec) {
  __shared__ A sm[32][33];
  const A* src = part + blockIdx.y * P * N;
  const int i = blockIdx.x * 32 + threadIdx.x;
  A s = 0;
  if (i < N)
    for (int64_t p = threadIdx.y; p < P; p += 32) s += src[p * N + i];
  sm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && i < N) {
    A t = 0;
    for (int k = 0; k < 32; ++k) t += sm[k][threadIdx.x];
    out[blockIdx.y * static_cast<int64_t>(N) + (i % nvec) * (N / nvec) + i / nvec] = t;
  }
}

template <typename T, int VEC, int MAXV, bool RMS>
void launch_norm_vm(const T* dy, const T* x, const acc_t<T>* mean, const acc_t<T>* rstd, const T* w, T* dx,
                    at::Tensor& out, int64_t M, int N, double eps, const at::TensorOptions& aopts) {
  using A = acc_t<T>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int nacc = RMS ? 1 : 2;
  const int64_t nvec = N / VEC;
  const int tpr = clampi(pow2ceil((nvec + MAXV - 1) / MAXV), 32, 1024);
  auto kernel = norm_bwd_kernel<T, VEC, MAXV, RMS>;
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t red_bytes = sizeof(A) * 2 * (tpr / 32);
  const size_t acc_bytes = sizeof(A) * static_cast<size_t>(nacc) * N;
  const bool smem_acc = red_bytes + acc_bytes + 1024 <= static_cast<size_t>(optin);
  const size_t smem = red_bytes + (smem_acc ? acc_bytes : 0);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, tpr, smem));
  // About 1024 threads per SM (ZYGOTE_TORCH_NORM_THREADS_PER_SM overrides, for tuning): enough
  // loads in flight, few partial rows.
  int threads_per_sm = 1024;
  if (const char* env = std::getenv("ZYGOTE_TORCH_NORM_THREADS_PER_SM")) threads_per_sm = std::max(32, std::atoi(env));
  per_sm = std::max(1, std::min(per_sm, std::max(1, threads_per_sm / tpr)));
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(M, static_cast<int64_t>(num_sms()) * per_sm));
  at::Tensor part = smem_acc ? at::empty({nacc, grid, N}, aopts) : at::zeros({nacc, grid, N}, aopts);
  kernel<<<static_cast<unsigned>(grid), tpr, smem, stream>>>(dy, x, mean, rstd, w, dx, part.mutable_data_ptr<A>(), M, N,
                                                              static_cast<A>(eps), grid, smem_acc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  column_sum_kernel<A><<<dim3((N + 31) / 32, nacc), dim3(32, 32), 0, stream>>>(
      part.const_data_ptr<A>(), out.mutable_data_ptr<A>(), grid, N, static_cast<int>(nvec));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool RMS>
void launch_norm(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& w,
                 Tensor& dx, Tensor& out, double eps) {
  using A = acc_t<T>;
  const int64_t M = x.size(0);
  const int N = static_cast<int>(x.size(1));
  const T* dyp = dy.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
  T* dxp = dx.mutable_data_ptr<T>();
  const A* mp = mean.defined() ? mean.const_data_ptr<A>() : nullptr;
  const A* rp = rstd.defined() ? rstd.const_data_ptr<A>() : nullptr;
  const auto aopts = x.options().dtype(out.scalar_type());
  constexpr int V = kVec<T>;
  const bool vec = N % V == 0 && aligned16(dyp) && aligned16(xp) && aligned16(dxp) && (wp == nullptr || aligned16(wp));
  // Two vectors per thread held in registers (rows up to 2048 vectors; longer rows re-read the
  // rest from L2), which keeps the kernel at <= 64 registers for 1024-thread occupancy.
  if (vec)
    launch_norm_vm<T, V, 2, RMS>(dyp, xp, mp, rp, wp, dxp, out, M, N, eps, aopts);
  else
    launch_norm_vm<T, 1, 2, RMS>(dyp, xp, mp, rp, wp, dxp, out, M, N, eps, aopts);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& dy_, const Tensor& x_, const Tensor& mean_,
                                                       const Tensor& rstd_, const c10::optional<Tensor>& weight_) {
  check_norm_bwd_args("layer_norm_bwd", dy_, x_);
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(N < (int64_t(1) << 30), "zygote_torch::layer_norm_bwd: row too long");
  TORCH_CHECK(mean_.numel() == M && rstd_.numel() == M, "zygote_torch::layer_norm_bwd: mean/rstd must have M elements");
  const bool has_w = weight_.has_value() && weight_->defined();
  if (has_w) {
    TORCH_CHECK(weight_->numel() == N && weight_->scalar_type() == x_.scalar_type() && weight_->device() == x_.device(),
                "zygote_torch::layer_norm_bwd: weight must have N elements, x's dtype and device");
  }
  c10::cuda::CUDAGuard guard(x_.device());
  const auto adt = x_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto x = x_.contiguous(), dy = dy_.contiguous();
  auto mean = mean_.to(x.device(), adt).contiguous(), rstd = rstd_.to(x.device(), adt).contiguous();
  Tensor w = has_w ? weight_->contiguous() : Tensor();
  auto dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto out = at::zeros({2, N}, x.options().dtype(adt));
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_bwd_cuda", [&] {
      launch_norm<scalar_t, false>(dy, x, mean, rstd, w, dx, out, 0.0);
    });
  }
  return {dx, out[0], out[1]};
}

std::tuple<Tensor, Tensor> rms_norm_bwd_cuda(const Tensor& dy_, const Tensor& x_, const c10::optional<Tensor>& rstd_,
                                             const c10::optional<Tensor>& weight_, double eps) {
  check_norm_bwd_args("rms_norm_bwd", dy_, x_);
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(N < (int64_t(1) << 30), "zygote_torch::rms_norm_bwd: row too long");
  const bool has_r = rstd_.has_value() && rstd_->defined();
  const bool has_w = weight_.has_value() && weight_->defined();
  if (has_r) TORCH_CHECK(rstd_->numel() == M, "zygote_torch::rms_norm_bwd: rstd must have M elements");
  if (has_w) {
    TORCH_CHECK(weight_->numel() == N && weight_->scalar_type() == x_.scalar_type() && weight_->device() == x_.device(),
                "zygote_torch::rms_norm_bwd: weight must have N elements, x's dtype and device");
  }
  c10::cuda::CUDAGuard guard(x_.device());
  const auto adt = x_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto x = x_.contiguous(), dy = dy_.contiguous();
  Tensor rstd = has_r ? rstd_->to(x.device(), adt).contiguous() : Tensor();
  Tensor w = has_w ? weight_->contiguous() : Tensor();
  auto dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto out = at::zeros({1, N}, x.options().dtype(adt));
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cuda", [&] {
      launch_norm<scalar_t, true>(dy, x, Tensor(), rstd, w, dx, out, eps);
    });
  }
  return {dx, out[0]};
}

// ---------------------------------------------------------------------------------------------
// softmax / log_softmax backward over the last dim of [M, N]
//   softmax:     dx = y * (dy - sum(dy * y))
//   log_softmax: dx = dy - exp(y) * sum(dy)

template <typename T, int VEC, int MAXV, bool LOG>
__global__ void __launch_bounds__(512) softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                                           T* __restrict__ dx, int64_t M, int N) {
  using A = acc_t<T>;
  using PK = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int tid = threadIdx.x, tpr = blockDim.x, nvec = N / VEC;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < M;
  const PK* yr = reinterpret_cast<const PK*>(y + row * N);
  const PK* gr = reinterpret_cast<const PK*>(dy + row * N);
  PK* dr = reinterpret_cast<PK*>(dx + row * N);
  PK yc[MAXV], gc[MAXV];
  A s[1] = {A(0)};
  if (active) {
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = k * tpr + tid;
      if (j < nvec) {
        yc[k] = yr[j];
        gc[k] = gr[j];
      }
    }
    auto accum = [&](const PK& yp, const PK& gp) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[0] += LOG ? static_cast<A>(gp.v[e]) : static_cast<A>(gp.v[e]) * static_cast<A>(yp.v[e]);
    };
#pragma unroll
    for (int k = 0; k < MAXV; ++k)
      if (k * tpr + tid < nvec) accum(yc[k], gc[k]);
    for (int j = MAXV * tpr + tid; j < nvec; j += tpr) accum(yr[j], gr[j]);
  }
  row_sum<A, 1>(s, smem);
  if (!active) return;
  const A sum = s[0];
  auto emit = [&](const PK& yp, const PK& gp, int j) {
    PK o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const A yv = static_cast<A>(yp.v[e]), g = static_cast<A>(gp.v[e]);
      o.v[e] = static_cast<T>(LOG ? g - d_exp(yv) * sum : yv * (g - sum));
    }
    dr[j] = o;
  };
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int j = k * tpr + tid;
    if (j < nvec) emit(yc[k], gc[k], j);
  }
  for (int j = MAXV * tpr + tid; j < nvec; j += tpr) emit(yr[j], gr[j], j);
}

template <typename T, int VEC, bool LOG>
void launch_softmax_v(const T* dy, const T* y, T* dx, int64_t M, int N) {
  using A = acc_t<T>;
  constexpr int MAXV = 4;
  const int64_t nvec = N / VEC;
  const int tpr = clampi(pow2ceil((nvec + MAXV - 1) / MAXV), 32, 512);
  const int rpb = std::max(1, 256 / tpr);
  const size_t smem = sizeof(A) * static_cast<size_t>(rpb) * (tpr / 32);
  const int64_t grid = (M + rpb - 1) / rpb;
  softmax_bwd_kernel<T, VEC, MAXV, LOG><<<static_cast<unsigned>(grid), dim3(tpr, rpb), smem,
                                          c10::cuda::getCurrentCUDAStream()>>>(dy, y, dx, M, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool LOG>
Tensor softmax_bwd_impl(const char* name, const Tensor& dy_, const Tensor& y_) {
  check_softmax_bwd_args(name, dy_, y_);
  const int64_t M = y_.size(0), N = y_.size(1);
  TORCH_CHECK(N < (int64_t(1) << 30) && M < (int64_t(1) << 31), "zygote_torch::", name, ": tensor too large");
  c10::cuda::CUDAGuard guard(y_.device());
  auto y = y_.contiguous(), dy = dy_.contiguous();
  auto dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (M == 0 || N == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "softmax_bwd_cuda", [&] {
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    constexpr int V = kVec<scalar_t>;
    if (N % V == 0 && aligned16(gp) && aligned16(yp) && aligned16(dp))
      launch_softmax_v<scalar_t, V, LOG>(gp, yp, dp, M, static_cast<int>(N));
    else
      launch_softmax_v<scalar_t, 1, LOG>(gp, yp, dp, M, static_cast<int>(N));
  });
  return dx;
}

Tensor softmax_bwd_cuda(const Tensor& dy, const Tensor& y) { return softmax_bwd_impl<false>("softmax_bwd", dy, y); }
Tensor log_softmax_bwd_cuda(const Tensor& dy, const Tensor& y) {
  return softmax_bwd_impl<true>("log_softmax_bwd", dy, y);
}

}  // namespace

TORCH_LIBRARY_IMPL(zygote_torch, CUDA, m) {
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
  m.impl("softmax_bwd", &softmax_bwd_cuda);
  m.impl("log_softmax_bwd", &log_softmax_bwd_cuda);
}

}  // namespace zt
