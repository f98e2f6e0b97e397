// The no-recompute variant of the native fused linear kernel (fastdpo/linear_dpo.py): for a
// chunk of pairs whose float32 logits fit the memory budget, the logits are made once, kept,
// and turned into the gradient as soon as the chunk's DPO loss (computed in Python between the
// two ops) gives each row its upstream gradient g: three GEMMs instead of the four of the
// recompute path (csrc/fused_linear.cpp), at the price of C x V float32 in memory.
//
//   fastdpo::linear_chunk_forward(hidden, weight, bias?, row_n, row_t, labels, probs!, block_max!,
//                                 row_tile, vocab_tile, half_operands)
//       -> (label_logit, lse, logit_sum, label_share)
//     probs [V, C] float32 receives exp(x - m_b), with m_b (block_max [blocks, C]) the row's
//     running max when vocabulary block b was folded, and 0 at the label; label_share = 1 -
//     p(label), computed as the non-label share of the row's sum (no cancellation).
//   fastdpo::linear_chunk_backward(probs!, block_max, lse, label_share, grad_rows, hidden, weight,
//                                  bias?, row_n, row_t, labels, grad_hidden!, grad_weight!?,
//                                  grad_bias!?, row_tile, vocab_tile, half_operands) -> ()
//     Turns probs into G^T = g * (onehot - softmax) in place (tasks: vocabulary blocks), adds
//     each block's sum of G^T over rows to grad_bias (float32) and G^T h to grad_weight
//     (float32: accumulated across chunks; the weight's dtype: written, a single chunk); then
//     (tasks: row tiles) writes grad_hidden rows = G W in hidden's dtype.
// Tasks own their rows or blocks and run in a fixed order: results do not depend on threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "checks.h"
#include "fused_linear.h"

namespace {

using namespace fastdpo_linear;

template <typename in_t, typename op_t>
void chunk_forward_kernel(const Problem<in_t>& p, float* probs, float* block_max, int64_t R, int64_t VB,
                          float* out_label, float* out_lse, float* out_sum, float* out_share) {
  const int64_t H = p.H, V = p.V, C = p.C, tiles = (C + R - 1) / R;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<op_t> hT(H * R), wconv(std::is_same_v<in_t, op_t> ? 0 : VB * H);
    RowState st(R);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * R, r = std::min(R, C - c0);
      pack_rows_transposed<in_t, op_t>([&](int64_t i) { return p.hrow(c0 + i); }, r, H, hT.data());
      st.start(r);
      for (int64_t v0 = 0, b = 0; v0 < V; v0 += VB, ++b) {
        const int64_t vb = std::min(VB, V - v0);
        int64_t lda;
        const op_t* W = weight_block<in_t, op_t>(p, v0, vb, wconv, lda);
        float* x = probs + v0 * C + c0;
        tile_gemm<op_t>(vb, r, H, W, lda, hT.data(), r, x, C, false);  // GEMM 1, kept
        fold_block<false>(p, x, vb, C, r, v0, c0, st);
        std::copy_n(st.m_ref.begin(), r, block_max + b * C + c0);
      }
      for (int64_t i = 0; i < r; ++i) {
        const float s = st.s_other[i] + st.p_label[i];
        st.finish(i, out_label + c0 + i, out_lse + c0 + i, out_sum + c0 + i);
        out_share[c0 + i] = s > 0.0f ? st.s_other[i] / s : 0.0f;
      }
    }
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

// Phase 1, one task per vocabulary block: G^T in place, grad_bias, grad_weight.
template <typename in_t, typename op_t>
void chunk_weight_grad(const Problem<in_t>& p, float* probs, const float* block_max, const float* lse,
                       const float* share, const float* grad_rows, float* grad_weight_acc, in_t* grad_weight_out,
                       float* grad_bias, int64_t R, int64_t VB) {
  const int64_t H = p.H, V = p.V, C = p.C, tiles = (C + R - 1) / R, rp_max = pad_k<op_t>(R);
  const bool weight = grad_weight_acc || grad_weight_out;
  const std::vector<op_t> packV = weight ? pack_hidden_tiles<in_t, op_t>(p, R) : std::vector<op_t>();
  const int64_t blocks = (V + VB - 1) / VB;
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> factor(C), gw_buf(grad_weight_out ? VB * H : 0);
    std::vector<op_t> gA(kVnni<op_t> ? VB * rp_max : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t v0 = b * VB, vb = std::min(VB, V - v0);
      for (int64_t c = 0; c < C; ++c)  // softmax = probs * exp(m_b - lse); rows without a finite lse add 0
        factor[c] = lse[c] == -kInf ? 0.0f : -grad_rows[c] * std::exp(block_max[b * C + c] - lse[c]);
      for (int64_t j = 0; j < vb; ++j) {
        float* x = probs + (v0 + j) * C;
        at::vec::map2([](Vec e, Vec f) { return e * f; }, x, x, factor.data(), C);
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t y = p.label[c] - v0;
        if (y >= 0 && y < vb && lse[c] != -kInf) probs[(v0 + y) * C + c] = grad_rows[c] * share[c];
      }
      if (grad_bias) {
        for (int64_t j = 0; j < vb; ++j)
          grad_bias[v0 + j] += at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, probs + (v0 + j) * C, C);
      }
      if (!weight) continue;
      float* gw = grad_weight_acc ? grad_weight_acc + v0 * H : gw_buf.data();
      if (!grad_weight_acc) std::fill_n(gw, vb * H, 0.0f);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t c0 = t * R, r = std::min(R, C - c0);
        head_grad_tile<in_t, op_t>(p, probs + v0 * C + c0, C, vb, r, v0, c0, grad_rows + c0,
                                   packV.data() + t * rp_max * H, gw, gA);
      }
      if (grad_weight_out) convert(gw, grad_weight_out + v0 * H, vb * H);
    }
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

