// The vectorised CPU kernels of the zygote_torch custom ops, compiled once per instruction set.
//
// Three translation units include this file, each compiling the same kernels with ATen's
// at::vec::Vectorized for one instruction set (in its own namespace, as ATen's own kernels do):
//
//   ops_cpu.cpp          no ZT_ISA_* macro: the build's baseline flags (x86-64: SSE2; any other
//                        architecture), at::vec's generic Vectorized; always present;
//   ops_cpu_avx2.cpp     ZT_ISA_AVX2:   AVX2 + FMA + F16C   (256-bit Vectorized);
//   ops_cpu_avx512.cpp   ZT_ISA_AVX512: AVX512 F/BW/VL/DQ   (512-bit Vectorized).
//
// The instruction set of the two variants is chosen in the source (`#pragma GCC target` below),
// not by compile flags, so the extension builds with one set of flags and loads on every CPU:
// ops_cpu.cpp picks the table of one variant at run time (cpu_kernels(): the widest one that
// both torch's own CPU capability, at::get_cpu_capability(), and the CPU allow; ATEN_CPU_CAPABILITY
// therefore selects ours as well). The variants need GCC on x86-64; elsewhere they compile to a
// null table and the baseline kernels run. Everything in a variant is local to it (anonymous
// namespace, inlined) but its table getter, so no function compiled for AVX2 / AVX512 can stand in
// for a baseline one at link time; its one static initializer is <iostream>'s, plain code.
//
// Kernel interface: raw pointers to contiguous row-major data, a dtype tag and a range of rows
// (or elements) [b, e); the caller (ops_cpu.cpp) checks arguments, allocates, and splits the
// range over threads with at::parallel_for. Arithmetic is in float for float / bfloat16 / half
// (bfloat16 / half are converted with at::vec::convert_to_float / convert_from_float) and in
// double for double. For float, exp is ATen's inline polynomial exp_u20 (see fast_exp) and GELU's
// erf a 1.5e-7 approximation; for double, SLEEF's 1-ulp exp / erf / log.
#pragma once

#if (defined(ZT_ISA_AVX2) || defined(ZT_ISA_AVX512)) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__x86_64__)
#define ZT_ISA_VARIANT 1
// The instruction set of this translation unit, before any header: every function defined below
// (ATen's Vectorized<T> included) is compiled for it. GCC does not update the __AVX*__ macros of
// the preprocessor for the pragma; ATen's vec headers select their implementation with
// CPU_CAPABILITY_*, and only <sleef.h> reads __AVX__ / __AVX2__ / __AVX512F__ (to declare the
// vector functions), so those are set around it alone.
// (GCC 12 warns of `__Y` "maybe uninitialized" inside its own AVX512 intrinsics, a false positive
// that torch's build also silences; and of the ABI of vector arguments, which stay internal.)
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(ZT_ISA_AVX512)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define ZT_ISA_NS isa_avx512
#define ZT_ISA_NAME "avx512"
#else
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define ZT_ISA_NS isa_avx2
#define ZT_ISA_NAME "avx2"
#endif
#if !defined(__AVX__)
#define __AVX__ 1
#define ZT_UNDEF_AVX
#endif
#if !defined(__AVX2__)
#define __AVX2__ 1
#define ZT_UNDEF_AVX2
#endif
#if defined(ZT_ISA_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define ZT_UNDEF_AVX512F
#endif
#include <sleef.h>
#ifdef ZT_UNDEF_AVX
#undef __AVX__
#endif
#ifdef ZT_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef ZT_UNDEF_AVX512F
#undef __AVX512F__
#endif
#elif defined(ZT_ISA_AVX2) || defined(ZT_ISA_AVX512)
#define ZT_ISA_DISABLED 1  // not GCC on x86-64: this variant is compiled out
#else
#define ZT_ISA_NS isa_default
#define ZT_ISA_NAME "default"
#endif

#include <cstdint>

