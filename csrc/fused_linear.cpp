// The native fused linear kernel: DPO log-probs from hidden states and an LM head, the
// [N, T, V] logits never in memory (fastdpo/backends/native_linear.py is the Python side;
// docs/fused_linear.md explains the design).
//
//   fastdpo::linear_forward(hidden, weight, bias?, row_n, row_t, labels, hidden_grad!?,
//                           row_tile, vocab_tile, half_operands, statistics=False)
//       -> (label_logit, lse, logit_sum, entropy, log_sum_sq_probs, is_top1)
//                                 (the last three [C] with statistics, empty without)
//   fastdpo::linear_weight_grad(hidden, weight, bias?, row_n, row_t, labels, lse, grad_rows,
//                               need_weight, need_bias, row_tile, vocab_tile, half_operands)
//       -> (grad_weight, grad_bias)                    (empty tensors for what is not needed)
//   fastdpo::linear_bf16_operands() -> bool            (does this machine take the bf16 GEMMs?)
//
// Only counted rows (row_n[c], row_t[c]) with their labels are projected. Products are
// brgemm tiles accumulating and writing float32 (csrc/fused_linear.h): bfloat16 x bfloat16
// where the CPU has bf16 dot-product instructions (AVX512-BF16, AMX) and half_operands is
// set, float32 x float32 otherwise (float32 inputs, float16 inputs, an odd hidden size, or an
// older CPU: bfloat16/float16 tiles are converted to float32 while packed).
//
// Forward, one task per row tile (r rows), vocabulary blocks (v columns) in order: GEMM 1 makes
// the logits tile, the fold keeps the online log-sum-exp, and with hidden_grad GEMM 2
// accumulates softmax . W for d log p(label) / d h (forward_row_tile in csrc/fused_linear.h).
// Weight gradient, one task per vocabulary block, row tiles in order (recompute_grad_tile):
//   x^T = W_block . h^T (GEMM 3), G^T = g * (onehot - exp(x - lse)) in place,
//   grad_W_block += G^T [v, r] . h [r, H] (GEMM 4), grad_b += row sums of G^T.
// With bfloat16 operands the float32 tile of a gradient GEMM is rounded to bfloat16. Where the
// result is one row's (GEMM 2: each term carries 2^-9 relative error and the row's sum is of
// the size of its terms; measured RMS error 1.4x, max 1.6-2x that of rounding the exact
// gradient to bfloat16, which the result then is anyway: benchmarks/linear_grad_error.py) once.
// Where the result sums over rows (GEMM 4: the head's gradient adds terms of both signs from
// thousands of rows and can be much smaller than them, so 2^-9 per large term would show; the
// parity tests saw 4% errors) the tile is rounded once too, but every entry above |g| / 256 -
// the label's g (1 - p) and the few large probabilities, at most 256 per row - gets its
// rounding error back in float32 after the GEMM (head_grad_tile in csrc/fused_linear.h): each
// entry then errs by at most 2^-17 |g|, the bound of a bfloat16 hi + lo split, for one GEMM
// pass instead of two (measured: the head's gradient as exact as its rounding to bfloat16).
// With statistics the forward's fold also keeps, per row, sum e (x - m) and sum e^2 (rebased as
// m grows) and the first maximum's index: entropy, log sum p^2 and is_top1 from the same tiles.
// Every task computes its rows or its block alone in a fixed order, so results do not depend
// on the number of threads. A row whose block is all -inf (masked vocabulary) adds nothing.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"
#include "fused_linear.h"

