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
// Forward, one task per row tile (r rows), vocabulary blocks (v columns) in order:
//   x^T [v, r] = W_block [v, H] . h^T [H, r]                       GEMM 1, A is the weight itself
//   fold x into each row's running max m, the sum of exp(x - m) over the non-label columns
//   (s_other) and the label's exp(x_label - m) (p_label), the label logit and the logit sum;
//   with hidden_grad: acc [r, H] += exp(x - m)[r, v] (label column zeroed) . W_block [v, H]
//   (GEMM 2), rescaled as m grows. At the end of the row, with s = s_other + p_label:
//   lse = m + log s and d log p(label) / d h = W[label] * s_other / s - acc / s, written into
//   hidden_grad. Keeping the label apart avoids the cancellation in W[label] - softmax . W
//   when the label's probability is near 1.
// Weight gradient, one task per vocabulary block, row tiles in order:
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

// Per counted row outputs of the forward; the statistics pointers are null when not asked for.
struct ForwardOut {
  float *label, *lse, *sum;
  float *entropy = nullptr, *log_sum_sq = nullptr;
  bool* is_top1 = nullptr;
};

template <bool Statistics, typename in_t, typename op_t>
void forward_kernel(const Problem<in_t>& p, in_t* hidden_grad, int64_t gs0, int64_t gs1, int64_t R, int64_t VB,
                    const ForwardOut& out) {
  const int64_t H = p.H, V = p.V, tiles = (p.C + R - 1) / R;
  const bool grad = hidden_grad != nullptr;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    const int64_t ldx = round_up(R, Vec::size());
    std::vector<op_t> hT(H * R), wconv(std::is_same_v<in_t, op_t> ? 0 : VB * H);
    std::vector<float> xT(VB * ldx), acc(grad ? R * H : 0);
    HiddenGradBuffers<op_t> buf(grad ? R : 0, grad ? VB : 0, H, false);
    RowState st(R, Statistics);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * R, r = std::min(R, p.C - c0);
      pack_rows_transposed<in_t, op_t>([&](int64_t i) { return p.hrow(c0 + i); }, r, H, hT.data());
      st.start(r);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t v0 = 0; v0 < V; v0 += VB) {
        const int64_t vb = std::min(VB, V - v0);
        int64_t lda;
        const op_t* W = weight_block<in_t, op_t>(p, v0, vb, wconv, lda);
        tile_gemm<op_t>(vb, r, H, W, lda, hT.data(), r, xT.data(), ldx, false);  // GEMM 1
        fold_block<Statistics>(p, xT.data(), vb, ldx, r, v0, c0, st);
        if (!grad) continue;
        for (int64_t i = 0; i < r; ++i) {
          if (st.scale[i] == 1.0f) continue;
          const Vec s(st.scale[i]);
          float* a = acc.data() + i * H;
          at::vec::map([&](Vec x) { return x * s; }, a, a, H);
        }
        hidden_grad_tile<in_t, op_t>(p, xT.data(), ldx, vb, r, v0, acc.data(), buf, W, lda);  // GEMM 2
      }
      for (int64_t i = 0; i < r; ++i) {
        const int64_t c = c0 + i;
        st.finish(i, out.label + c, out.lse + c, out.sum + c);
        if constexpr (Statistics)
          st.finish_statistics(i, p.label[c], out.entropy + c, out.log_sum_sq + c, out.is_top1 + c);
        if (!grad) continue;
        in_t* dst = hidden_grad + p.row_n[c] * gs0 + p.row_t[c] * gs1;
        const in_t* wy = p.wrow(p.label[c]);
        const float s = st.s_other[i] + st.p_label[i];
        const float own = s > 0.0f ? st.s_other[i] / s : 0.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        const float* a = acc.data() + i * H;
        for (int64_t k = 0; k < H; ++k) dst[k] = cast<in_t>(float(wy[k]) * own - a[k] * inv);
      }
    }
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
  std::vector<op_t> packT(tiles * R * H);
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * R;
      pack_rows_transposed<in_t, op_t>([&](int64_t i) { return p.hrow(c0 + i); }, std::min(R, C - c0), H,
                                       packT.data() + t * R * H);
    }
  });
  const std::vector<op_t> packV = grad_weight ? pack_hidden_tiles<in_t, op_t>(p, R) : std::vector<op_t>();
  // Rows whose log-sum-exp is -inf (no finite logit) contribute nothing.
  std::vector<float> g(C), lse_ref(C);
  for (int64_t c = 0; c < C; ++c) {
    const bool finite = lse[c] != -kInf;
    g[c] = finite ? grad_rows[c] : 0.0f;
    lse_ref[c] = finite ? lse[c] : 0.0f;
  }
  constexpr bool in_place = std::is_same_v<in_t, float>;  // a float32 gradient accumulates in the output
  const int64_t blocks = (V + VB - 1) / VB;
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    const int64_t ldx = round_up(R, Vec::size());
    std::vector<float> xT(VB * ldx), gw_buf(in_place || !grad_weight ? 0 : VB * H), gb(VB);
    std::vector<op_t> wconv(std::is_same_v<in_t, op_t> ? 0 : VB * H), gA(kVnni<op_t> ? VB * rp_max : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
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
        tile_gemm<op_t>(vb, r, H, W, lda, packT.data() + t * R * H, r, xT.data(), ldx, false);  // GEMM 3
        for (int64_t j = 0; j < vb; ++j) {  // G^T = g * (onehot - exp(x - lse))
          float* x = xT.data() + j * ldx;
          const Vec bj(p.bias.empty() ? 0.0f : p.bias[v0 + j]);
          lanes(r, [&](int64_t i0, int64_t n) {
            const Vec z = Vec::loadu(x + i0, n) + bj - Vec::loadu(lse_ref.data() + c0 + i0, n);
            (z.exp_u20() * -Vec::loadu(g.data() + c0 + i0, n)).store(x + i0, n);
          });
        }
        for (int64_t i = 0; i < r; ++i) {
          const int64_t y = p.label[c0 + i] - v0;
          if (y >= 0 && y < vb) xT[y * ldx + i] += g[c0 + i];
        }
        if (grad_bias) {
          for (int64_t j = 0; j < vb; ++j) {
            float sum = 0.0f;
            const float* x = xT.data() + j * ldx;
            Vec acc(0.0f);
            lanes(r, [&](int64_t i0, int64_t n) { acc = acc + Vec::loadu(x + i0, n); });
            alignas(64) float parts[Vec::size()];
            acc.store(parts);
            for (int64_t l = 0; l < Vec::size(); ++l) sum += parts[l];
            gb[j] += sum;
          }
        }
        if (gw) head_grad_tile<in_t, op_t>(p, xT.data(), ldx, vb, r, v0, c0, g.data() + c0,
                                           packV.data() + t * rp_max * H, gw, gA);  // GEMM 4
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
