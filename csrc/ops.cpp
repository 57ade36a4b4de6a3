// Native row operators of the log-prob path: schemas (TORCH_LIBRARY) and CPU kernels.
//
// Where this sits: ddpo_kernels/chunk_logprob.py calls these through torch.ops.ddpo_ops.* for each
// [C, V] block of logits the chunked "torch" backend computes (one GEMM per fixed-size chunk of
// tokens); the CUDA kernels of the same ops live in ops_cuda.cu. Semantics (and the pure-PyTorch
// references the tests compare against) are documented in ddpo_kernels/chunk_logprob.py:
//   logprob_rows_forward(logits, targets)            -> lse[C], logp[C] = logits[i, t_i] - lse[i]
//   logprob_rows_backward_(logits, targets, lse, g)  :  logits[i] := g[i] * (onehot(t_i) - softmax_i)
// Every row has a target (the caller selected them); per-sequence sums are not formed here, so a
// row's values never depend on which other rows share the block.
//
// CPU design: at::parallel_for over rows; per row one max pass and one exp-sum pass in fp32
// with explicit SIMD (vector extensions) and a polynomial exp, because libm's expf and float
// selects do not vectorise without -ffast-math, which we avoid since it breaks inf handling.
// The order of operations within a row is fixed, so results do not depend on the thread count.
// target_clones builds x86-64-v3 (AVX2, FMA, F16C) and baseline variants; the loader picks one
// at run time.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "ops_common.h"

