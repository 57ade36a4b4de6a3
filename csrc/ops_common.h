// Host-side argument checks shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) row operators.
//
// Only ATen core headers: this file is also compiled by nvcc against a CPU-only torch build
// (see tests/test_native_ops.py), where ATen/cuda and c10/cuda headers are absent.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace ddpo {

// Checks shared by logprob_rows_forward / logprob_rows_backward_: a [C, V] block of logits whose
// rows are contiguous, one target per row.
inline void check_rows(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [C, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, op,
              ": logits rows must be contiguous (stride(-1) == 1), got strides ", logits.strides(),
              "; pass logits.contiguous()");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  const int64_t C = logits.size(0);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == C, op, ": targets must be [C] = [", C, "], got shape ",
              targets.sizes());
  TORCH_CHECK(!at::isFloatingType(targets.scalar_type()), op, ": targets must be an integer tensor, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.device() == logits.device(), op, ": targets are on ", targets.device(),
              " but logits are on ", logits.device());
}

// A [C] float32 vector on the logits' device (lse, per-row gradients).
inline void check_row_vector(const at::Tensor& logits, const at::Tensor& v, const char* name, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == logits.size(0), op, ": ", name, " must be [C] = [", logits.size(0),
              "], got shape ", v.sizes());
  TORCH_CHECK(v.device() == logits.device(), op, ": ", name, " is on ", v.device(), " but logits are on ",
              logits.device());
}

// The backward writes every row in place, so rows must not share memory (expand()ed views).
inline void check_rows_disjoint(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), op,
              ": logits rows overlap in memory (stride(0) = ", logits.stride(0), " < V = ", logits.size(1),
              "); the in-place backward needs its own buffer, pass logits.contiguous()");
}

// Calls f with a value of the logits' element type (check_rows has rejected any other dtype).
template <typename F>
void dispatch_logits(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "logits dtype ", st, " is not float32, float16 or bfloat16");
  }
}

}  // namespace ddpo