namespace zt {

// The dtype of a kernel's floating-point tensors.
enum class Dt { F32, F64, BF16, F16 };

// One instruction set's kernels. Row kernels take rows [b, e) of [M, N] (C for cross-entropy);
// elementwise kernels take elements [b, e). "acc" is float (double for Dt::F64).
struct CpuKernels {
  const char* isa;
  // lse_i = log sum_c exp(x_ic);  loss_i = (1 - eps)(lse_i - x_{i,t_i}) + eps (lse_i - mean_c x_ic),
  // 0 where t_i == ignore (targets already checked). loss, lse: acc [M].
  void (*cross_entropy_fwd)(Dt, const void* x, const int64_t* t, void* loss, void* lse, int64_t C, int64_t ignore,
                            double eps, int64_t b, int64_t e);
  // dx_i = g_i (exp(x_i - lse_i) - eps / C) - g_i (1 - eps) onehot(t_i), 0 where t_i == ignore.
  // lse, g: acc; g has M entries when per_row, else one.
  void (*cross_entropy_bwd)(Dt, const void* x, const int64_t* t, const void* lse, const void* g, bool per_row,
                            void* dx, int64_t C, int64_t ignore, double eps, int64_t b, int64_t e);
  // dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w, xhat = (x - mean) rstd;
  // dw_part += dy xhat, db_part += dy (acc [N] partial sums of this row block). w: acc [N] or null.
  void (*layer_norm_bwd)(Dt, const void* dy, const void* x, const void* mean, const void* rstd, const void* w,
                         void* dx, void* dw_part, void* db_part, int64_t N, int64_t b, int64_t e);
  // rstd = 1 / sqrt(mean(x^2) + eps) when rstd is null; dx = rstd (g - xhat mean(g xhat));
  // dw_part += dy xhat. w: acc [N] or null.
  void (*rms_norm_bwd)(Dt, const void* dy, const void* x, const void* rstd, const void* w, double eps, void* dx,
                       void* dw_part, int64_t N, int64_t b, int64_t e);
  // softmax: dx = y (dy - sum(dy y));  log_softmax: dx = dy - exp(y) sum(dy)   (per row)
  void (*softmax_bwd)(Dt, bool log, const void* dy, const void* y, void* dx, int64_t N, int64_t b, int64_t e);
  // dx = dy gelu'(x); mode 0: exact (erf), 1: tanh approximation
  void (*gelu_bwd)(Dt, int mode, const void* dy, const void* x, void* dx, int64_t b, int64_t e);
  // dx = dy s (1 + x (1 - s)), s = sigmoid(x)
  void (*silu_bwd)(Dt, const void* dy, const void* x, void* dx, int64_t b, int64_t e);
  // y = a sigmoid(a) b
  void (*swiglu_fwd)(Dt, const void* a, const void* bb, void* y, int64_t b, int64_t e);
  // da = dy b silu'(a), db = dy silu(a)
  void (*swiglu_bwd)(Dt, const void* dy, const void* a, const void* bb, void* da, void* db, int64_t b, int64_t e);
  // dW[w] = sum of dy[order[k]] for k in [offs[w], offs[w + 1]) in that order (acc), for weight
  // rows w in [b, e); 0 for w == padding_idx.
  void (*embedding_bwd)(Dt, const void* dy, const int64_t* order, const int64_t* offs, void* dW, int64_t D,
                        int64_t padding_idx, int64_t b, int64_t e);
};

// The table of each translation unit; nullptr for a variant that was compiled out.
const CpuKernels* cpu_kernels_default();
const CpuKernels* cpu_kernels_avx2();
const CpuKernels* cpu_kernels_avx512();

}  // namespace zt

#if defined(ZT_ISA_DISABLED)

namespace zt {
#if defined(ZT_ISA_AVX512)
const CpuKernels* cpu_kernels_avx512() { return nullptr; }
#else
const CpuKernels* cpu_kernels_avx2() { return nullptr; }
#endif
}  // namespace zt

#else  // the kernels

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#define ZT_INLINE inline __attribute__((always_inline))
#define ZT_INLINE_LAMBDA __attribute__((always_inline))  // (the per-chunk lambdas of the loops)

namespace zt {
namespace ZT_ISA_NS {
namespace {

using at::vec::Vectorized;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// ---------------------------------------------------------------------------------------------
// Loading and storing: a chunk is W = 2 * Vectorized<acc>::size() elements of T, held in two
// vectors of acc (for bfloat16 / half: one Vectorized<T>, converted). A chunk of n < W elements
// (the tail of a row or range) goes through a small buffer, the missing elements set to `fill`.

template <typename T>
struct IO {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t K = V::size();
  static constexpr int64_t W = 2 * K;
  static constexpr bool kReduced = !std::is_same_v<T, A>;

