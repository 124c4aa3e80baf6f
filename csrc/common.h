// Shared declarations of the zygote_torch custom ops (CPU and CUDA).
//
// Every op works on contiguous row-major tensors; the Python wrappers in zygote_torch/ops reshape
// (rows = all leading dims, columns = the reduced/normalised trailing dims), make inputs contiguous
// and pick the op or the pure-torch formula. Accumulation is in float (double for double inputs).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <string>
#include <tuple>

namespace zt {

using at::Tensor;

// The schemas (registered once, in ops_cpu.cpp, with TORCH_LIBRARY(zygote_torch, m)).
inline const char* const kSchemas[] = {
    "cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing) -> (Tensor, Tensor)",
    "cross_entropy_bwd(Tensor grad, Tensor logits, Tensor target, Tensor lse, int ignore_index, float label_smoothing) -> Tensor",
    "layer_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight) -> (Tensor, Tensor, Tensor)",
    "rms_norm_bwd(Tensor dy, Tensor x, Tensor? rstd, Tensor? weight, float eps) -> (Tensor, Tensor)",
    "softmax_bwd(Tensor dy, Tensor y) -> Tensor",
    "log_softmax_bwd(Tensor dy, Tensor y) -> Tensor",
    "gelu_bwd(Tensor dy, Tensor x, str approximate) -> Tensor",
    "silu_bwd(Tensor dy, Tensor x) -> Tensor",
    "swiglu_fwd(Tensor a, Tensor b) -> Tensor",
    "swiglu_bwd(Tensor dy, Tensor a, Tensor b) -> (Tensor, Tensor)",
    "embedding_bwd(Tensor dy, Tensor indices, int num_weights, int padding_idx) -> Tensor",
};

// Argument checks shared by both backends (messages name the op).
void check_same(const char* op, const Tensor& a, const Tensor& b);
void check_float(const char* op, const Tensor& a);
int gelu_mode(const std::string& approximate);
// Per op: what both backends require of the arguments (each backend adds its own limits).
void check_cross_entropy_fwd_args(const Tensor& logits, const Tensor& target);
void check_cross_entropy_bwd_args(const Tensor& grad, const Tensor& logits, const Tensor& target, const Tensor& lse);
void check_norm_bwd_args(const char* op, const Tensor& dy, const Tensor& x);  // layer_norm_bwd, rms_norm_bwd
void check_softmax_bwd_args(const char* op, const Tensor& dy, const Tensor& y);
void check_embedding_bwd_args(const Tensor& dy, const Tensor& indices, int64_t num_weights);

}  // namespace zt