namespace ddpo {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define DDPO_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DDPO_CLONES
#endif
#define DDPO_INLINE inline __attribute__((always_inline))

// Explicit SIMD through GCC/Clang vector extensions: portable (SSE, AVX2 via target_clones,
// NEON), and needed because the compiler will not if-convert the float max / clamp selects
// of plain loops without -ffast-math (measured: plain loops ran 4x slower than
// torch.logsumexp, these run at its speed).
constexpr int kW = 8;
// The vector helpers below are always inlined, so the vector-return ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

template <typename T>
DDPO_INLINE vf load_vf(const T* p) {
  float tmp[kW];
  for (int k = 0; k < kW; ++k) tmp[k] = static_cast<float>(p[k]);
  vf v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

template <typename T>
DDPO_INLINE void store_vf(T* p, vf v) {
  float tmp[kW];
  std::memcpy(tmp, &v, sizeof(v));
  for (int k = 0; k < kW; ++k) p[k] = T(tmp[k]);
}

// bf16 <-> fp32 in vector registers (c10::BFloat16's scalar conversions do not vectorise).
// Same rounding as c10::BFloat16: round to nearest even, NaN -> 0x7FC0.
typedef uint32_t vu __attribute__((vector_size(kW * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(kW * sizeof(uint16_t))));

template <>
DDPO_INLINE vf load_vf(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

template <>
DDPO_INLINE void store_vf(c10::BFloat16* p, vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof(u));
  const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vu out = (u & 0x7FFFFFFFu) > 0x7F800000u ? vu{} + 0x7FC0u : rounded;
  const vh h = __builtin_convertvector(out, vh);
  std::memcpy(p, &h, sizeof(h));
}

#if defined(__FLT16_MAX__)
// fp16 <-> fp32 through the compiler's _Float16 vectors: F16C instructions in the x86-64-v3
// clone (c10::Half's scalar bit-twiddling conversions were 20x slower than the fp32 path).
// Both round to nearest even, like c10::Half.
typedef _Float16 vhf __attribute__((vector_size(kW * sizeof(_Float16))));

template <>
DDPO_INLINE vf load_vf(const c10::Half* p) {
  vhf h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vf);
}

template <>
DDPO_INLINE void store_vf(c10::Half* p, vf v) {
  const vhf h = __builtin_convertvector(v, vhf);
  std::memcpy(p, &h, sizeof(h));
}
#endif

// exp(x) in fp32 to ~2 ulp without libm, so that it vectorises (Cephes expf:
// exp(x) = 2^n * exp(r), |r| <= ln2 / 2, degree-6 polynomial for exp(r)). Inputs are clamped
// to [-87.3, 88.7], so -inf (masked logits) gives ~1e-38 instead of 0: harmless, since every
// use multiplies or sums it with O(1) values.
template <typename F, typename I>
DDPO_INLINE F exp_poly(F x) {
  x = x < -87.3f ? F{} - 87.3f : x;
  x = x > 88.7f ? F{} + 88.7f : x;
  const F t = x * 1.44269504088896341f;
  // Round to nearest without a libm call: adding 1.5 * 2^23 pushes the fraction out.
  const F n = (t + 12582912.0f) - 12582912.0f;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = p * r * r + r + 1.0f;
  I bits;
  if constexpr (std::is_same_v<F, float>) {
    bits = (static_cast<int32_t>(n) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

DDPO_INLINE float exp_s(float x) { return exp_poly<float, int32_t>(x); }
DDPO_INLINE vf exp_v(vf x) { return exp_poly<vf, vi>(x); }

template <typename T>
DDPO_INLINE float to_f(T v) {
  return static_cast<float>(v);
}

// logsumexp of one row in fp32: max pass, then sum of exp(x - max) pass, two vector
// accumulators each (fixed order: the result does not depend on threads).
template <typename T>
DDPO_INLINE float row_lse(const T* x, int64_t V) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  vf m0 = vf{} + kNegInf, m1 = m0;
  int64_t j = 0;
  for (; j + 2 * kW <= V; j += 2 * kW) {
    const vf a = load_vf(x + j), b = load_vf(x + j + kW);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
  }
  m0 = m1 > m0 ? m1 : m0;
  float m = kNegInf;
  for (int k = 0; k < kW; ++k) m = m0[k] > m ? m0[k] : m;
  for (; j < V; ++j) m = std::max(m, to_f(x[j]));
  if (!std::isfinite(m)) return m;  // all -inf (fully masked row) or inf/NaN: propagate as is

  vf s0 = vf{}, s1 = vf{};
  j = 0;
  for (; j + 2 * kW <= V; j += 2 * kW) {
    s0 += exp_v(load_vf(x + j) - m);
    s1 += exp_v(load_vf(x + j + kW) - m);
  }
  s0 += s1;
  float s = 0.f;
  for (int k = 0; k < kW; ++k) s += s0[k];
  for (; j < V; ++j) s += exp_s(to_f(x[j]) - m);
  return m + std::log(s);
}

template <typename T>
DDPO_INLINE void fwd_rows_impl(const T* logits, int64_t ld, int64_t V, const int64_t* targets, float* lse,
                               float* logp, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const T* x = logits + i * ld;
    const float l = row_lse(x, V);
    lse[i] = l;
    logp[i] = to_f(x[targets[i]]) - l;
  }
}

template <typename T>
DDPO_INLINE void bwd_rows_impl(T* logits, int64_t ld, int64_t V, const int64_t* targets, const float* lse,
                               const float* grad, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    T* x = logits + i * ld;
    const int64_t t = targets[i];
    const float g = grad[i];
    const float l = lse[i];
    const float xt = to_f(x[t]);
    const float ng = -g;
    int64_t j = 0;
    for (; j + kW <= V; j += kW) store_vf(x + j, exp_v(load_vf(x + j) - l) * ng);
    for (; j < V; ++j) x[j] = T(ng * exp_s(to_f(x[j]) - l));
    // g * (1 - p_t) via expm1: exact where p_t is close to 1, and rounded once to T.
    x[t] = T(g * -std::expm1(xt - l));
  }
}

// Per-dtype entry points: target_clones needs plain (non-template) functions.
#define DDPO_DEFINE_ROWS(T, suffix)                                                                              \
  DDPO_CLONES void fwd_rows_##suffix(const T* logits, int64_t ld, int64_t V, const int64_t* targets, float* lse, \
                                     float* logp, int64_t b, int64_t e) {                                       \
    fwd_rows_impl<T>(logits, ld, V, targets, lse, logp, b, e);                                                  \
  }                                                                                                             \
  DDPO_CLONES void bwd_rows_##suffix(T* logits, int64_t ld, int64_t V, const int64_t* targets, const float* lse, \
                                     const float* grad, int64_t b, int64_t e) {                                 \
    bwd_rows_impl<T>(logits, ld, V, targets, lse, grad, b, e);                                                  \
  }

DDPO_DEFINE_ROWS(float, f32)
DDPO_DEFINE_ROWS(c10::Half, f16)
DDPO_DEFINE_ROWS(c10::BFloat16, bf16)