  static ZT_INLINE void load(const T* p, V& a, V& b) {
    if constexpr (kReduced) {
      static_assert(Vectorized<T>::size() == W, "a reduced-precision vector holds two float vectors");
      std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    } else {
      a = V::loadu(p);
      b = V::loadu(p + K);
    }
  }
  static ZT_INLINE void store(T* p, const V& a, const V& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + K);
    }
  }
  // n elements (n <= W); the rest of the chunk is `fill`. (The partial chunk is out of line: its
  // buffer in the hot loops' frame slows them down.)
  static ZT_INLINE void load(const T* p, int64_t n, A fill, V& a, V& b) {
    if (n == W)
      load(p, a, b);
    else
      load_partial(p, n, fill, a, b);
  }
  static ZT_INLINE void store(T* p, int64_t n, const V& a, const V& b) {
    if (n == W)
      store(p, a, b);
    else
      store_partial(p, n, a, b);
  }
  static __attribute__((noinline)) void load_partial(const T* p, int64_t n, A fill, V& a, V& b) {
    T buf[W];
    for (int64_t i = 0; i < W; ++i) buf[i] = i < n ? p[i] : static_cast<T>(fill);
    load(buf, a, b);
  }
  static __attribute__((noinline)) void store_partial(T* p, int64_t n, const V& a, const V& b) {
    T buf[W];
    store(buf, a, b);
    std::memcpy(p, buf, n * sizeof(T));
  }
};

// f(offset, count) over [0, n) in chunks of W (count == W except for a last, shorter chunk).
template <int64_t W, typename F>
ZT_INLINE void chunks(int64_t n, const F& f) {
  int64_t c = 0;
  for (; c + W <= n; c += W) f(c, W);
  if (c < n) f(c, n - c);
}

// Horizontal sum / max of the lanes: ATen's shuffle reduction for float, a tree for double.
template <typename A>
ZT_INLINE A hsum(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return at::vec::vec_reduce_all<float>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
  } else {
    constexpr int n = Vectorized<A>::size();
    A buf[n];
    v.store(buf);
    for (int w = n / 2; w > 0; w /= 2)
      for (int i = 0; i < w; ++i) buf[i] += buf[i + w];
    return buf[0];
  }
}

template <typename A>
ZT_INLINE A hmax(const Vectorized<A>& v) {  // NaN if any lane is NaN
  if constexpr (std::is_same_v<A, float>) {
    return at::vec::vec_reduce_all<float>(
        [](const Vectorized<A>& a, const Vectorized<A>& b) { return at::vec::maximum(a, b); }, v);
  } else {
    constexpr int n = Vectorized<A>::size();
    A buf[n];
    v.store(buf);
    for (int w = n / 2; w > 0; w /= 2)
      for (int i = 0; i < w; ++i) buf[i] = (buf[i + w] > buf[i] || std::isnan(buf[i + w])) ? buf[i + w] : buf[i];
    return buf[0];
  }
}

// exp of a vector of the accumulation type. float: ATen's inline polynomial exp_u20 (no function
// call; relative error < 4e-7 on (-87, 88.7), measured; 0 below, where exp is a denormal, +inf
// above), NaN passed through (exp_u20 would make it +inf); double: the 1-ulp SLEEF exp.
template <typename V>
ZT_INLINE V fast_exp(const V& v) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return V::blendv(v.exp_u20(), v, v != v);
  } else {
    return v.exp();
  }
}

// fast_exp without the NaN pass-through (for arguments that are never NaN, or whose NaN is
// carried by another term).
template <typename V>
ZT_INLINE V exp_no_nan(const V& v) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// sigmoid(x) = 1 / (1 + exp(-x)). Every caller multiplies the result by x (or a term of it),
// which carries a NaN x into the result, so exp needs no NaN pass-through.
template <typename V>
ZT_INLINE V sigmoid(const V& x) {
  using A = typename V::value_type;
  return V(A(1)) / (V(A(1)) + exp_no_nan(x.neg()));
}

// ---------------------------------------------------------------------------------------------
// Row reductions

// max_c x_c (-inf for an empty row; NaN if some x_c is NaN)
template <typename T>
ZT_INLINE acc_t<T> row_max(const T* x, int64_t n) {
  using io = IO<T>;
  using V = typename io::V;
  const acc_t<T> ninf = -std::numeric_limits<acc_t<T>>::infinity();
  V m0(ninf), m1(ninf);
  chunks<io::W>(n, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
    V a, b;
    io::load(x + c, k, ninf, a, b);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
  });
  return hmax(at::vec::maximum(m0, m1));
}

// sum_c a_c * b_c
template <typename T>
ZT_INLINE acc_t<T> row_dot(const T* x, const T* y, int64_t n) {
  using io = IO<T>;
  using V = typename io::V;
  V s0(0), s1(0);
  chunks<io::W>(n, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
    V a0, a1, b0, b1;
    io::load(x + c, k, 0, a0, a1);
    io::load(y + c, k, 0, b0, b1);
    s0 = at::vec::fmadd(a0, b0, s0);
    s1 = at::vec::fmadd(a1, b1, s1);
  });
  return hsum(s0 + s1);
}

