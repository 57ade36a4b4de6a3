// CUDA kernels of the ddpo_ops operators (schemas and CPU kernels: ops.cpp).
//
// Where this sits: kernels/chunk_ops.py calls torch.ops.ddpo_ops.* on CUDA tensors when the
// extension was built with nvcc (setup.py); the Triton backend of kernels/ is the main GPU
// path, these serve the chunked "torch" backend and GPUs/platforms without Triton.
//
// Headers: only torch/library.h, ATen core and cuda_runtime.h, so this file compiles against a
// CPU-only torch wheel with a minimal CUDA toolkit (tests/test_native_ops.py compiles it with
// nvcc wherever nvcc exists). Consequences, by design:
// - the stream is the raw cudaStream_t passed by the caller as `cuda_stream` (chunk_ops.py
//   passes torch.cuda.current_stream().cuda_stream); 0 means the legacy default stream;
// - the device is set with cudaSetDevice around the launches (restored afterwards);
// - launch errors are read with cudaGetLastError and raised as c10::Error.
// Determinism: segment sums are reduced by one block per segment over a [C] buffer of
// per-token log-probs in a fixed order (no float atomics), so results are bitwise
// reproducible. Out-of-range targets or segment ids cannot be checked on the host without a
// device sync; the kernels never read or write out of bounds and instead return NaN for the
// row's lse (a bad target also puts NaN into its segment's sum; a bad segment id makes the
// backward write NaN gradients), so that the loss shows the bad input.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "epilogue_math.h"
#include "ops_common.h"

namespace ddpo {
namespace {

constexpr int kThreads = 256;

struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev);
    if (device >= 0 && device != prev) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    cudaGetDevice(&cur);
    if (prev >= 0 && cur != prev) cudaSetDevice(prev);
  }
};

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(s)); }

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(c10::Half v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

// Merge two (max, sum of exp(x - max)) pairs; an empty side has max = -inf and sum 0.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else {
    s = s + s2 * expf(m2 - m);
  }
}

// One block per row: online (max, sum-exp) per thread over a strided slice, then a warp
// shuffle and a shared-memory merge across warps. Writes lse[row] and logp[row].
template <typename T>
__global__ void fwd_rows_kernel(const T* __restrict__ logits, int64_t ld, int64_t V,
                                const int64_t* __restrict__ targets, const int64_t* __restrict__ segs, int64_t S,
                                int64_t ignore_index, float* __restrict__ lse, float* __restrict__ logp) {
  const int64_t row = blockIdx.x;  // int64 before it multiplies the stride
  const T* x = logits + row * ld;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = to_f(x[j]);
    if (v > m) {
      s = (m == -INFINITY ? 0.f : s * expf(m - v)) + 1.f;
      m = v;
    } else if (v != -INFINITY) {
      s += expf(v - m);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  __shared__ float sm[kThreads / 32], ss[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = sm[0], bs = ss[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) lse_merge(bm, bs, sm[w], ss[w]);
    const float l = bm == -INFINITY ? -INFINITY : bm + logf(bs);
    const int64_t t = targets[row];
    const int64_t seg = segs[row];
    float lp = 0.f;
    float out_l = l;
    if (t != ignore_index && seg >= 0) {
      if (t < 0 || t >= V || seg >= S) {
        out_l = NAN;  // bad index: poison instead of reading out of bounds
        lp = NAN;
      } else {
        lp = to_f(x[t]) - l;
      }
    }
    lse[row] = out_l;
    logp[row] = lp;
  }
}

// Block-wide sum of a double and an int64 (result valid in thread 0).
__device__ __forceinline__ void block_sum(double& a, long long& c) {
  __shared__ double sa[kThreads / 32];
  __shared__ long long sc[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    c += __shfl_xor_sync(0xffffffffu, c, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sa[warp] = a;
    sc[warp] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      a += sa[w];
      c += sc[w];
    }
  }
  __syncthreads();
}

// One block per segment: fixed-order reduction of the per-token log-probs of its tokens.
__global__ void segment_sum_kernel(const float* __restrict__ logp, const int64_t* __restrict__ targets,
                                   const int64_t* __restrict__ segs, int64_t C, int64_t ignore_index,
                                   float* __restrict__ seg_logps, int64_t* __restrict__ seg_counts) {
  const int64_t s = blockIdx.x;
  double acc = 0.0;
  long long cnt = 0;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    if (segs[i] == s && targets[i] != ignore_index) {
      acc += logp[i];
      cnt += 1;
    }
  }
  block_sum(acc, cnt);
  if (threadIdx.x == 0 && cnt > 0) {
    seg_logps[s] = static_cast<float>(seg_logps[s] + acc);
    seg_counts[s] += cnt;
  }
}