inline void fwd_rows(const float* p, int64_t ld, int64_t V, const int64_t* t, float* lse, float* logp, int64_t b,
                     int64_t e) {
  fwd_rows_f32(p, ld, V, t, lse, logp, b, e);
}
inline void fwd_rows(const c10::Half* p, int64_t ld, int64_t V, const int64_t* t, float* lse, float* logp, int64_t b,
                     int64_t e) {
  fwd_rows_f16(p, ld, V, t, lse, logp, b, e);
}
inline void fwd_rows(const c10::BFloat16* p, int64_t ld, int64_t V, const int64_t* t, float* lse, float* logp,
                     int64_t b, int64_t e) {
  fwd_rows_bf16(p, ld, V, t, lse, logp, b, e);
}
inline void bwd_rows(float* p, int64_t ld, int64_t V, const int64_t* t, const float* lse, const float* g, int64_t b,
                     int64_t e) {
  bwd_rows_f32(p, ld, V, t, lse, g, b, e);
}
inline void bwd_rows(c10::Half* p, int64_t ld, int64_t V, const int64_t* t, const float* lse, const float* g,
                     int64_t b, int64_t e) {
  bwd_rows_f16(p, ld, V, t, lse, g, b, e);
}
inline void bwd_rows(c10::BFloat16* p, int64_t ld, int64_t V, const int64_t* t, const float* lse, const float* g,
                     int64_t b, int64_t e) {
  bwd_rows_bf16(p, ld, V, t, lse, g, b, e);
}

// Rows per parallel task: about 64K logits, so small chunks do not pay thread start-up.
inline int64_t grain_for(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// Targets are checked once, serially, before any row is read: a bad one would otherwise read
// outside its row.
void check_targets(const int64_t* targets, int64_t C, int64_t V, const char* op) {
  for (int64_t i = 0; i < C; ++i) {
    TORCH_CHECK(targets[i] >= 0 && targets[i] < V, op, ": target ", targets[i], " at row ", i,
                " is outside the vocabulary [0, ", V, "); select only rows with a target");
  }
}

std::tuple<at::Tensor, at::Tensor> logprob_rows_forward_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                             int64_t cuda_stream) {
  (void)cuda_stream;
  check_rows(logits, targets, "logprob_rows_forward");
  const int64_t C = logits.size(0), V = logits.size(1);
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  const int64_t* tp = t64.const_data_ptr<int64_t>();
  check_targets(tp, C, V, "logprob_rows_forward");
  at::Tensor lse = at::empty({C}, logits.options().dtype(at::kFloat));
  at::Tensor logp = at::empty({C}, logits.options().dtype(at::kFloat));
  if (C == 0) return {lse, logp};
  float* lse_p = lse.mutable_data_ptr<float>();
  float* logp_p = logp.mutable_data_ptr<float>();
  const int64_t ld = logits.stride(0);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, C, grain_for(V), [&](int64_t b, int64_t e) { fwd_rows(x, ld, V, tp, lse_p, logp_p, b, e); });
  });
  return {lse, logp};
}

void logprob_rows_backward_cpu(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                               const at::Tensor& grad, int64_t cuda_stream) {
  (void)cuda_stream;
  check_rows(logits, targets, "logprob_rows_backward_");
  check_rows_disjoint(logits, "logprob_rows_backward_");
  check_row_vector(logits, lse, "lse", "logprob_rows_backward_");
  check_row_vector(logits, grad, "grad", "logprob_rows_backward_");
  const int64_t C = logits.size(0), V = logits.size(1);
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  const at::Tensor g32 = grad.to(at::kFloat).contiguous();
  const int64_t* tp = t64.const_data_ptr<int64_t>();
  check_targets(tp, C, V, "logprob_rows_backward_");
  if (C == 0 || V == 0) return;
  const float* lp = lse32.const_data_ptr<float>();
  const float* gp = g32.const_data_ptr<float>();
  const int64_t ld = logits.stride(0);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, grain_for(V), [&](int64_t b, int64_t e) { bwd_rows(x, ld, V, tp, lp, gp, b, e); });
  });
}

}  // namespace
}  // namespace ddpo

#ifdef DDPO_PYTHON_MODULE
// setup.py builds this file as the Python extension ddpo_kernels._C: an empty module whose import
// runs the registrations below. The JIT build (a plain shared library) does not need it.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ddpo_ops native operators (torch.ops.ddpo_ops)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif

// The trailing `cuda_stream` is the raw cudaStream_t of the caller's current stream (0 on
// CPU): the CUDA sources avoid c10/cuda so that they build against CPU torch wheels too.
TORCH_LIBRARY(ddpo_ops, m) {
  m.def("logprob_rows_forward(Tensor logits, Tensor targets, int cuda_stream=0) -> (Tensor, Tensor)");
  m.def(
      "logprob_rows_backward_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor grad, int cuda_stream=0) -> ()");
}

TORCH_LIBRARY_IMPL(ddpo_ops, CPU, m) {
  m.impl("logprob_rows_forward", &ddpo::logprob_rows_forward_cpu);
  m.impl("logprob_rows_backward_", &ddpo::logprob_rows_backward_cpu);
}