// sum_c x_c
template <typename T>
ZT_INLINE acc_t<T> row_sum(const T* x, int64_t n) {
  using io = IO<T>;
  using V = typename io::V;
  V s0(0), s1(0);
  chunks<io::W>(n, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
    V a, b;
    io::load(x + c, k, 0, a, b);
    s0 += a;
    s1 += b;
  });
  return hsum(s0 + s1);
}

// (sum_c exp(x_c - shift), sum_c x_c), in double: each vector lane sums kFlush chunks, then the
// lanes are added into double (a row may have 10^5 classes). The second sum only if WITH_SUM.
// A NaN x_c makes the sum NaN through the caller's shift (the row max, NaN then), so exp needs no
// NaN pass-through here.
template <bool WITH_SUM, typename T>
ZT_INLINE void row_sum_exp(const T* x, int64_t n, acc_t<T> shift, double& s, double& sx) {
  using io = IO<T>;
  using V = typename io::V;
  constexpr int kFlush = 16;
  const V vs(shift);
  V e0(0), e1(0), x0(0), x1(0);
  int pending = 0;
  s = 0;
  sx = 0;
  auto flush = [&] {
    s += static_cast<double>(hsum(e0 + e1));
    e0 = e1 = V(0);
    if (WITH_SUM) {
      sx += static_cast<double>(hsum(x0 + x1));
      x0 = x1 = V(0);
    }
    pending = 0;
  };
  chunks<io::W>(n, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
    V a, b;
    io::load(x + c, k, -std::numeric_limits<acc_t<T>>::infinity(), a, b);  // exp(-inf) = 0
    e0 += exp_no_nan(a - vs);
    e1 += exp_no_nan(b - vs);
    if (WITH_SUM) {
      if (k != io::W) io::load(x + c, k, 0, a, b);
      x0 += a;
      x1 += b;
    }
    if (++pending == kFlush) flush();
  });
  flush();
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

// Rows in blocks of Vectorized<acc>::size(), so that the logs of their sums are one vector log.
template <typename T>
void cross_entropy_fwd_rows(const T* xp, const int64_t* tp, acc_t<T>* lp, acc_t<T>* sp, int64_t C, int64_t ignore,
                            acc_t<T> eps, int64_t b, int64_t e) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t R = V::size();
  A shift[R], sum[R], mean[R];
  for (int64_t i0 = b; i0 < e; i0 += R) {
    const int64_t nr = std::min(R, e - i0);
    for (int64_t j = 0; j < R; ++j) {
      if (j >= nr) {  // (unused lanes of the last block)
        shift[j] = 0;
        sum[j] = 1;
        continue;
      }
      const T* xr = xp + (i0 + j) * C;
      const A m = row_max(xr, C);
      shift[j] = std::isinf(m) ? A(0) : m;  // all -inf (or a +inf) row: exp stays 0 / inf / NaN as in torch
      double s, sx;
      if (eps > 0)
        row_sum_exp<true>(xr, C, shift[j], s, sx);
      else
        row_sum_exp<false>(xr, C, shift[j], s, sx);
      sum[j] = static_cast<A>(s);
      mean[j] = static_cast<A>(sx / static_cast<double>(C));
    }
    (V::loadu(shift) + V::loadu(sum).log()).store(sum);  // lse = shift + log(sum)
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t i = i0 + j, tg = tp[i];
      const A l = sum[j];
      sp[i] = l;
      if (tg == ignore) {
        lp[i] = 0;
        continue;
      }
      A li = (1 - eps) * (l - static_cast<A>(xp[i * C + tg]));
      if (eps > 0) li += eps * (l - mean[j]);
      lp[i] = li;
    }
  }
}

