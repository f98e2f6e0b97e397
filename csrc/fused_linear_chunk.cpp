// The no-recompute variant of the native fused linear kernel (fastdpo/linear_dpo.py): for a
// chunk of pairs, the logits of the rows its memory budget can hold are made once, kept, and
// turned into the gradient as soon as the chunk's DPO loss (computed in Python between the two
// ops) gives each row its upstream gradient g: three GEMMs instead of the four of the recompute
// path (csrc/fused_linear.cpp). Rows past what the budget holds take the recompute path's steps
// within the same two ops, so the head's gradient is still written once.
//
//   fastdpo::linear_chunk_forward(hidden, weight, bias?, row_n, row_t, labels, kept!, block_max!,
//                                 grad_hidden!, row_tile, vocab_tile, half_operands)
//       -> (label_logit, lse, logit_sum, label_share)
//     kept [V, K] receives exp(x - m_b) of the first K rows, with m_b (block_max [blocks, K]) the
//     row's running max when vocabulary block b was folded (-inf while every entry so far was
//     -inf, the kept values then 0), and 0 at the label; K is C, or a
//     multiple of row_tile below C. Rows K..C get d log p(label) / d h in grad_hidden (the
//     recompute path's forward, GEMMs 1 and 2). label_share = 1 - p(label), computed as the
//     non-label share of the row's sum (no cancellation).
//   fastdpo::linear_chunk_backward(kept!, block_max, lse, label_share, grad_rows, hidden, weight,
//                                  bias?, row_n, row_t, labels, grad_hidden!, grad_weight!?,
//                                  grad_bias!?, row_tile, vocab_tile, half_operands) -> ()
//     Phase 1 (tasks: vocabulary blocks): G^T = g * (onehot - softmax) of the kept rows from
//     kept, of the other rows recomputed (GEMM 3); grad_bias (float32) += row sums of G^T and
//     G^T h to grad_weight (GEMM 4; float32: accumulated across chunks; the weight's dtype:
//     written, a single chunk). Phase 2 (tasks: row tiles): kept rows' grad_hidden = G W (GEMM 2
//     of this path), the other rows' d log p / d h times g.
//
// What is kept: float32 exp(x - m_b) for float32 operands. With bfloat16 operands (whose
// gradient GEMMs round G to bfloat16 anyway) float16: exp(x - m_b) is in [0, 1], where float16
// errs by at most 2^-11 relative (2^-25 absolute below its normal range), 4x under bfloat16's
// 2^-9, at half the bytes. The entries that must be exact - those over kExactShare |g|, which
// head_grad_tile corrects to float32 after its bfloat16 GEMM, at most 256 per row - are remade
// from h . W[v] in float32 instead (exact_large_entries). Phase 1 writes the bfloat16 G it
// multiplied back over the float16 tile, which phase 2 reads. So every entry of G errs by at
// most 2^-17 |g| + 2^-19 |g| in the head's gradient, against 2^-17 |g| on the recompute path.
// Tasks own their rows or blocks and run in a fixed order: results do not depend on threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "fused_linear.h"

