// Native operators of the log-prob / loss path: schemas (TORCH_LIBRARY) and CPU kernels.
//
// Where this sits: kernels/chunk_ops.py calls these through torch.ops.ddpo_ops.* for each
// [C, V] logits chunk of the chunked "torch" backend, and for the loss epilogue; the CUDA
// kernels of the same ops live in ops_cuda.cu. Semantics (and the pure-PyTorch references
// the tests compare against) are documented in kernels/chunk_ops.py.
//
// CPU design: at::parallel_for over rows; per row one max pass and one exp-sum pass in fp32
// with explicit SIMD (vector extensions) and a polynomial exp, because libm's expf and float
// selects do not vectorise without -ffast-math, which we avoid since it breaks inf
// handling; per-token log-probs go to a [C] buffer and are added to the segment sums
// serially in double, so results do not depend on the thread count.
// target_clones builds x86-64-v3 (AVX2, FMA, F16C) and baseline variants; the loader picks one
// at run time.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "epilogue_math.h"
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
DDPO_INLINE void fwd_rows_impl(const T* logits, int64_t ld, int64_t V, const int64_t* targets, const int64_t* segs,
                               int64_t ignore_index, float* lse, float* logp, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const T* x = logits + i * ld;
    const float l = row_lse(x, V);
    lse[i] = l;
    const int64_t t = targets[i];
    logp[i] = (t != ignore_index && segs[i] >= 0) ? to_f(x[t]) - l : 0.f;
  }
}

template <typename T>
DDPO_INLINE void bwd_rows_impl(T* logits, int64_t ld, int64_t V, const int64_t* targets, const int64_t* segs,
                               const float* lse, const float* grad_seg, int64_t ignore_index, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    T* x = logits + i * ld;
    const int64_t t = targets[i];
    if (t == ignore_index || segs[i] < 0) {
      for (int64_t j = 0; j < V; ++j) x[j] = T(0.f);
      continue;
    }
    const float g = grad_seg[segs[i]];
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
#define DDPO_DEFINE_ROWS(T, suffix)                                                                             \
  DDPO_CLONES void fwd_rows_##suffix(const T* logits, int64_t ld, int64_t V, const int64_t* targets,          \
                                     const int64_t* segs, int64_t ignore_index, float* lse, float* logp,      \
                                     int64_t b, int64_t e) {                                                   \
    fwd_rows_impl<T>(logits, ld, V, targets, segs, ignore_index, lse, logp, b, e);                             \
  }                                                                                                            \
  DDPO_CLONES void bwd_rows_##suffix(T* logits, int64_t ld, int64_t V, const int64_t* targets,                \
                                     const int64_t* segs, const float* lse, const float* grad_seg,            \
                                     int64_t ignore_index, int64_t b, int64_t e) {                             \
    bwd_rows_impl<T>(logits, ld, V, targets, segs, lse, grad_seg, ignore_index, b, e);                         \
  }

DDPO_DEFINE_ROWS(float, f32)
DDPO_DEFINE_ROWS(c10::Half, f16)
DDPO_DEFINE_ROWS(c10::BFloat16, bf16)

inline void fwd_rows(const float* p, int64_t ld, int64_t V, const int64_t* t, const int64_t* s, int64_t ii, float* lse,
                     float* logp, int64_t b, int64_t e) {
  fwd_rows_f32(p, ld, V, t, s, ii, lse, logp, b, e);
}
inline void fwd_rows(const c10::Half* p, int64_t ld, int64_t V, const int64_t* t, const int64_t* s, int64_t ii,
                     float* lse, float* logp, int64_t b, int64_t e) {
  fwd_rows_f16(p, ld, V, t, s, ii, lse, logp, b, e);
}
inline void fwd_rows(const c10::BFloat16* p, int64_t ld, int64_t V, const int64_t* t, const int64_t* s, int64_t ii,
                     float* lse, float* logp, int64_t b, int64_t e) {
  fwd_rows_bf16(p, ld, V, t, s, ii, lse, logp, b, e);
}
inline void bwd_rows(float* p, int64_t ld, int64_t V, const int64_t* t, const int64_t* s, const float* lse,
                     const float* g, int64_t ii, int64_t b, int64_t e) {
  bwd_rows_f32(p, ld, V, t, s, lse, g, ii, b, e);
}
inline void bwd_rows(c10::Half* p, int64_t ld, int64_t V, const int64_t* t, const int64_t* s, const float* lse,
                     const float* g, int64_t ii, int64_t b, int64_t e) {
  bwd_rows_f16(p, ld, V, t, s, lse, g, ii, b, e);
}
inline void bwd_rows(c10::BFloat16* p, int64_t ld, int64_t V, const int64_t* t, const int64_t* s, const float* lse,
                     const float* g, int64_t ii, int64_t b, int64_t e) {
  bwd_rows_bf16(p, ld, V, t, s, lse, g, ii, b, e);
}