template <typename T>
void cross_entropy_bwd_rows(const T* xp, const int64_t* tp, const acc_t<T>* lp, const acc_t<T>* gp, bool per_row,
                            T* dp, int64_t C, int64_t ignore, acc_t<T> eps, int64_t b, int64_t e) {
  using A = acc_t<T>;
  using io = IO<T>;
  using V = typename io::V;
  const A off = eps / static_cast<A>(C);
  for (int64_t i = b; i < e; ++i) {
    const T* xr = xp + i * C;
    T* dr = dp + i * C;
    const int64_t tg = tp[i];
    if (tg == ignore) {
      std::fill(dr, dr + C, T(0));
      continue;
    }
    const A gi = gp[per_row ? i : 0], l = lp[i];
    const V vg(gi), vl(l), voff(off);
    chunks<io::W>(C, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
      V a, bb;
      io::load(xr + c, k, 0, a, bb);
      io::store(dr + c, k, vg * (fast_exp(a - vl) - voff), vg * (fast_exp(bb - vl) - voff));
    });
    dr[tg] = static_cast<T>(gi * (std::exp(static_cast<A>(xr[tg]) - l) - off) - gi * (1 - eps));
  }
}

// ---------------------------------------------------------------------------------------------
// layer_norm / rms_norm backward, rows [b, e), column partial sums into dwp / dbp (acc [N])

template <bool HAS_W, typename T>
void layer_norm_bwd_rows(const T* gp, const T* xp, const acc_t<T>* mp, const acc_t<T>* rp, const acc_t<T>* wp,
                         T* dxp, acc_t<T>* dwp, acc_t<T>* dbp, int64_t N, int64_t b, int64_t e) {
  using A = acc_t<T>;
  using io = IO<T>;
  using ia = IO<A>;
  using V = typename io::V;
  static_assert(io::W == ia::W, "chunks of T and of acc have the same length");
  const A invN = N > 0 ? A(1) / static_cast<A>(N) : A(0);
  for (int64_t i = b; i < e; ++i) {
    const T* xr = xp + i * N;
    const T* gr = gp + i * N;
    T* dr = dxp + i * N;
    const V vmu(mp[i]), vrs(rp[i]);
    // pass 1: s1 = mean(g), s2 = mean(g * xhat)
    V s10(0), s11(0), s20(0), s21(0);
    chunks<io::W>(N, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
      V x0, x1, g0, g1;
      io::load(xr + c, k, 0, x0, x1);
      io::load(gr + c, k, 0, g0, g1);  // zero-filled tail: g = 0 there
      if (HAS_W) {
        V w0, w1;
        ia::load(wp + c, k, 0, w0, w1);
        g0 = g0 * w0;
        g1 = g1 * w1;
      }
      s10 += g0;
      s11 += g1;
      s20 = at::vec::fmadd(g0, (x0 - vmu) * vrs, s20);
      s21 = at::vec::fmadd(g1, (x1 - vmu) * vrs, s21);
    });
    const V s1(hsum(s10 + s11) * invN), s2(hsum(s20 + s21) * invN);
    // pass 2: dx = rstd * (g - s1 - xhat * s2);  dw += dy * xhat;  db += dy
    chunks<io::W>(N, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
      V x0, x1, d0, d1, w0(1), w1(1), pw0, pw1, pb0, pb1;
      io::load(xr + c, k, 0, x0, x1);
      io::load(gr + c, k, 0, d0, d1);
      if (HAS_W) ia::load(wp + c, k, 0, w0, w1);
      const V h0 = (x0 - vmu) * vrs, h1 = (x1 - vmu) * vrs;
      io::store(dr + c, k, vrs * (d0 * w0 - s1 - h0 * s2), vrs * (d1 * w1 - s1 - h1 * s2));
      ia::load(dwp + c, k, 0, pw0, pw1);
      ia::load(dbp + c, k, 0, pb0, pb1);
      ia::store(dwp + c, k, at::vec::fmadd(d0, h0, pw0), at::vec::fmadd(d1, h1, pw1));
      ia::store(dbp + c, k, pb0 + d0, pb1 + d1);
    });
  }
}