// One block per row: x := g * (onehot(t) - exp(x - lse)), zeros for non-contributing rows.
template <typename T>
__global__ void bwd_rows_kernel(T* __restrict__ logits, int64_t ld, int64_t V, const int64_t* __restrict__ targets,
                                const int64_t* __restrict__ segs, int64_t S, const float* __restrict__ lse,
                                const float* __restrict__ grad_seg, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * ld;
  const int64_t t = targets[row];
  const int64_t seg = segs[row];
  if (t == ignore_index || seg < 0) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) x[j] = T(0.f);
    return;
  }
  // A bad segment id gives NaN gradients rather than an out-of-bounds read.
  const float g = seg < S ? grad_seg[seg] : NAN;
  const float l = lse[row];
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float d = to_f(x[j]) - l;
    // At the target: g * (1 - p) = g * -expm1(d), exact where p is close to 1.
    x[j] = T(j == t ? g * -expm1f(d) : -g * expf(d));
  }
}

template <typename F>
void dispatch_logits(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "logits dtype ", st, " is not float32, float16 or bfloat16");
  }
}

at::Tensor chunk_logprob_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                      const at::Tensor& segment_ids, at::Tensor& seg_logps, at::Tensor& seg_counts,
                                      int64_t ignore_index, int64_t cuda_stream) {
  check_chunk(logits, targets, segment_ids, "chunk_logprob_forward");
  check_accumulators(logits, seg_logps, seg_counts);
  DeviceGuard guard(logits.device().index());
  const cudaStream_t stream = as_stream(cuda_stream);
  const int64_t C = logits.size(0), V = logits.size(1), S = seg_logps.size(0);
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  const at::Tensor s64 = segment_ids.to(at::kLong).contiguous();
  at::Tensor lse = at::empty({C}, logits.options().dtype(at::kFloat));
  if (C == 0) return lse;
  TORCH_CHECK(V > 0, "chunk_logprob_forward: the vocabulary dimension is empty (V = 0)");
  TORCH_CHECK(C <= 2147483647LL, "chunk_logprob_forward: C = ", C, " rows exceed the CUDA grid; split the chunk");
  at::Tensor logp = at::empty({C}, logits.options().dtype(at::kFloat));
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_rows_kernel<T><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        logits.const_data_ptr<T>(), logits.stride(0), V, t64.const_data_ptr<int64_t>(),
        s64.const_data_ptr<int64_t>(), S, ignore_index, lse.mutable_data_ptr<float>(),
        logp.mutable_data_ptr<float>());
  });
  check_launch("chunk_logprob_forward");
  if (S > 0) {
    segment_sum_kernel<<<static_cast<unsigned>(S), kThreads, 0, stream>>>(
        logp.const_data_ptr<float>(), t64.const_data_ptr<int64_t>(), s64.const_data_ptr<int64_t>(), C, ignore_index,
        seg_logps.mutable_data_ptr<float>(), seg_counts.mutable_data_ptr<int64_t>());
    check_launch("chunk_logprob_forward (segment sums)");
  }
  return lse;
}

void chunk_logprob_backward_cuda(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& segment_ids,
                                 const at::Tensor& lse, const at::Tensor& grad_seg, int64_t ignore_index,
                                 int64_t cuda_stream) {
  check_chunk(logits, targets, segment_ids, "chunk_logprob_backward_");
  check_rows_disjoint(logits, "chunk_logprob_backward_");
  const int64_t C = logits.size(0), V = logits.size(1);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == C, "chunk_logprob_backward_: lse must be [C] = [", C, "], got shape ",
              lse.sizes());
  TORCH_CHECK(grad_seg.dim() == 1, "chunk_logprob_backward_: grad_seg must be [S], got shape ", grad_seg.sizes());
  TORCH_CHECK(lse.device() == logits.device() && grad_seg.device() == logits.device(),
              "chunk_logprob_backward_: lse and grad_seg must be on ", logits.device());
  if (C == 0 || V == 0) return;
  DeviceGuard guard(logits.device().index());
  const cudaStream_t stream = as_stream(cuda_stream);
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  const at::Tensor s64 = segment_ids.to(at::kLong).contiguous();
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  const at::Tensor g32 = grad_seg.to(at::kFloat).contiguous();
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bwd_rows_kernel<T><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        logits.mutable_data_ptr<T>(), logits.stride(0), V, t64.const_data_ptr<int64_t>(),
        s64.const_data_ptr<int64_t>(), grad_seg.size(0), lse32.const_data_ptr<float>(), g32.const_data_ptr<float>(),
        ignore_index);
  });
  check_launch("chunk_logprob_backward_");
}