// The three logits dtypes (check_chunk has rejected any other).
template <typename F>
void dispatch_logits(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "logits dtype ", st, " is not float32, float16 or bfloat16");
  }
}

// Rows per parallel task: about 64K logits, so small chunks do not pay thread start-up.
inline int64_t grain_for(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// Bounds are checked once, serially, before any row is read: a bad target would
// otherwise read outside the row, and a bad segment id write outside the accumulators.
void check_indices(const int64_t* targets, const int64_t* segs, int64_t C, int64_t V, int64_t S, int64_t ignore_index,
                   const char* op) {
  for (int64_t i = 0; i < C; ++i) {
    if (targets[i] == ignore_index || segs[i] < 0) continue;
    TORCH_CHECK(targets[i] >= 0 && targets[i] < V, op, ": target ", targets[i], " at row ", i,
                " is outside the vocabulary [0, ", V, ") and is not ignore_index (", ignore_index, ")");
    TORCH_CHECK(segs[i] < S, op, ": segment id ", segs[i], " at row ", i, " is >= the number of segments S = ", S,
                "; size the [S] tensors to max(segment_ids) + 1");
  }
}

at::Tensor chunk_logprob_forward_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                     const at::Tensor& segment_ids, at::Tensor& seg_logps, at::Tensor& seg_counts,
                                     int64_t ignore_index, int64_t cuda_stream) {
  (void)cuda_stream;
  check_chunk(logits, targets, segment_ids, "chunk_logprob_forward");
  check_accumulators(logits, seg_logps, seg_counts);
  const int64_t C = logits.size(0), V = logits.size(1), S = seg_logps.size(0);
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  const at::Tensor s64 = segment_ids.to(at::kLong).contiguous();
  const int64_t* tp = t64.const_data_ptr<int64_t>();
  const int64_t* sp = s64.const_data_ptr<int64_t>();
  check_indices(tp, sp, C, V, S, ignore_index, "chunk_logprob_forward");

  at::Tensor lse = at::empty({C}, logits.options().dtype(at::kFloat));
  if (C == 0) return lse;
  TORCH_CHECK(V > 0, "chunk_logprob_forward: the vocabulary dimension is empty (V = 0)");
  std::vector<float> logp(C);
  float* lse_p = lse.mutable_data_ptr<float>();
  const int64_t ld = logits.stride(0);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, C, grain_for(V), [&](int64_t b, int64_t e) {
      fwd_rows(x, ld, V, tp, sp, ignore_index, lse_p, logp.data(), b, e);
    });
  });

  // Serial, in row order, in double: deterministic whatever the thread count.
  std::vector<double> acc(S, 0.0);
  std::vector<int64_t> cnt(S, 0);
  for (int64_t i = 0; i < C; ++i) {
    if (tp[i] == ignore_index || sp[i] < 0) continue;
    acc[sp[i]] += logp[i];
    cnt[sp[i]] += 1;
  }
  float* out_l = seg_logps.mutable_data_ptr<float>();
  int64_t* out_c = seg_counts.mutable_data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    if (cnt[s] == 0) continue;
    out_l[s] = static_cast<float>(out_l[s] + acc[s]);
    out_c[s] += cnt[s];
  }
  return lse;
}