template <bool HAS_W, typename T>
void rms_norm_bwd_rows(const T* gp, const T* xp, const acc_t<T>* rp, const acc_t<T>* wp, acc_t<T> eps, T* dxp,
                       acc_t<T>* dwp, int64_t N, int64_t b, int64_t e) {
  using A = acc_t<T>;
  using io = IO<T>;
  using ia = IO<A>;
  using V = typename io::V;
  const A invN = N > 0 ? A(1) / static_cast<A>(N) : A(0);
  for (int64_t i = b; i < e; ++i) {
    const T* xr = xp + i * N;
    const T* gr = gp + i * N;
    T* dr = dxp + i * N;
    // pass 1: ss = sum(x^2), sgx = sum(g * x)
    V q0(0), q1(0), p0(0), p1(0);
    chunks<io::W>(N, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
      V x0, x1, g0, g1;
      io::load(xr + c, k, 0, x0, x1);
      io::load(gr + c, k, 0, g0, g1);
      if (HAS_W) {
        V w0, w1;
        ia::load(wp + c, k, 0, w0, w1);
        g0 = g0 * w0;
        g1 = g1 * w1;
      }
      q0 = at::vec::fmadd(x0, x0, q0);
      q1 = at::vec::fmadd(x1, x1, q1);
      p0 = at::vec::fmadd(g0, x0, p0);
      p1 = at::vec::fmadd(g1, x1, p1);
    });
    const A rs = rp ? rp[i] : A(1) / std::sqrt(hsum(q0 + q1) * invN + eps);
    const V vrs(rs), vk(rs * rs * hsum(p0 + p1) * invN);  // mean(g * xhat) * rstd
    // pass 2: dx = rstd * (g - x * k);  dw += dy * x * rstd
    chunks<io::W>(N, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
      V x0, x1, d0, d1, w0(1), w1(1), pw0, pw1;
      io::load(xr + c, k, 0, x0, x1);
      io::load(gr + c, k, 0, d0, d1);
      if (HAS_W) ia::load(wp + c, k, 0, w0, w1);
      io::store(dr + c, k, vrs * (d0 * w0 - x0 * vk), vrs * (d1 * w1 - x1 * vk));
      ia::load(dwp + c, k, 0, pw0, pw1);
      ia::store(dwp + c, k, at::vec::fmadd(d0 * x0, vrs, pw0), at::vec::fmadd(d1 * x1, vrs, pw1));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// softmax / log_softmax backward over rows of N

template <bool LOG, typename T>
void softmax_bwd_rows(const T* gp, const T* yp, T* dp, int64_t N, int64_t b, int64_t e) {
  using io = IO<T>;
  using V = typename io::V;
  for (int64_t i = b; i < e; ++i) {
    const T* yr = yp + i * N;
    const T* gr = gp + i * N;
    T* dr = dp + i * N;
    const V s(LOG ? row_sum(gr, N) : row_dot(gr, yr, N));
    chunks<io::W>(N, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
      V y0, y1, g0, g1;
      io::load(yr + c, k, 0, y0, y1);
      io::load(gr + c, k, 0, g0, g1);
      if (LOG)
        io::store(dr + c, k, g0 - fast_exp(y0) * s, g1 - fast_exp(y1) * s);
      else
        io::store(dr + c, k, y0 * (g0 - s), y1 * (g1 - s));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// elementwise: out chunks = f(input chunks) over [b, e)

template <typename T, typename F>
ZT_INLINE void map2(const T* p, const T* q, T* out, int64_t b, int64_t e, const F& f) {
  using io = IO<T>;
  using V = typename io::V;
  chunks<io::W>(e - b, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
    V p0, p1, q0, q1;
    io::load(p + b + c, k, 0, p0, p1);
    io::load(q + b + c, k, 0, q0, q1);
    io::store(out + b + c, k, f(p0, q0), f(p1, q1));
  });
}

// gelu'(x), exact (MODE 0): Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi). For float,
// Phi(x) = (1 + erf(z)) / 2, z = x / sqrt(2), with erf by Abramowitz & Stegun 7.1.26 (absolute
// error < 1.5e-7; the approximation of ATen's own Vectorized<float>::erf), whose exp(-z^2) is
// phi's exp(-x^2/2): one exp per element. For double, SLEEF's erf and exp.
// tanh approximation (MODE 1), u = k0 (x + k1 x^3), t = tanh(u):
// (1 + t) / 2 + x (1 - t^2) k0 (1 + 3 k1 x^2) / 2  =  s + 2 x s (1 - s) k0 (1 + 3 k1 x^2)
// with s = sigmoid(2u) (as (1 + t) / 2 = sigmoid(2u), 1 - t^2 = 4 s (1 - s)): one exp.
template <int MODE, typename V>
ZT_INLINE V gelu_grad(const V& x) {
  using A = typename V::value_type;
  const V half(A(0.5)), one(A(1));
  if constexpr (MODE == 1) {
    const V k0(A(0.7978845608028654)), k1(A(0.044715)), k3(A(3 * 0.044715));
    const V x2 = x * x;
    const V s = sigmoid(V(A(2)) * k0 * at::vec::fmadd(k1 * x2, x, x));
    return at::vec::fmadd(V(A(2)) * x * s * (one - s), k0 * at::vec::fmadd(k3, x2, one), s);
  } else if constexpr (std::is_same_v<A, float>) {
    const V e = exp_no_nan(V(-0.5f) * x * x);  // exp(-x^2/2) = exp(-z^2) (a NaN x reaches t, below)
    const V t = one / at::vec::fmadd(V(0.3275911f), (x * V(0.7071067811865476f)).abs(), one);
    V r = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    r = at::vec::fmadd(r, t, V(1.421413741f));
    r = at::vec::fmadd(r, t, V(-0.284496736f));
    r = at::vec::fmadd(r, t, V(0.254829592f));
    const V h = half * r * t * e;                    // (1 - erf(|z|)) / 2
    const V cdf = V::blendv(one - h, h, x < V(0.f));  // Phi(x)
    return at::vec::fmadd(x, e * V(0.3989422804014327f), cdf);
  } else {
    const V cdf = half * (one + (x * V(A(0.7071067811865476))).erf());
    const V pdf = (V(A(-0.5)) * x * x).exp() * V(A(0.3989422804014327));
    return at::vec::fmadd(x, pdf, cdf);
  }
}

// ---------------------------------------------------------------------------------------------
// the table entries: dtype dispatch

template <typename T> struct Tag { using type = T; };

template <typename F>
ZT_INLINE void visit(Dt dt, const F& f) {
  switch (dt) {
    case Dt::F32: f(Tag<float>{}); break;
    case Dt::F64: f(Tag<double>{}); break;
    case Dt::BF16: f(Tag<c10::BFloat16>{}); break;
    case Dt::F16: f(Tag<c10::Half>{}); break;
  }
}

#define ZT_T typename decltype(tag)::type
#define ZT_A acc_t<ZT_T>

void cross_entropy_fwd(Dt dt, const void* x, const int64_t* t, void* loss, void* lse, int64_t C, int64_t ignore,
                       double eps, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    cross_entropy_fwd_rows<ZT_T>(static_cast<const ZT_T*>(x), t, static_cast<ZT_A*>(loss), static_cast<ZT_A*>(lse),
                                 C, ignore, static_cast<ZT_A>(eps), b, e);
  });
}

void cross_entropy_bwd(Dt dt, const void* x, const int64_t* t, const void* lse, const void* g, bool per_row, void* dx,
                       int64_t C, int64_t ignore, double eps, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    cross_entropy_bwd_rows<ZT_T>(static_cast<const ZT_T*>(x), t, static_cast<const ZT_A*>(lse),
                                 static_cast<const ZT_A*>(g), per_row, static_cast<ZT_T*>(dx), C, ignore,
                                 static_cast<ZT_A>(eps), b, e);
  });
}