// Phase 2, one task per row tile: grad_hidden rows = G [r, V] W [V, H] (one row's sum: G is
// rounded to bfloat16 for bfloat16 operands; csrc/fused_linear.cpp says why that is enough).
template <typename in_t, typename op_t>
void chunk_hidden_grad(const Problem<in_t>& p, const float* probs, in_t* grad_hidden, int64_t gs0, int64_t gs1,
                       int64_t R, int64_t VB) {
  const int64_t H = p.H, V = p.V, C = p.C, tiles = (C + R - 1) / R;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<float> acc(R * H);
    HiddenGradBuffers<op_t> buf(R, VB, H, !std::is_same_v<in_t, op_t>);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * R, r = std::min(R, C - c0);
      std::fill_n(acc.begin(), r * H, 0.0f);
      for (int64_t v0 = 0; v0 < V; v0 += VB)
        hidden_grad_tile<in_t, op_t>(p, probs + v0 * C + c0, C, std::min(VB, V - v0), r, v0, acc.data(), buf);
      for (int64_t i = 0; i < r; ++i)
        convert(acc.data() + i * H, grad_hidden + p.row_n[c0 + i] * gs0 + p.row_t[c0 + i] * gs1, H);
    }
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

void check_buffers(const at::Tensor& probs, const at::Tensor& block_max, int64_t V, int64_t C, int64_t vocab_tile) {
  CHECK_CPU(probs);
  CHECK_CPU(block_max);
  CHECK_DTYPE(probs, at::kFloat);
  CHECK_DTYPE(block_max, at::kFloat);
  CHECK_SHAPE(probs, V, C);
  CHECK_SHAPE(block_max, (V + vocab_tile - 1) / vocab_tile, C);
  TORCH_CHECK(probs.is_contiguous() && block_max.is_contiguous(), "probs and block_max must be contiguous");
}