// Block-wide sum of a double (result broadcast to every thread).
__device__ double block_sum_all(double a) {
  __shared__ double sa[kThreads / 32];
  __shared__ double total;
  for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sa[warp] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t += sa[w];
    total = t;
  }
  __syncthreads();
  const double out = total;
  __syncthreads();  // total is reused by the next call
  return out;
}

// The whole epilogue in one block (P is the number of pairs of a micro-batch): the same
// per-pair terms and derivatives as the CPU kernel (epilogue_math.h), reductions in double.
__global__ void epilogue_kernel(int objective, int64_t P, double beta, const double* __restrict__ pc,
                                const double* __restrict__ pr, const double* __restrict__ nc,
                                const double* __restrict__ nr, const double* __restrict__ w,
                                const double* __restrict__ rc, const double* __restrict__ rr, float* __restrict__ loss,
                                float* __restrict__ gc, float* __restrict__ gr) {
  double sum_l = 0.0, sum_n = 0.0, sum_w = 0.0;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    sum_l += pc[i];
    sum_n += nc[i];
    sum_w += w ? w[i] : 1.0;
  }
  sum_l = block_sum_all(sum_l);
  sum_n = block_sum_all(sum_n);
  sum_w = block_sum_all(sum_w);
  const double denom = sum_n > 1.0 ? sum_n : 1.0;
  const double w_mean = sum_w / P;
  double terms = 0.0;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    double a = 0.0, b = 0.0;
    if (objective == kSFT) {
      gc[i] = static_cast<float>(-1.0 / denom);
      gr[i] = 0.f;
    } else if (objective == kDPO || objective == kDDPO) {
      terms += ddpo_pair(pc[i], pr[i], rc[i], rr[i], w ? w[i] : 1.0, beta, &a, &b);
      gc[i] = static_cast<float>(a / P);
      gr[i] = static_cast<float>(b / P);
    } else {
      terms += orpo_pair(pc[i], pr[i], nc[i], nr[i], w ? w[i] : 1.0, beta, &a, &b);
      gc[i] = static_cast<float>(-w_mean / denom - a / P);
      gr[i] = static_cast<float>(-b / P);
    }
  }
  terms = block_sum_all(terms);
  if (threadIdx.x == 0) {
    double l;
    if (objective == kSFT) {
      l = -sum_l / denom;
    } else if (objective == kDPO || objective == kDDPO) {
      l = terms / P;
    } else {
      l = w_mean * (-sum_l / denom) - terms / P;
    }
    *loss = static_cast<float>(l);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> preference_epilogue_cuda(
    c10::string_view objective, const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& chosen_counts,
    const at::Tensor& rejected_counts, double beta, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& ref_chosen, const std::optional<at::Tensor>& ref_rejected, int64_t cuda_stream) {
  const EpilogueInputs in = prepare_epilogue(std::string_view(objective.data(), objective.size()), chosen, rejected,
                                             chosen_counts, rejected_counts, beta, weights, ref_chosen, ref_rejected);
  DeviceGuard guard(chosen.device().index());
  auto opts = chosen.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor gc = at::empty({in.P}, opts);
  at::Tensor gr = at::empty({in.P}, opts);
  auto ptr = [](const std::optional<at::Tensor>& t) -> const double* {
    return t.has_value() ? t->const_data_ptr<double>() : nullptr;
  };
  epilogue_kernel<<<1, kThreads, 0, as_stream(cuda_stream)>>>(
      static_cast<int>(in.objective), in.P, beta, in.pc.const_data_ptr<double>(), in.pr.const_data_ptr<double>(),
      in.nc.const_data_ptr<double>(), in.nr.const_data_ptr<double>(), ptr(in.w), ptr(in.rc), ptr(in.rr),
      loss.mutable_data_ptr<float>(), gc.mutable_data_ptr<float>(), gr.mutable_data_ptr<float>());
  check_launch("preference_epilogue");
  return {loss, gc, gr};
}

}  // namespace
}  // namespace ddpo

TORCH_LIBRARY_IMPL(ddpo_ops, CUDA, m) {
  m.impl("chunk_logprob_forward", &ddpo::chunk_logprob_forward_cuda);
  m.impl("chunk_logprob_backward_", &ddpo::chunk_logprob_backward_cuda);
  m.impl("preference_epilogue", &ddpo::preference_epilogue_cuda);
}