namespace {

using namespace fastdpo_linear;

template <bool Statistics, typename in_t, typename op_t>
void forward_kernel(const Problem<in_t>& p, in_t* hidden_grad, int64_t gs0, int64_t gs1, int64_t R, int64_t VB,
                    const ForwardOut& out) {
  TaskQueue tiles((p.C + R - 1) / R);
  at::parallel_for(0, tiles.workers(), 1, [&](int64_t, int64_t) {
    ForwardBuffers<in_t, op_t> buf(R, VB, p.H, hidden_grad != nullptr, Statistics);
    for (int64_t t; tiles.next(t);)
      forward_row_tile<Statistics>(p, t * R, std::min(R, p.C - t * R), VB, hidden_grad, gs0, gs1, out, buf);
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

// ---------------------------------------------------------------------------------------------
// Weight and bias gradients.

template <typename in_t, typename op_t>
void weight_grad_kernel(const Problem<in_t>& p, const float* lse, const float* grad_rows, in_t* grad_weight,
                        in_t* grad_bias, int64_t R, int64_t VB) {
  const int64_t H = p.H, V = p.V, C = p.C, tiles = (C + R - 1) / R, rp_max = pad_k<op_t>(R);
  // h^T (GEMM 3's B) and h (GEMM 4's B) of every row tile, packed once and shared.
  const std::vector<op_t> packT = pack_transposed_tiles<in_t, op_t>(p, R, 0);
  const std::vector<op_t> packV = grad_weight ? pack_hidden_tiles<in_t, op_t>(p, R) : std::vector<op_t>();
  const auto finite = finite_rows(lse, grad_rows, C);
  const std::vector<float>&g = finite.first, &lse_ref = finite.second;
  const std::vector<float> limit = exact_limits(g);
  constexpr bool in_place = std::is_same_v<in_t, float>;  // a float32 gradient accumulates in the output
  const int64_t blocks = (V + VB - 1) / VB;
  TaskQueue tasks(blocks);
  at::parallel_for(0, tasks.workers(), 1, [&](int64_t, int64_t) {
    const int64_t ldx = round_up(R, Vec::size());
    std::vector<float> xT(VB * ldx), gw_buf(in_place || !grad_weight ? 0 : VB * H), gb(VB);
    std::vector<op_t> wconv(std::is_same_v<in_t, op_t> ? 0 : VB * H), gA(kVnni<op_t> ? VB * rp_max : 0);
    for (int64_t b; tasks.next(b);) {
      const int64_t v0 = b * VB, vb = std::min(VB, V - v0);
      int64_t lda;
      const op_t* W = weight_block<in_t, op_t>(p, v0, vb, wconv, lda);
      float* gw = nullptr;
      if (grad_weight) {
        if constexpr (in_place) {
          gw = grad_weight + v0 * H;
        } else {
          gw = gw_buf.data();
        }
        std::fill_n(gw, vb * H, 0.0f);
      }
      std::fill_n(gb.begin(), vb, 0.0f);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t c0 = t * R, r = std::min(R, C - c0);
        recompute_grad_tile<in_t, op_t>(p, W, lda, packT.data() + t * R * H, gw ? packV.data() + t * rp_max * H : nullptr,
                                        v0, vb, c0, r, lse_ref.data(), g.data(), limit.data(), xT.data(), ldx,
                                        grad_bias ? gb.data() : nullptr, gw, gA);  // GEMMs 3 and 4
      }
      if constexpr (!in_place) {
        if (gw) convert(gw, grad_weight + v0 * H, vb * H);
      }
      if (grad_bias) convert(gb.data(), grad_bias + v0, vb);
    }
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult linear_forward(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& row_n, const at::Tensor& row_t, const at::Tensor& labels,
                             const std::optional<at::Tensor>& hidden_grad, int64_t row_tile, int64_t vocab_tile,
                             bool half_operands, bool statistics) {
  check_inputs(hidden, weight, bias, row_n, row_t, labels, row_tile, vocab_tile);
  if (hidden_grad.has_value()) {
    CHECK_CPU((*hidden_grad));
    CHECK_DTYPE((*hidden_grad), hidden.scalar_type());
    TORCH_CHECK(hidden_grad->sizes() == hidden.sizes(), "hidden_grad must have hidden's shape ", hidden.sizes());
    CHECK_LAST_CONTIGUOUS((*hidden_grad));
  }
  const int64_t C = row_n.numel(), S = statistics ? C : 0;
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor label_logit = at::empty({C}, f32), lse = at::empty({C}, f32), logit_sum = at::empty({C}, f32);
  at::Tensor entropy = at::empty({S}, f32), log_sum_sq = at::empty({S}, f32),
             is_top1 = at::empty({S}, f32.dtype(at::kBool));
  ForwardResult result{label_logit, lse, logit_sum, entropy, log_sum_sq, is_top1};
  if (C == 0) return result;
  ForwardOut out{label_logit.data_ptr<float>(), lse.data_ptr<float>(), logit_sum.data_ptr<float>()};
  if (statistics) {
    out.entropy = entropy.data_ptr<float>();
    out.log_sum_sq = log_sum_sq.data_ptr<float>();
    out.is_top1 = is_top1.data_ptr<bool>();
  }
  dispatch_operands(hidden, half_operands, [&](auto in, auto op) {
    using in_t = decltype(in);
    using op_t = decltype(op);
    auto p = problem<in_t>(hidden, weight, bias, row_n, row_t, labels);
    in_t* g = hidden_grad.has_value() ? hidden_grad->data_ptr<in_t>() : nullptr;
    const int64_t gs0 = g ? hidden_grad->stride(0) : 0, gs1 = g ? hidden_grad->stride(1) : 0;
    if (statistics) {
      forward_kernel<true, in_t, op_t>(p, g, gs0, gs1, row_tile, vocab_tile, out);
    } else {
      forward_kernel<false, in_t, op_t>(p, g, gs0, gs1, row_tile, vocab_tile, out);
    }
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> linear_weight_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_n, const at::Tensor& row_t, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& grad_rows, bool need_weight, bool need_bias, int64_t row_tile, int64_t vocab_tile,
    bool half_operands) {
  check_inputs(hidden, weight, bias, row_n, row_t, labels, row_tile, vocab_tile);
  for (const at::Tensor* x : {&lse, &grad_rows}) {
    CHECK_CPU((*x));
    CHECK_DTYPE((*x), at::kFloat);
    TORCH_CHECK(x->dim() == 1 && x->numel() == row_n.numel() && x->is_contiguous(),
                "lse and grad_rows must be contiguous float32 [C] tensors");
  }
  need_bias = need_bias && bias.has_value();
  at::Tensor grad_weight = at::empty(need_weight ? weight.sizes() : at::IntArrayRef{0}, weight.options());
  at::Tensor grad_bias = at::empty({need_bias ? weight.size(0) : 0}, weight.options());
  if (!need_weight && !need_bias) return {grad_weight, grad_bias};
  if (row_n.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_weight, grad_bias};
  }
  dispatch_operands(hidden, half_operands, [&](auto in, auto op) {
    using in_t = decltype(in);
    using op_t = decltype(op);
    weight_grad_kernel<in_t, op_t>(problem<in_t>(hidden, weight, bias, row_n, row_t, labels),
                                   lse.data_ptr<float>(), grad_rows.data_ptr<float>(),
                                   need_weight ? grad_weight.data_ptr<in_t>() : nullptr,
                                   need_bias ? grad_bias.data_ptr<in_t>() : nullptr, row_tile, vocab_tile);
  });
  return {grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_weight_grad", &linear_weight_grad);
}