void check_rows_vector(const at::Tensor& x, int64_t C, const char* name) {
  CHECK_CPU(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.numel() == C && x.is_contiguous(), name,
              " must be a contiguous float32 [", C, "] tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_chunk_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_n, const at::Tensor& row_t, const at::Tensor& labels, at::Tensor& probs,
    at::Tensor& block_max, int64_t row_tile, int64_t vocab_tile, bool half_operands) {
  check_inputs(hidden, weight, bias, row_n, row_t, labels, row_tile, vocab_tile);
  const int64_t C = row_n.numel();
  check_buffers(probs, block_max, weight.size(0), C, vocab_tile);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor label = at::empty({C}, f32), lse = at::empty({C}, f32), sum = at::empty({C}, f32),
             share = at::empty({C}, f32);
  if (C == 0) return {label, lse, sum, share};
  float *o0 = label.data_ptr<float>(), *o1 = lse.data_ptr<float>(), *o2 = sum.data_ptr<float>(),
        *o3 = share.data_ptr<float>();
  float *pr = probs.data_ptr<float>(), *bm = block_max.data_ptr<float>();
  dispatch_operands(hidden, half_operands, [&](auto in, auto op) {
    using in_t = decltype(in);
    chunk_forward_kernel<in_t, decltype(op)>(problem<in_t>(hidden, weight, bias, row_n, row_t, labels), pr, bm,
                                             row_tile, vocab_tile, o0, o1, o2, o3);
  });
  return {label, lse, sum, share};
}

template <typename in_t, typename op_t>
void run_chunk_backward(const Problem<in_t>& p, at::Tensor& probs, const at::Tensor& block_max, const at::Tensor& lse,
                        const at::Tensor& share, const at::Tensor& grad_rows, at::Tensor& grad_hidden,
                        const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                        int64_t R, int64_t VB) {
  float* acc = nullptr;
  in_t* out = nullptr;
  if (grad_weight.has_value()) {
    if (grad_weight->scalar_type() == at::kFloat) {
      acc = grad_weight->data_ptr<float>();
    } else {
      out = grad_weight->data_ptr<in_t>();
    }
  }
  chunk_weight_grad<in_t, op_t>(p, probs.data_ptr<float>(), block_max.data_ptr<float>(), lse.data_ptr<float>(),
                                share.data_ptr<float>(), grad_rows.data_ptr<float>(), acc, out,
                                grad_bias.has_value() ? grad_bias->data_ptr<float>() : nullptr, R, VB);
  chunk_hidden_grad<in_t, op_t>(p, probs.data_ptr<float>(), grad_hidden.data_ptr<in_t>(), grad_hidden.stride(0),
                                grad_hidden.stride(1), R, VB);
}

void linear_chunk_backward(at::Tensor& probs, const at::Tensor& block_max, const at::Tensor& lse,
                           const at::Tensor& label_share, const at::Tensor& grad_rows, const at::Tensor& hidden,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& row_n,
                           const at::Tensor& row_t, const at::Tensor& labels, at::Tensor& grad_hidden,
                           const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                           int64_t row_tile, int64_t vocab_tile, bool half_operands) {
  check_inputs(hidden, weight, bias, row_n, row_t, labels, row_tile, vocab_tile);
  const int64_t C = row_n.numel(), V = weight.size(0);
  check_buffers(probs, block_max, V, C, vocab_tile);
  check_rows_vector(lse, C, "lse");
  check_rows_vector(label_share, C, "label_share");
  check_rows_vector(grad_rows, C, "grad_rows");
  CHECK_CPU(grad_hidden);
  CHECK_DTYPE(grad_hidden, hidden.scalar_type());
  TORCH_CHECK(grad_hidden.sizes() == hidden.sizes(), "grad_hidden must have hidden's shape ", hidden.sizes());
  CHECK_LAST_CONTIGUOUS(grad_hidden);
  if (grad_weight.has_value()) {
    CHECK_CPU((*grad_weight));
    TORCH_CHECK(grad_weight->scalar_type() == at::kFloat || grad_weight->scalar_type() == weight.scalar_type(),
                "grad_weight must be float32 (accumulated) or the weight's dtype (written)");
    TORCH_CHECK(grad_weight->sizes() == weight.sizes() && grad_weight->is_contiguous(),
                "grad_weight must be a contiguous tensor of the weight's shape");
  }
  if (grad_bias.has_value()) {
    TORCH_CHECK(bias.has_value(), "grad_bias needs a bias");
    check_rows_vector(*grad_bias, V, "grad_bias");
  }
  if (C == 0) return;
  dispatch_operands(hidden, half_operands, [&](auto in, auto op) {
    using in_t = decltype(in);
    run_chunk_backward<in_t, decltype(op)>(problem<in_t>(hidden, weight, bias, row_n, row_t, labels), probs,
                                           block_max, lse, label_share, grad_rows, grad_hidden, grad_weight,
                                           grad_bias, row_tile, vocab_tile);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("linear_chunk_forward", &linear_chunk_forward);
  m.impl("linear_chunk_backward", &linear_chunk_backward);
}
