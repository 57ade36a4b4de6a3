// CUDA kernels of the ddpo_ops row operators (schemas and CPU kernels: ops.cpp).
//
// Where this sits: ddpo_kernels/chunk_logprob.py calls torch.ops.ddpo_ops.* on CUDA tensors when the
// extension was built with nvcc (setup.py) and the "torch" backend runs on a GPU; the "triton"
// backend (the default on GPUs) uses the Triton row kernels of the same file instead.
//
// Headers: only torch/library.h, ATen core and cuda_runtime.h, so this file compiles against a
// CPU-only torch wheel with a minimal CUDA toolkit (tests/test_native_ops.py compiles it with
// nvcc wherever nvcc exists). Consequences, by design:
// - the stream is the raw cudaStream_t passed by the caller as `cuda_stream` (chunk_logprob.py
//   passes torch.cuda.current_stream().cuda_stream); 0 means the legacy default stream;
// - the device is set with cudaSetDevice around the launches (restored afterwards);
// - launch errors are read with cudaGetLastError and raised as c10::Error.
// Out-of-range targets cannot be checked on the host without a device sync; the kernels never
// read or write out of bounds and instead return NaN for the row's log-prob, so that the loss
// shows the bad input. Each row is reduced by one block in a fixed order: results do not depend
// on the other rows of the block and are bitwise reproducible.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <tuple>

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
                                const int64_t* __restrict__ targets, float* __restrict__ lse,
                                float* __restrict__ logp) {
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
    lse[row] = l;
    logp[row] = (t >= 0 && t < V) ? to_f(x[t]) - l : NAN;  // a bad target poisons its row, never reads outside
  }
}

// One block per row: x := g * (onehot(t) - exp(x - lse)).
template <typename T>
__global__ void bwd_rows_kernel(T* __restrict__ logits, int64_t ld, int64_t V, const int64_t* __restrict__ targets,
                                const float* __restrict__ lse, const float* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * ld;
  const int64_t t = targets[row];
  const float g = grad[row];
  const float l = lse[row];
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float d = to_f(x[j]) - l;
    // At the target: g * (1 - p) = g * -expm1(d), exact where p is close to 1.
    x[j] = T(j == t ? g * -expm1f(d) : -g * expf(d));
  }
}

std::tuple<at::Tensor, at::Tensor> logprob_rows_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                              int64_t cuda_stream) {
  check_rows(logits, targets, "logprob_rows_forward");
  DeviceGuard guard(logits.device().index());
  const int64_t C = logits.size(0), V = logits.size(1);
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  at::Tensor lse = at::empty({C}, logits.options().dtype(at::kFloat));
  at::Tensor logp = at::empty({C}, logits.options().dtype(at::kFloat));
  if (C == 0) return {lse, logp};
  TORCH_CHECK(V > 0, "logprob_rows_forward: the vocabulary dimension is empty (V = 0)");
  TORCH_CHECK(C <= 2147483647LL, "logprob_rows_forward: C = ", C, " rows exceed the CUDA grid; split the block");
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_rows_kernel<T><<<static_cast<unsigned>(C), kThreads, 0, as_stream(cuda_stream)>>>(
        logits.const_data_ptr<T>(), logits.stride(0), V, t64.const_data_ptr<int64_t>(),
        lse.mutable_data_ptr<float>(), logp.mutable_data_ptr<float>());
  });
  check_launch("logprob_rows_forward");
  return {lse, logp};
}

void logprob_rows_backward_cuda(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                const at::Tensor& grad, int64_t cuda_stream) {
  check_rows(logits, targets, "logprob_rows_backward_");
  check_rows_disjoint(logits, "logprob_rows_backward_");
  check_row_vector(logits, lse, "lse", "logprob_rows_backward_");
  check_row_vector(logits, grad, "grad", "logprob_rows_backward_");
  const int64_t C = logits.size(0), V = logits.size(1);
  if (C == 0 || V == 0) return;
  DeviceGuard guard(logits.device().index());
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  const at::Tensor g32 = grad.to(at::kFloat).contiguous();
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bwd_rows_kernel<T><<<static_cast<unsigned>(C), kThreads, 0, as_stream(cuda_stream)>>>(
        logits.mutable_data_ptr<T>(), logits.stride(0), V, t64.const_data_ptr<int64_t>(),
        lse32.const_data_ptr<float>(), g32.const_data_ptr<float>());
  });
  check_launch("logprob_rows_backward_");
}

}  // namespace
}  // namespace ddpo

TORCH_LIBRARY_IMPL(ddpo_ops, CUDA, m) {
  m.impl("logprob_rows_forward", &ddpo::logprob_rows_forward_cuda);
  m.impl("logprob_rows_backward_", &ddpo::logprob_rows_backward_cuda);
}