void layer_norm_bwd(Dt dt, const void* dy, const void* x, const void* mean, const void* rstd, const void* w, void* dx,
                    void* dwp, void* dbp, int64_t N, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    auto run = [&](auto has_w) {
      layer_norm_bwd_rows<decltype(has_w)::value, ZT_T>(
          static_cast<const ZT_T*>(dy), static_cast<const ZT_T*>(x), static_cast<const ZT_A*>(mean),
          static_cast<const ZT_A*>(rstd), static_cast<const ZT_A*>(w), static_cast<ZT_T*>(dx),
          static_cast<ZT_A*>(dwp), static_cast<ZT_A*>(dbp), N, b, e);
    };
    w ? run(std::true_type{}) : run(std::false_type{});
  });
}

void rms_norm_bwd(Dt dt, const void* dy, const void* x, const void* rstd, const void* w, double eps, void* dx,
                  void* dwp, int64_t N, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    auto run = [&](auto has_w) {
      rms_norm_bwd_rows<decltype(has_w)::value, ZT_T>(
          static_cast<const ZT_T*>(dy), static_cast<const ZT_T*>(x), static_cast<const ZT_A*>(rstd),
          static_cast<const ZT_A*>(w), static_cast<ZT_A>(eps), static_cast<ZT_T*>(dx), static_cast<ZT_A*>(dwp), N, b,
          e);
    };
    w ? run(std::true_type{}) : run(std::false_type{});
  });
}

void softmax_bwd(Dt dt, bool log, const void* dy, const void* y, void* dx, int64_t N, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    auto g = static_cast<const ZT_T*>(dy);
    auto yy = static_cast<const ZT_T*>(y);
    auto d = static_cast<ZT_T*>(dx);
    log ? softmax_bwd_rows<true>(g, yy, d, N, b, e) : softmax_bwd_rows<false>(g, yy, d, N, b, e);
  });
}