void chunk_logprob_backward_cpu(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& segment_ids,
                                const at::Tensor& lse, const at::Tensor& grad_seg, int64_t ignore_index,
                                int64_t cuda_stream) {
  (void)cuda_stream;
  check_chunk(logits, targets, segment_ids, "chunk_logprob_backward_");
  check_rows_disjoint(logits, "chunk_logprob_backward_");
  const int64_t C = logits.size(0), V = logits.size(1);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == C, "chunk_logprob_backward_: lse must be [C] = [", C, "], got shape ",
              lse.sizes());
  TORCH_CHECK(grad_seg.dim() == 1, "chunk_logprob_backward_: grad_seg must be [S], got shape ", grad_seg.sizes());
  TORCH_CHECK(lse.device() == logits.device() && grad_seg.device() == logits.device(),
              "chunk_logprob_backward_: lse and grad_seg must be on ", logits.device());
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  const at::Tensor s64 = segment_ids.to(at::kLong).contiguous();
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  const at::Tensor g32 = grad_seg.to(at::kFloat).contiguous();
  const int64_t* tp = t64.const_data_ptr<int64_t>();
  const int64_t* sp = s64.const_data_ptr<int64_t>();
  check_indices(tp, sp, C, V, grad_seg.size(0), ignore_index, "chunk_logprob_backward_");
  if (C == 0 || V == 0) return;
  const float* lp = lse32.const_data_ptr<float>();
  const float* gp = g32.const_data_ptr<float>();
  const int64_t ld = logits.stride(0);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, grain_for(V), [&](int64_t b, int64_t e) {
      bwd_rows(x, ld, V, tp, sp, lp, gp, ignore_index, b, e);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> preference_epilogue_cpu(
    c10::string_view objective, const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& chosen_counts,
    const at::Tensor& rejected_counts, double beta, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& ref_chosen, const std::optional<at::Tensor>& ref_rejected, int64_t cuda_stream) {
  (void)cuda_stream;
  const EpilogueInputs in = prepare_epilogue(std::string_view(objective.data(), objective.size()), chosen, rejected,
                                             chosen_counts, rejected_counts, beta, weights, ref_chosen, ref_rejected);
  const int64_t P = in.P;
  const double* pc = in.pc.const_data_ptr<double>();
  const double* pr = in.pr.const_data_ptr<double>();
  const double* nc = in.nc.const_data_ptr<double>();
  const double* nr = in.nr.const_data_ptr<double>();
  const double* w = in.w.has_value() ? in.w->const_data_ptr<double>() : nullptr;
  auto opts = chosen.options().dtype(at::kFloat);
  at::Tensor loss_t = at::empty({}, opts);
  at::Tensor gc_t = at::zeros({P}, opts);
  at::Tensor gr_t = at::zeros({P}, opts);
  float* gc = gc_t.mutable_data_ptr<float>();
  float* gr = gr_t.mutable_data_ptr<float>();
  double loss = 0.0;

  if (in.objective == kSFT) {
    double sum_l = 0.0, sum_n = 0.0;
    for (int64_t i = 0; i < P; ++i) sum_l += pc[i], sum_n += nc[i];
    const double denom = std::max(sum_n, 1.0);
    loss = -sum_l / denom;
    for (int64_t i = 0; i < P; ++i) gc[i] = static_cast<float>(-1.0 / denom);
  } else if (in.objective == kDPO || in.objective == kDDPO) {
    const double* rc = in.rc->const_data_ptr<double>();
    const double* rr = in.rr->const_data_ptr<double>();
    for (int64_t i = 0; i < P; ++i) {
      double dpc, dpr;
      loss += ddpo_pair(pc[i], pr[i], rc[i], rr[i], w ? w[i] : 1.0, beta, &dpc, &dpr);
      gc[i] = static_cast<float>(dpc / P);
      gr[i] = static_cast<float>(dpr / P);
    }
    loss /= P;
  } else {  // orpo / dorpo: mean(w) * chosen_nll - mean(beta * logsigmoid(w * log_odds))
    double sum_l = 0.0, sum_n = 0.0, sum_w = 0.0;
    for (int64_t i = 0; i < P; ++i) sum_l += pc[i], sum_n += nc[i], sum_w += w ? w[i] : 1.0;
    const double denom = std::max(sum_n, 1.0);
    const double w_mean = sum_w / P;
    double odds = 0.0;
    for (int64_t i = 0; i < P; ++i) {
      double dsc, dsr;
      odds += orpo_pair(pc[i], pr[i], nc[i], nr[i], w ? w[i] : 1.0, beta, &dsc, &dsr);
      gc[i] = static_cast<float>(-w_mean / denom - dsc / P);
      gr[i] = static_cast<float>(-dsr / P);
    }
    loss = w_mean * (-sum_l / denom) - odds / P;
  }
  loss_t.fill_(loss);
  return {loss_t, gc_t, gr_t};
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
  m.def(
      "chunk_logprob_forward(Tensor logits, Tensor targets, Tensor segment_ids, Tensor(a!) seg_logps, "
      "Tensor(b!) seg_counts, int ignore_index=-100, int cuda_stream=0) -> Tensor");
  m.def(
      "chunk_logprob_backward_(Tensor(a!) logits, Tensor targets, Tensor segment_ids, Tensor lse, "
      "Tensor grad_seg, int ignore_index=-100, int cuda_stream=0) -> ()");
  m.def(
      "preference_epilogue(str objective, Tensor chosen_logps, Tensor rejected_logps, Tensor chosen_counts, "
      "Tensor rejected_counts, float beta, Tensor? chosen_weights=None, Tensor? ref_chosen_logps=None, "
      "Tensor? ref_rejected_logps=None, int cuda_stream=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddpo_ops, CPU, m) {
  m.impl("chunk_logprob_forward", &ddpo::chunk_logprob_forward_cpu);
  m.impl("chunk_logprob_backward_", &ddpo::chunk_logprob_backward_cpu);
  m.impl("preference_epilogue", &ddpo::preference_epilogue_cpu);
}
