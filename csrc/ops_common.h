// Host-side argument checks and input preparation shared by the CPU and CUDA operators.
//
// Only ATen core headers: this file is also compiled by nvcc against a CPU-only torch
// build (see tests/test_native_ops.py), where ATen/cuda and c10/cuda headers are absent.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

#include "epilogue_math.h"

namespace ddpo {

// Checks shared by chunk_logprob_forward / chunk_logprob_backward_.
inline void check_chunk(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& segment_ids,
                        const char* op) {
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
  TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.size(0) == C, op, ": segment_ids must be [C] = [", C,
              "], got shape ", segment_ids.sizes());
  TORCH_CHECK(!at::isFloatingType(targets.scalar_type()) && !at::isFloatingType(segment_ids.scalar_type()), op,
              ": targets and segment_ids must be integer tensors, got ", targets.scalar_type(), " and ",
              segment_ids.scalar_type());
  TORCH_CHECK(targets.device() == logits.device() && segment_ids.device() == logits.device(), op,
              ": all tensors must be on the logits' device ", logits.device(), ", got targets on ", targets.device(),
              " and segment_ids on ", segment_ids.device());
}

// The backward writes every row in place, so rows must not share memory (expand()ed views).
inline void check_rows_disjoint(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), op,
              ": logits rows overlap in memory (stride(0) = ", logits.stride(0), " < V = ", logits.size(1),
              "); the in-place backward needs its own buffer, pass logits.contiguous()");
}

inline void check_accumulators(const at::Tensor& logits, const at::Tensor& seg_logps, const at::Tensor& seg_counts) {
  TORCH_CHECK(seg_logps.dim() == 1 && seg_logps.scalar_type() == at::kFloat && seg_logps.is_contiguous(),
              "chunk_logprob_forward: seg_logps must be a contiguous float32 [S] accumulator, got ",
              seg_logps.scalar_type(), " of shape ", seg_logps.sizes());
  TORCH_CHECK(seg_counts.dim() == 1 && seg_counts.scalar_type() == at::kLong && seg_counts.is_contiguous() &&
                  seg_counts.size(0) == seg_logps.size(0),
              "chunk_logprob_forward: seg_counts must be a contiguous int64 [S] accumulator with S = ",
              seg_logps.size(0), ", got ", seg_counts.scalar_type(), " of shape ", seg_counts.sizes());
  TORCH_CHECK(seg_logps.device() == logits.device() && seg_counts.device() == logits.device(),
              "chunk_logprob_forward: accumulators must be on ", logits.device(), ", got ", seg_logps.device(),
              " and ", seg_counts.device());
}

inline Objective parse_objective(std::string_view name) {
  if (name == "dpo") return kDPO;
  if (name == "ddpo") return kDDPO;
  if (name == "orpo") return kORPO;
  if (name == "dorpo") return kDORPO;
  if (name == "sft") return kSFT;
  TORCH_CHECK(false, "preference_epilogue: unknown objective '", std::string(name),
              "'; valid objectives are dpo, ddpo, orpo, dorpo, sft");
  return kSFT;
}

// The epilogue's inputs as contiguous double [P] tensors on the input device; absent
// optional inputs stay empty (has_value() == false).
struct EpilogueInputs {
  Objective objective;
  int64_t P;
  at::Tensor pc, pr, nc, nr;
  std::optional<at::Tensor> w, rc, rr;
};

inline at::Tensor as_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

inline EpilogueInputs prepare_epilogue(std::string_view objective, const at::Tensor& chosen,
                                       const at::Tensor& rejected, const at::Tensor& chosen_counts,
                                       const at::Tensor& rejected_counts, double beta,
                                       const std::optional<at::Tensor>& weights,
                                       const std::optional<at::Tensor>& ref_chosen,
                                       const std::optional<at::Tensor>& ref_rejected) {
  EpilogueInputs in;
  in.objective = parse_objective(objective);
  TORCH_CHECK(chosen.dim() == 1 && chosen.size(0) >= 1,
              "preference_epilogue: chosen_logps must be [P] with P >= 1, got shape ", chosen.sizes());
  in.P = chosen.size(0);
  auto check_p = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == in.P, "preference_epilogue: ", name, " must be [P] = [", in.P,
                "] like chosen_logps, got shape ", t.sizes());
    TORCH_CHECK(t.device() == chosen.device(), "preference_epilogue: ", name, " is on ", t.device(),
                " but chosen_logps is on ", chosen.device());
  };
  check_p(rejected, "rejected_logps");
  check_p(chosen_counts, "chosen_counts");
  check_p(rejected_counts, "rejected_counts");
  in.pc = as_double(chosen);
  in.pr = as_double(rejected);
  in.nc = as_double(chosen_counts);
  in.nr = as_double(rejected_counts);
  if (weights.has_value()) {
    check_p(*weights, "chosen_weights");
    // dpo/orpo ignore the weights by definition (engine.losses.preference_loss).
    if (in.objective == kDDPO || in.objective == kDORPO) in.w = as_double(*weights);
  }
  if (in.objective == kDPO || in.objective == kDDPO) {
    TORCH_CHECK(ref_chosen.has_value() && ref_rejected.has_value(), "preference_epilogue: objective '",
                std::string(objective), "' needs ref_chosen_logps and ref_rejected_logps (got ",
                ref_chosen.has_value() ? "ref_chosen_logps" : "no ref_chosen_logps", ", ",
                ref_rejected.has_value() ? "ref_rejected_logps" : "no ref_rejected_logps",
                "); build the reference cache");
    TORCH_CHECK(std::isfinite(beta) && beta > 0, "preference_epilogue: beta must be finite and > 0, got ", beta);
    check_p(*ref_chosen, "ref_chosen_logps");
    check_p(*ref_rejected, "ref_rejected_logps");
    in.rc = as_double(*ref_chosen);
    in.rr = as_double(*ref_rejected);
  } else if (in.objective != kSFT) {
    TORCH_CHECK(std::isfinite(beta) && beta >= 0,
                "preference_epilogue: beta (ORPO's lambda) must be finite and >= 0, got ", beta);
  }
  return in;
}

}  // namespace ddpo