void gelu_bwd(Dt dt, int mode, const void* dy, const void* x, void* dx, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    auto g = static_cast<const ZT_T*>(dy);
    auto xx = static_cast<const ZT_T*>(x);
    auto d = static_cast<ZT_T*>(dx);
    if (mode == 1)
      map2(g, xx, d, b, e, [](const auto& gv, const auto& xv) ZT_INLINE_LAMBDA { return gv * gelu_grad<1>(xv); });
    else
      map2(g, xx, d, b, e, [](const auto& gv, const auto& xv) ZT_INLINE_LAMBDA { return gv * gelu_grad<0>(xv); });
  });
}

void silu_bwd(Dt dt, const void* dy, const void* x, void* dx, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    map2(static_cast<const ZT_T*>(dy), static_cast<const ZT_T*>(x), static_cast<ZT_T*>(dx), b, e,
         [](const auto& g, const auto& xv) ZT_INLINE_LAMBDA {
           using V = std::decay_t<decltype(xv)>;
           const V one(typename V::value_type(1));
           const V s = sigmoid(xv);
           return g * s * at::vec::fmadd(xv, one - s, one);
         });
  });
}

void swiglu_fwd(Dt dt, const void* a, const void* bb, void* y, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    map2(static_cast<const ZT_T*>(a), static_cast<const ZT_T*>(bb), static_cast<ZT_T*>(y), b, e,
         [](const auto& av, const auto& bv) ZT_INLINE_LAMBDA { return av * sigmoid(av) * bv; });
  });
}

void swiglu_bwd(Dt dt, const void* dy, const void* a, const void* bb, void* da, void* db, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    using T = ZT_T;
    using io = IO<T>;
    using V = typename io::V;
    auto gp = static_cast<const T*>(dy) + b;
    auto ap = static_cast<const T*>(a) + b;
    auto bp = static_cast<const T*>(bb) + b;
    auto dap = static_cast<T*>(da) + b;
    auto dbp = static_cast<T*>(db) + b;
    const V one(typename io::A(1));
    chunks<io::W>(e - b, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
      V g[2], av[2], bv[2], outa[2], outb[2];
      io::load(gp + c, k, 0, g[0], g[1]);
      io::load(ap + c, k, 0, av[0], av[1]);
      io::load(bp + c, k, 0, bv[0], bv[1]);
      for (int h = 0; h < 2; ++h) {
        const V s = sigmoid(av[h]);
        outa[h] = g[h] * bv[h] * s * at::vec::fmadd(av[h], one - s, one);
        outb[h] = g[h] * av[h] * s;
      }
      io::store(dap + c, k, outa[0], outa[1]);
      io::store(dbp + c, k, outb[0], outb[1]);
    });
  });
}

void embedding_bwd(Dt dt, const void* dy, const int64_t* order, const int64_t* offs, void* dW, int64_t D,
                   int64_t padding_idx, int64_t b, int64_t e) {
  visit(dt, [&](auto tag) {
    using T = ZT_T;
    using io = IO<T>;
    using V = typename io::V;
    auto gp = static_cast<const T*>(dy);
    auto op = static_cast<T*>(dW);
    for (int64_t w = b; w < e; ++w) {
      const int64_t k0 = w == padding_idx ? 0 : offs[w], k1 = w == padding_idx ? 0 : offs[w + 1];
      chunks<io::W>(D, [&](int64_t c, int64_t k) ZT_INLINE_LAMBDA {
        V s0(0), s1(0);
        for (int64_t j = k0; j < k1; ++j) {
          V a, bb;
          io::load(gp + order[j] * D + c, k, 0, a, bb);
          s0 += a;
          s1 += bb;
        }
        io::store(op + w * D + c, k, s0, s1);
      });
    }
  });
}

#undef ZT_T
#undef ZT_A

}  // namespace

const CpuKernels kTable = {
    ZT_ISA_NAME,   cross_entropy_fwd, cross_entropy_bwd, layer_norm_bwd, rms_norm_bwd, softmax_bwd,
    gelu_bwd,      silu_bwd,          swiglu_fwd,        swiglu_bwd,     embedding_bwd,
};

}  // namespace ZT_ISA_NS

#if defined(ZT_ISA_AVX512)
const CpuKernels* cpu_kernels_avx512() { return &ZT_ISA_NS::kTable; }
#elif defined(ZT_ISA_AVX2)
const CpuKernels* cpu_kernels_avx2() { return &ZT_ISA_NS::kTable; }
#else
const CpuKernels* cpu_kernels_default() { return &ZT_ISA_NS::kTable; }
#endif

}  // namespace zt

#if defined(ZT_ISA_VARIANT)
#pragma GCC reset_options
#endif

#endif  // the kernels