namespace {

using namespace fastdpo_linear;

// The type of the kept exp(x - m_b) tiles for operand type op_t (see the header comment).
template <typename op_t>
using kept_t = std::conditional_t<kVnni<op_t>, at::Half, float>;

template <typename op_t>
constexpr bool kKeptFloat = std::is_same_v<kept_t<op_t>, float>;

template <typename in_t, typename op_t>
void chunk_forward_kernel(const Problem<in_t>& p, int64_t K, kept_t<op_t>* kept, float* block_max,
                          in_t* grad_hidden, int64_t gs0, int64_t gs1, int64_t R, int64_t VB, const ForwardOut& out,
                          float* out_share) {
  const int64_t H = p.H, V = p.V, C = p.C, tiles = (C + R - 1) / R, recomputed = tiles - (K + R - 1) / R;
  TaskQueue tasks(tiles);
  at::parallel_for(0, tasks.workers(), 1, [&](int64_t, int64_t) {
    ForwardBuffers<in_t, op_t> buf(R, VB, H, K < C, false);
    RowState& st = buf.st;
    for (int64_t task; tasks.next(task);) {
      // The recomputed tiles (two GEMMs) first, then the kept ones (one): the longest tasks first.
      const int64_t t = task < recomputed ? tiles - recomputed + task : task - recomputed;
      const int64_t c0 = t * R, r = std::min(R, C - c0);
      if (c0 >= K) {  // past the budget: the recompute path's forward
        forward_row_tile<false>(p, c0, r, VB, grad_hidden, gs0, gs1, out, buf);
      } else {
        pack_rows_transposed<in_t, op_t>([&](int64_t i) { return p.hrow(c0 + i); }, r, H, buf.hT.data());
        st.start(r);
        for (int64_t v0 = 0, b = 0; v0 < V; v0 += VB, ++b) {
          const int64_t vb = std::min(VB, V - v0);
          int64_t lda;
          const op_t* W = weight_block<in_t, op_t>(p, v0, vb, buf.wconv, lda);
          // float32 tiles are made where they are kept; float16 ones in the task's tile first.
          float* x = buf.xT.data();
          int64_t ldx = buf.ldx;
          if constexpr (kKeptFloat<op_t>) x = kept + v0 * K + c0, ldx = K;
          tile_gemm<op_t>(vb, r, H, W, lda, buf.hT.data(), r, x, ldx, false);  // GEMM 1, kept
          fold_block<false>(p, x, vb, ldx, r, v0, c0, st);
          if constexpr (!kKeptFloat<op_t>)
            for (int64_t j = 0; j < vb; ++j) convert(x + j * ldx, kept + (v0 + j) * K + c0, r);
          std::copy_n(st.m.begin(), r, block_max + b * K + c0);  // -inf: nothing folded yet
        }
        for (int64_t i = 0; i < r; ++i) st.finish(i, out.label + c0 + i, out.lse + c0 + i, out.sum + c0 + i);
      }
      for (int64_t i = 0; i < r; ++i) {
        const float s = st.s_other[i] + st.p_label[i];
        out_share[c0 + i] = s > 0.0f ? st.s_other[i] / s : 0.0f;
      }
    }
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

// x [vb, ld] (r columns) = kept [vb, ldk] (float16) times factor [r], column by column.
inline void scaled_from_half(const at::Half* kept, int64_t ldk, const float* factor, float* x, int64_t ld,
                             int64_t vb, int64_t r) {
  using HVec = at::vec::Vectorized<at::Half>;
  constexpr int64_t w = HVec::size();  // 2 float vectors
  for (int64_t j = 0; j < vb; ++j) {
    const at::Half* src = kept + j * ldk;
    float* dst = x + j * ld;
    int64_t i = 0;
    for (; i + w <= r; i += w) {
      auto [lo, hi] = at::vec::convert_to_float<at::Half>(HVec::loadu(src + i));
      (lo * Vec::loadu(factor + i)).store(dst + i);
      (hi * Vec::loadu(factor + i + Vec::size())).store(dst + i + Vec::size());
    }
    for (; i < r; ++i) dst[i] = float(src[i]) * factor[i];
  }
}

// The entries of the G^T tile x [vb, ld] (float32, made from float16 kept values) over
// kExactShare |g| of their row (limit [r], slightly lowered for float16's error on the test
// itself), other than the label's (exact already), remade exactly: x = h . W[v] + b in float32
// (products of two bfloat16 numbers are exact, as in the GEMM) and G = -g exp(x - lse). `row` and
// `col` hold one float32 row of h and of W.
template <typename in_t>
void exact_large_entries(const Problem<in_t>& p, float* x, int64_t ld, int64_t vb, int64_t r, int64_t v0,
                         int64_t c0, const float* limit, const float* g, const float* lse, std::vector<float>& row,
                         std::vector<float>& col) {
  for (int64_t j = 0; j < vb; ++j) {
    float* xj = x + j * ld;
    lanes(r, [&](int64_t i0, int64_t n) {
      const Vec big = Vec::loadu(xj + i0, n).abs() > Vec::loadu(limit + i0, n);
      if (big.zero_mask() == (1 << Vec::size()) - 1) return;
      for (int64_t l = 0; l < n; ++l) {
        const int64_t c = c0 + i0 + l;
        if (!(std::abs(xj[i0 + l]) > limit[i0 + l]) || p.label[c] == v0 + j) continue;
        convert(p.hrow(c), row.data(), p.H);
        convert(p.wrow(v0 + j), col.data(), p.H);
        const float dot = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                          [](Vec a, Vec b) { return a + b; }, row.data(),
                                                          col.data(), p.H);
        const float logit = dot + (p.bias.empty() ? 0.0f : p.bias[v0 + j]);
        xj[i0 + l] = -g[c] * std::exp(logit - lse[c]);
      }
    });
  }
}

// Phase 1, one task per vocabulary block: G^T, grad_bias, grad_weight; the kept tiles end up
// holding G^T (float32 in place, or the bfloat16 operand over the float16 tile) for phase 2.
template <typename in_t, typename op_t>
void chunk_weight_grad(const Problem<in_t>& p, int64_t K, kept_t<op_t>* kept, const float* block_max,
                       const float* lse, const float* share, const std::vector<float>& g,
                       const std::vector<float>& lse_ref, float* grad_weight_acc, in_t* grad_weight_out,
                       float* grad_bias, int64_t R, int64_t VB) {
  const int64_t H = p.H, V = p.V, C = p.C, tiles = (C + R - 1) / R, kept_tiles = (K + R - 1) / R;
  const int64_t rp_max = pad_k<op_t>(R), blocks = (V + VB - 1) / VB;
  const bool weight = grad_weight_acc || grad_weight_out;
  const std::vector<op_t> packV = weight ? pack_hidden_tiles<in_t, op_t>(p, R) : std::vector<op_t>();
  const std::vector<op_t> packT = pack_transposed_tiles<in_t, op_t>(p, R, kept_tiles);  // rows past K
  // The head gradient's limits, and exact_large_entries' a little lower (float16's error on the
  // test itself).
  constexpr float kMargin = 1.0f - 1.0f / 1024.0f;
  const std::vector<float> limit = exact_limits(g), kept_limit = exact_limits(g, kMargin);
  TaskQueue tasks(blocks);
  at::parallel_for(0, tasks.workers(), 1, [&](int64_t, int64_t) {
    const int64_t ldx = round_up(R, Vec::size());
    std::vector<float> factor(K), gw_buf(grad_weight_out ? VB * H : 0), xT(VB * ldx), gb(VB);
    std::vector<float> row(kKeptFloat<op_t> ? 0 : H), col(kKeptFloat<op_t> ? 0 : H);
    std::vector<op_t> gA(kVnni<op_t> ? VB * rp_max : 0), wconv(std::is_same_v<in_t, op_t> ? 0 : VB * H);
    for (int64_t b; tasks.next(b);) {
      const int64_t v0 = b * VB, vb = std::min(VB, V - v0);
      // softmax = kept * exp(m_b - lse). Rows without a finite lse add 0, and so do blocks folded
      // while the row's max was still -inf (a masked vocabulary): their kept values are 0, and
      // exp(m_b - lse) must not be exp(0 - lse) = inf for a very negative lse (0 * inf = NaN).
      for (int64_t c = 0; c < K; ++c) {
        const float m = block_max[b * K + c];
        factor[c] = lse[c] == -kInf || m == -kInf ? 0.0f : -g[c] * std::exp(m - lse[c]);
      }
      float* gw = grad_weight_acc ? grad_weight_acc + v0 * H : grad_weight_out ? gw_buf.data() : nullptr;
      if (grad_weight_out) std::fill_n(gw, vb * H, 0.0f);
      std::fill_n(gb.begin(), vb, 0.0f);
      for (int64_t t = 0; t < kept_tiles; ++t) {
        const int64_t c0 = t * R, r = std::min(R, K - c0);
        float* x = xT.data();
        int64_t ld = ldx;
        if constexpr (kKeptFloat<op_t>) {
          x = kept + v0 * K + c0, ld = K;
          for (int64_t j = 0; j < vb; ++j)
            at::vec::map2([](Vec e, Vec f) { return e * f; }, x + j * ld, x + j * ld, factor.data() + c0, r);
        } else {
          scaled_from_half(kept + v0 * K + c0, K, factor.data() + c0, x, ld, vb, r);
        }
        for (int64_t i = 0; i < r; ++i) {
          const int64_t c = c0 + i, y = p.label[c] - v0;
          if (y >= 0 && y < vb && lse[c] != -kInf) x[y * ld + i] = g[c] * share[c];
        }
        if constexpr (!kKeptFloat<op_t>)
          exact_large_entries(p, x, ld, vb, r, v0, c0, kept_limit.data() + c0, g.data(), lse, row, col);
        if (grad_bias) add_row_sums(x, ld, vb, r, gb.data());
        if (gw)
          head_grad_tile<in_t, op_t>(p, x, ld, vb, r, v0, c0, limit.data() + c0, packV.data() + t * rp_max * H, gw,
                                     gA);  // GEMM 4
        if constexpr (!kKeptFloat<op_t>) {  // the bfloat16 G^T over the float16 tile, for phase 2
          auto* dst = reinterpret_cast<at::BFloat16*>(kept);
          for (int64_t j = 0; j < vb; ++j) {
            if (gw) {
              std::copy_n(gA.data() + j * pad_k<op_t>(r), r, dst + (v0 + j) * K + c0);
            } else {
              convert(x + j * ld, dst + (v0 + j) * K + c0, r);
            }
          }
        }
      }
      if (kept_tiles < tiles) {  // rows past the budget: the recompute path's GEMMs 3 and 4
        int64_t lda;
        const op_t* W = weight_block<in_t, op_t>(p, v0, vb, wconv, lda);
        for (int64_t t = kept_tiles; t < tiles; ++t) {
          const int64_t c0 = t * R, r = std::min(R, C - c0);
          recompute_grad_tile<in_t, op_t>(p, W, lda, packT.data() + (t - kept_tiles) * R * H,
                                          gw ? packV.data() + t * rp_max * H : nullptr, v0, vb, c0, r,
                                          lse_ref.data(), g.data(), limit.data(), xT.data(), ldx,
                                          grad_bias ? gb.data() : nullptr, gw, gA);
        }
      }
      if (grad_bias)
        for (int64_t j = 0; j < vb; ++j) grad_bias[v0 + j] += gb[j];
      if (grad_weight_out) convert(gw, grad_weight_out + v0 * H, vb * H);
    }
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

// Phase 2, one task per row tile: kept rows' grad_hidden = G [r, V] W [V, H] (one row's sum: G
// is rounded to bfloat16 for bfloat16 operands; csrc/fused_linear.cpp says why that is enough);
// the other rows hold d log p / d h from the forward and are scaled by g.
template <typename in_t, typename op_t>
void chunk_hidden_grad(const Problem<in_t>& p, int64_t K, const kept_t<op_t>* kept, const std::vector<float>& g,
                       in_t* grad_hidden, int64_t gs0, int64_t gs1, int64_t R, int64_t VB) {
  const int64_t H = p.H, V = p.V, C = p.C;
  TaskQueue tiles((C + R - 1) / R);  // the kept tiles (a GEMM each) come first
  at::parallel_for(0, tiles.workers(), 1, [&](int64_t, int64_t) {
    std::vector<float> acc(R * H);
    HiddenGradBuffers<op_t> buf(R, VB, H, !std::is_same_v<in_t, op_t>);
    for (int64_t t; tiles.next(t);) {
      const int64_t c0 = t * R, r = std::min(R, C - c0);
      if (c0 >= K) {
        for (int64_t i = 0; i < r; ++i) {
          in_t* dst = grad_hidden + p.row_n[c0 + i] * gs0 + p.row_t[c0 + i] * gs1;
          for (int64_t k = 0; k < H; ++k) dst[k] = cast<in_t>(float(dst[k]) * g[c0 + i]);
        }
        continue;
      }
      std::fill_n(acc.begin(), r * H, 0.0f);
      for (int64_t v0 = 0; v0 < V; v0 += VB) {
        const int64_t vb = std::min(VB, V - v0);
        if constexpr (kKeptFloat<op_t>) {
          hidden_grad_tile<in_t, op_t>(p, kept + v0 * K + c0, K, vb, r, v0, acc.data(), buf);
        } else {
          const auto* gT = reinterpret_cast<const at::BFloat16*>(kept);
          hidden_grad_tile<in_t, op_t>(p, gT + v0 * K + c0, K, vb, r, v0, acc.data(), buf);
        }
      }
      for (int64_t i = 0; i < r; ++i)
        convert(acc.data() + i * H, grad_hidden + p.row_n[c0 + i] * gs0 + p.row_t[c0 + i] * gs1, H);
    }
    if constexpr (kVnni<op_t>) at::native::cpublas::brgemm_release(true);
  });
}

void check_buffers(const at::Tensor& hidden, bool half_operands, const at::Tensor& kept, const at::Tensor& block_max,
                   int64_t V, int64_t C, int64_t row_tile, int64_t vocab_tile) {
  CHECK_CPU(kept);
  CHECK_CPU(block_max);
  const auto kept_dtype = operands(hidden, half_operands) == Operands::bf16 ? at::kHalf : at::kFloat;
  TORCH_CHECK(kept.scalar_type() == kept_dtype, "kept must be ", kept_dtype, " for these operands, got ",
              kept.scalar_type());
  CHECK_DTYPE(block_max, at::kFloat);
  TORCH_CHECK(kept.dim() == 2 && kept.size(0) == V, "kept must be [V, K] with V = ", V);
  const int64_t K = kept.size(1);
  TORCH_CHECK(K == C || (K < C && K % row_tile == 0), "kept must hold all ", C, " rows or a multiple of row_tile (",
              row_tile, ") fewer, got ", K);
  CHECK_SHAPE(block_max, (V + vocab_tile - 1) / vocab_tile, K);
  TORCH_CHECK(kept.is_contiguous() && block_max.is_contiguous(), "kept and block_max must be contiguous");
}

void check_rows_vector(const at::Tensor& x, int64_t C, const char* name) {
  CHECK_CPU(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.numel() == C && x.is_contiguous(), name,
              " must be a contiguous float32 [", C, "] tensor");
}

void check_grad_hidden(const at::Tensor& grad_hidden, const at::Tensor& hidden) {
  CHECK_CPU(grad_hidden);
  CHECK_DTYPE(grad_hidden, hidden.scalar_type());
  TORCH_CHECK(grad_hidden.sizes() == hidden.sizes(), "grad_hidden must have hidden's shape ", hidden.sizes());
  CHECK_LAST_CONTIGUOUS(grad_hidden);
}

template <typename op_t>
kept_t<op_t>* kept_ptr(const at::Tensor& kept) {
  return kept.data_ptr<kept_t<op_t>>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_chunk_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_n, const at::Tensor& row_t, const at::Tensor& labels, at::Tensor& kept,
    at::Tensor& block_max, at::Tensor& grad_hidden, int64_t row_tile, int64_t vocab_tile, bool half_operands) {
  check_inputs(hidden, weight, bias, row_n, row_t, labels, row_tile, vocab_tile);
  const int64_t C = row_n.numel();
  check_buffers(hidden, half_operands, kept, block_max, weight.size(0), C, row_tile, vocab_tile);
  check_grad_hidden(grad_hidden, hidden);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor label = at::empty({C}, f32), lse = at::empty({C}, f32), sum = at::empty({C}, f32),
             share = at::empty({C}, f32);
  if (C == 0) return {label, lse, sum, share};
  const ForwardOut out{label.data_ptr<float>(), lse.data_ptr<float>(), sum.data_ptr<float>()};
  dispatch_operands(hidden, half_operands, [&](auto in, auto op) {
    using in_t = decltype(in);
    using op_t = decltype(op);
    chunk_forward_kernel<in_t, op_t>(problem<in_t>(hidden, weight, bias, row_n, row_t, labels), kept.size(1),
                                     kept_ptr<op_t>(kept), block_max.data_ptr<float>(),
                                     grad_hidden.data_ptr<in_t>(), grad_hidden.stride(0), grad_hidden.stride(1),
                                     row_tile, vocab_tile, out, share.data_ptr<float>());
  });
  return {label, lse, sum, share};
}

void linear_chunk_backward(at::Tensor& kept, const at::Tensor& block_max, const at::Tensor& lse,
                           const at::Tensor& label_share, const at::Tensor& grad_rows, const at::Tensor& hidden,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& row_n,
                           const at::Tensor& row_t, const at::Tensor& labels, at::Tensor& grad_hidden,
                           const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                           int64_t row_tile, int64_t vocab_tile, bool half_operands) {
  check_inputs(hidden, weight, bias, row_n, row_t, labels, row_tile, vocab_tile);
  const int64_t C = row_n.numel(), V = weight.size(0);
  check_buffers(hidden, half_operands, kept, block_max, V, C, row_tile, vocab_tile);
  check_rows_vector(lse, C, "lse");
  check_rows_vector(label_share, C, "label_share");
  check_rows_vector(grad_rows, C, "grad_rows");
  check_grad_hidden(grad_hidden, hidden);
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
    using op_t = decltype(op);
    const auto p = problem<in_t>(hidden, weight, bias, row_n, row_t, labels);
    const int64_t K = kept.size(1);
    const auto finite = finite_rows(lse.data_ptr<float>(), grad_rows.data_ptr<float>(), C);
    float* acc = nullptr;
    in_t* out = nullptr;
    if (grad_weight.has_value()) {
      if (grad_weight->scalar_type() == at::kFloat) {
        acc = grad_weight->data_ptr<float>();
      } else {
        out = grad_weight->data_ptr<in_t>();
      }
    }
    chunk_weight_grad<in_t, op_t>(p, K, kept_ptr<op_t>(kept), block_max.data_ptr<float>(), lse.data_ptr<float>(),
                                  label_share.data_ptr<float>(), finite.first, finite.second, acc, out,
                                  grad_bias.has_value() ? grad_bias->data_ptr<float>() : nullptr, row_tile,
                                  vocab_tile);
    chunk_hidden_grad<in_t, op_t>(p, K, kept_ptr<op_t>(kept), finite.first, grad_hidden.data_ptr<in_t>(),
                                  grad_hidden.stride(0), grad_hidden.stride(1), row_tile, vocab_tile);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("linear_chunk_forward", &linear_chunk_forward);
  m.impl("linear_chunk_backward", &linear_chunk_backward);
}
