// Fused log-softmax gather kernels for the `native` backend (CPU); op schemas in ops.cpp.
//
//   fastdpo::logps_forward(logits, labels, ignore_index, shift)
//       -> (token_logps [N, T'], lse [N, T'], sequence_logps [N], logit_sums [N])
//   fastdpo::logps_forward_statistics(logits, labels, ignore_index, shift)
//       -> (the same four, entropy, log_sum_sq_probs, is_top1, mean_logits [N, T'] float32/bool)
//   fastdpo::logps_backward(logits, labels, lse, grad_rows, ignore_index, shift) -> grad [N, T, V]
//   fastdpo::logps_backward_(logits!, labels, lse, grad_rows, ignore_index, shift)   (in place)
//
// Outputs are float32 (float64 for float64 logits, which only gradcheck uses).
//
// Semantics are the contract in fastdpo/backends/__init__.py. Each counted row is read once in
// the forward (blocks of kBlock elements: block max, then one exp per element against a running
// max, so the row is never read twice from memory; the statistics ride along in the same
// pass) and read once + written once in the backward. Math is float32 (float64 for float64 input, used by gradcheck). Rows run in
// parallel; per-sequence sums are reduced afterwards in row order, so results do not depend on
// the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "vec_math.h"

namespace {

using fastdpo::avx512_path;
using fastdpo::bf16_max;
using fastdpo::clamp_exp2_arg;
using fastdpo::Exp2;
using fastdpo::exp2_arg;
using fastdpo::kLn2;
using fastdpo::exp_offset;
using fastdpo::load_bf16_pairs;
using fastdpo::load_vec;
using fastdpo::max_fast;
using fastdpo::reduce_lanes;
using fastdpo::store_two;
using fastdpo::store_two_avx512;
using fastdpo::stream_fence;
using fastdpo::vexp;

constexpr int64_t kBlock = 2048;  // elements per block: 8 KB of float32, stays in L1 between its two passes
constexpr int64_t kGrain = 16;    // rows per parallel task: one row is already thousands of elements

// Outputs, saved statistics and upstream gradients are float32 (float64 for float64 logits).
at::ScalarType math_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Geometry {
  int64_t N, T, V, Tout, s0, s1, shift;
};

Geometry geometry(const at::Tensor& logits, const at::Tensor& labels, bool shift) {
  CHECK_CPU(logits);
  CHECK_CPU(labels);
  CHECK_DIM(logits, 3);
  CHECK_LAST_CONTIGUOUS(logits);
  CHECK_DTYPE(labels, at::kLong);
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kDouble,
              "logits must be float32, bfloat16, float16 (or float64), got ", logits.scalar_type());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  CHECK_SHAPE(labels, N, T);
  TORCH_CHECK(labels.is_contiguous(), "labels must be contiguous");
  TORCH_CHECK(V > 0, "the vocabulary must not be empty");
  TORCH_CHECK(!shift || T >= 2, "shift=True needs T >= 2");
  const int64_t s = shift ? 1 : 0;
  return {N, T, V, T - s, logits.stride(0), logits.stride(1), s};
}

// Every label that will be scored must index the vocabulary: checked before any logit is read.
void check_labels(const at::Tensor& labels, const Geometry& g, int64_t ignore_index) {
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t t = 0; t < g.Tout; ++t) {
      const int64_t y = lab[n * g.T + t + g.shift];
      TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < g.V), "label ", y, " at [", n, ", ", t + g.shift,
                        "] is outside [0, ", g.V, ") and is not ignore_index (", ignore_index, ")");
    }
  }
}

// What the forward computes of one counted row (float32 math; float64 for float64 input).
template <typename acc_t>
struct RowForward {
  acc_t lse, logit_sum;
  acc_t entropy, log_sum_sq_probs;  // with statistics only
  int64_t top1;                     // with statistics only: index of the row's first maximum
};

// The block `ahead` blocks after the one at off of a row of V elements, continuing into
// next_row (the next counted row, or null) past the row's end: its first byte and its length
// in bytes (0 if there is none).
struct BlockBytes {
  const char* start;
  int64_t bytes;
};
template <typename scalar_t>
BlockBytes block_ahead(const scalar_t* row, const scalar_t* next_row, int64_t V, int64_t off, int64_t ahead) {
  int64_t pos = off + ahead * kBlock;
  const int64_t row_blocks = (V + kBlock - 1) / kBlock;
  if (pos >= V) {  // into the next row, whose blocks start at 0 again
    pos = (pos / kBlock - row_blocks) * kBlock;
    row = next_row;
  }
  if (row == nullptr || pos >= V) return {nullptr, 0};
  return {reinterpret_cast<const char*>(row + pos), std::min(kBlock, V - pos) * int64_t(sizeof(scalar_t))};
}

// One counted row, read once from memory: block by block (kBlock elements, which then sit in
// L1), pass 1 takes the block's max and sum from memory, pass 2 exponentiates against the
// running max from L1. Each pass keeps four independent vector accumulators, so it runs at the
// throughput of the vector units rather than at the latency of one chain of adds.
//
// kStats (statistics=True) also keeps, against the same running max m and sum s,
// w = sum e (x - m) and q = sum e^2 with e = exp(x - m), rescaled like s on a new max m'
// (r = exp(m - m'): w' = r (w + (m - m') s), q' = r^2 q), and the index of the first maximum.
// Then entropy = log s - w / s and log sum p^2 = log q - 2 log s. The plain forward's
// arithmetic is the same instructions without these: its outputs are bitwise the same.
// kAvx512: the exp of vec_math.h's AVX-512 path (float32 math only), else at::vec's; bfloat16
// rows there skip widening where they can (kPairs below): pass 1 is then two integer
// instructions per 32 elements, so that the forward costs little more than its exps.
//
// Pass 1 waits on memory, pass 2 on the vector units: so that they overlap, pass 2 prefetches
// what pass 1 reads next (the next block of the row, or the first block of next_row, the next
// counted row, if any) into L1, and the block after that into L2: one block of lead was not
// enough when this VM's memory ran fast (float32 forward 1.2-1.7x a read of the rows, then
// 1.04-1.13x; bfloat16, bound by its exps, unchanged).
template <bool kStats, bool kAvx512, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
RowForward<acc_t> forward_row(const scalar_t* row, int64_t V, const scalar_t* next_row) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool avx512 = kAvx512 && std::is_same_v<acc_t, float>;
  constexpr int64_t W = Vec::size(), U = 4 * W;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const auto vmax = [](const Vec& a, const Vec& b) {
    if constexpr (avx512) {
      return max_fast(a, b);
    } else {
      return at::vec::maximum(a, b);
    }
  };
  const auto smax = [](acc_t a, acc_t b) { return std::max(a, b); };
  const auto sadd = [](acc_t a, acc_t b) { return a + b; };
  // e (x - m) of a masked entry is 0 * -inf: x - m is clamped to the lowest finite value first
  // (at::vec's exp is exactly 0 below about -88, so the clamp changes no other term).
  const Vec vlowest(std::numeric_limits<acc_t>::lowest());
  // bfloat16 on the AVX-512 path: each pass reads the block's U elements as pairs (even and odd
  // elements of 32, load_bf16_pairs), cheaper than widening them, and pass 2 reads the block
  // again from L1. Other 16-bit rows: pass 1 keeps the block widened to float32 (in L1) for pass 2.
  constexpr bool kPairs = avx512 && std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t> && !kPairs;
  alignas(64) acc_t wide[kWiden ? kBlock : 1];
  const auto load_u = [&](const scalar_t* x, int64_t i, Vec& a, Vec& b, Vec& c, Vec& d) {
    if constexpr (kPairs) {
      load_bf16_pairs(x + i, a, b);
      load_bf16_pairs(x + i + 2 * W, c, d);
    } else {
      a = load_vec<scalar_t, acc_t>(x + i), b = load_vec<scalar_t, acc_t>(x + i + W);
      c = load_vec<scalar_t, acc_t>(x + i + 2 * W), d = load_vec<scalar_t, acc_t>(x + i + 3 * W);
    }
  };
  const auto load2 = [&](const scalar_t* x, int64_t i) {
    if constexpr (kWiden) {
      return Vec::loadu(wide + i);
    } else {
      return load_vec<scalar_t, acc_t>(x + i);
    }
  };
  const Exp2 exp2;
  acc_t run_max = -kInf, run_sum = 0, logit_sum = 0, run_w = 0, run_q = 0;
  int64_t top1 = 0;
  for (int64_t off = 0; off < V; off += kBlock) {
    const int64_t len = std::min(kBlock, V - off);
    const scalar_t* x = row + off;
    // Pass 1: block max and block sum (kPairs: the max of whole groups of U by bf16_max, their
    // sum in pass 2, which widens them anyway).
    Vec m0(-kInf), m1(-kInf), m2(-kInf), m3(-kInf), s0(0), s1(0), s2(0), s3(0);
    int64_t i = 0;
    acc_t pairs_max = -kInf;
    if constexpr (kPairs) {
      i = len / U * U;
      pairs_max = bf16_max(x, i);
    }
    for (; i + U <= len; i += U) {
      Vec a, b, c, d;
      load_u(x, i, a, b, c, d);
      m0 = vmax(m0, a), m1 = vmax(m1, b), m2 = vmax(m2, c), m3 = vmax(m3, d);
      s0 += a, s1 += b, s2 += c, s3 += d;
      if constexpr (kWiden) a.store(wide + i), b.store(wide + i + W), c.store(wide + i + 2 * W), d.store(wide + i + 3 * W);
    }
    for (; i + W <= len; i += W) {
      const Vec a = load_vec<scalar_t, acc_t>(x + i);
      m0 = vmax(m0, a), s0 += a;
      if constexpr (kWiden) a.store(wide + i);
    }
    acc_t block_max = std::max(reduce_lanes(vmax(vmax(m0, m1), vmax(m2, m3)), smax), pairs_max);
    acc_t block_sum = reduce_lanes((s0 + s1) + (s2 + s3), sadd);
    if constexpr (kPairs) s0 = s1 = s2 = s3 = Vec(0);  // pass 2 sums the groups of U
    for (int64_t j = i; j < len; ++j) {
      const acc_t v = static_cast<acc_t>(x[j]);
      block_max = std::max(block_max, v), block_sum += v;
    }
    if constexpr (kStats) {
      // A strictly greater max moves the top-1 to its first occurrence in this block; an
      // equal one keeps the earlier index (argmax's first maximum). Rare after the first blocks.
      if (block_max > run_max) {
        int64_t j = 0;
        while (j < len && static_cast<acc_t>(x[j]) != block_max) ++j;
        top1 = off + j;
      }
    }
    // Pass 2: exp against the new running max, from L1.
    const acc_t new_max = std::max(run_max, block_max);
    const acc_t offset = exp_offset(new_max);  // 0 while every logit so far is -inf
    const Vec voffset(offset);
    Vec e0(0), e1(0), e2(0), e3(0), w0(0), w1(0), w2(0), w3(0), q0(0), q1(0), q2(0), q3(0);
    const auto fold = [&](const Vec& v, Vec& es, Vec& ws, Vec& qs) {
      if constexpr (avx512) {
        // in base 2: t = (x - offset) log2 e, so ws is sum e t, w = ws ln 2 (masked: e = 0, t clamped)
        const Vec t = exp2_arg(v, voffset);
        const Vec e = exp2(t);
        es += e;
        if constexpr (kStats) {
          ws = at::vec::fmadd(e, clamp_exp2_arg(t), ws);
          qs = at::vec::fmadd(e, e, qs);
        }
      } else {
        const Vec d = v - voffset;
        const Vec e = vexp(d);
        es += e;
        if constexpr (kStats) {
          ws = at::vec::fmadd(e, vmax(d, vlowest), ws);
          qs = at::vec::fmadd(e, e, qs);
        }
      }
    };
    const BlockBytes next = block_ahead(row, next_row, V, off, 1), after = block_ahead(row, next_row, V, off, 2);
    for (i = 0; i + U <= len; i += U) {
      const int64_t from = i * int64_t(sizeof(scalar_t)), to = (i + U) * int64_t(sizeof(scalar_t));
      for (int64_t b = from; b < std::min(to, next.bytes); b += 64) __builtin_prefetch(next.start + b, 0, 3);
      for (int64_t b = from; b < std::min(to, after.bytes); b += 64) __builtin_prefetch(after.start + b, 0, 2);
      Vec a, b, c, d;
      if constexpr (kWiden) {
        a = load2(x, i), b = load2(x, i + W), c = load2(x, i + 2 * W), d = load2(x, i + 3 * W);
      } else {
        load_u(x, i, a, b, c, d);
      }
      if constexpr (kPairs) s0 += a, s1 += b, s2 += c, s3 += d;
      fold(a, e0, w0, q0);
      fold(b, e1, w1, q1);
      fold(c, e2, w2, q2);
      fold(d, e3, w3, q3);
    }
    for (; i + W <= len; i += W) fold(load2(x, i), e0, w0, q0);
    if constexpr (kPairs) block_sum += reduce_lanes((s0 + s1) + (s2 + s3), sadd);
    logit_sum += block_sum;
    acc_t block_exp = reduce_lanes((e0 + e1) + (e2 + e3), sadd);
    acc_t block_w = 0, block_q = 0;
    if constexpr (kStats) {
      block_w = reduce_lanes((w0 + w1) + (w2 + w3), sadd);
      if constexpr (avx512) block_w *= kLn2;  // sum e t, t in base 2
      block_q = reduce_lanes((q0 + q1) + (q2 + q3), sadd);
    }
    for (int64_t j = i; j < len; ++j) {
      const acc_t d = static_cast<acc_t>(x[j]) - offset;
      const acc_t e = std::exp(d);
      block_exp += e;
      if constexpr (kStats) {
        block_w += e > 0 ? e * d : acc_t(0);
        block_q += e * e;
      }
    }
    const acc_t rescale = std::exp(run_max - offset);  // 0 while the row was all -inf
    if constexpr (kStats) {
      run_w = run_sum > 0 ? rescale * (run_w + (run_max - offset) * run_sum) + block_w : block_w;
      run_q = rescale * rescale * run_q + block_q;
    }
    run_sum = run_sum * rescale + block_exp;
    run_max = new_max;
  }
  // A NaN or +inf logit makes every result NaN, as in log_softmax (x - max is NaN at a +inf) and
  // on the AVX-512 path by itself; at::vec's exp_u20 (the generic path) clamps its argument
  // with min/max, which turn NaN into e^88, so there the sums need not be NaN. The logits' sum
  // is NaN or +inf whenever the row holds either: only then is the row scanned.
  const auto nan_or_inf = [](scalar_t v) {
    const acc_t x = static_cast<acc_t>(v);
    return std::isnan(x) || x == kInf;
  };
  if ((std::isnan(logit_sum) || logit_sum == kInf) && std::any_of(row, row + V, nan_or_inf)) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {nan, logit_sum, nan, nan, top1};
  }
  RowForward<acc_t> out{run_max + std::log(run_sum), logit_sum, 0, 0, top1};
  if constexpr (kStats) {
    const acc_t log_s = std::log(run_sum);
    out.entropy = log_s - run_w / run_sum;
    out.log_sum_sq_probs = std::log(run_q) - 2 * log_s;
  }
  return out;
}

// Where forward_rows writes: per counted position [N, T'] (zeros at ignored ones).
template <typename acc_t>
struct ForwardOutputs {
  acc_t* token_logps;
  acc_t* lse;
  acc_t* row_logit_sums;
  // statistics=True only (else null): always float32 / bool, as the contract says
  float* entropy = nullptr;
  float* log_sum_sq_probs = nullptr;
  bool* is_top1 = nullptr;
  float* mean_logits = nullptr;
};

template <bool kStats, bool kAvx512, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_rows(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const Geometry& g,
                  const ForwardOutputs<acc_t>& o) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::parallel_for(0, g.N * g.Tout, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Tout, t = r % g.Tout;
      const int64_t y = lab[n * g.T + t + g.shift];
      if (y == ignore_index) {  // skipped: the row is never read
        o.token_logps[r] = o.lse[r] = o.row_logit_sums[r] = 0;
        if constexpr (kStats) {
          o.entropy[r] = o.log_sum_sq_probs[r] = o.mean_logits[r] = 0;
          o.is_top1[r] = false;
        }
        continue;
      }
      const scalar_t* row = base + n * g.s0 + t * g.s1;
      const scalar_t* next_row = nullptr;  // the next counted row of this task, to prefetch
      for (int64_t k = r + 1; k < end && next_row == nullptr; ++k) {
        const int64_t kn = k / g.Tout, kt = k % g.Tout;
        if (lab[kn * g.T + kt + g.shift] != ignore_index) next_row = base + kn * g.s0 + kt * g.s1;
      }
      const RowForward<acc_t> f = forward_row<kStats, kAvx512>(row, g.V, next_row);
      o.token_logps[r] = static_cast<acc_t>(row[y]) - f.lse;
      o.lse[r] = f.lse;
      o.row_logit_sums[r] = f.logit_sum;
      if constexpr (kStats) {
        o.entropy[r] = static_cast<float>(f.entropy);
        o.log_sum_sq_probs[r] = static_cast<float>(f.log_sum_sq_probs);
        o.is_top1[r] = f.top1 == y;
        o.mean_logits[r] = static_cast<float>(f.logit_sum / static_cast<acc_t>(g.V));
      }
    }
  });
}

// One counted row of the gradient, g * (onehot - softmax): read once, written once, two
// vectors at a time (a 16-bit destination gets one packed store of both). The label's element
// is read before the row is written (in place, dst == row) and written last, so the loop has
// no per-element branch. kAvx512: vec_math.h's exp and stores (kStream: non-temporal, for a
// 64-byte aligned dst), else at::vec's.
template <bool kAvx512, bool kStream, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_row(const scalar_t* row, scalar_t* dst, int64_t V, int64_t y, acc_t lse, acc_t gi) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool avx512 = kAvx512 && std::is_same_v<acc_t, float>;
  const Vec vlse(lse), vneg_g(-gi);
  const Exp2 exp2, exp2_neg_g(static_cast<float>(-gi));  // the second's polynomial carries -g
  // -g * softmax
  const auto neg_g_softmax = [&](const Vec& v) {
    if constexpr (avx512) {
      return exp2_neg_g(exp2_arg(v, vlse));
    } else {
      return vexp(v - vlse) * vneg_g;
    }
  };
  // the label's softmax, by the same vector exp as its neighbours
  const Vec label(static_cast<acc_t>(row[y]));
  Vec label_softmax;
  if constexpr (avx512) {
    label_softmax = exp2(exp2_arg(label, vlse));
  } else {
    label_softmax = vexp(label - vlse);
  }
  const acc_t p_label = reduce_lanes(label_softmax, [](acc_t a, acc_t) { return a; });
  int64_t i = 0;
  for (; i + 2 * W <= V; i += 2 * W) {
    const Vec a = neg_g_softmax(load_vec<scalar_t, acc_t>(row + i));
    const Vec b = neg_g_softmax(load_vec<scalar_t, acc_t>(row + i + W));
    if constexpr (avx512) {
      store_two_avx512<kStream>(dst + i, a, b);
    } else {
      store_two(dst + i, a, b);
    }
  }
  for (; i < V; ++i) dst[i] = static_cast<scalar_t>(std::exp(static_cast<acc_t>(row[i]) - lse) * -gi);
  dst[y] = static_cast<scalar_t>(p_label * -gi + gi);
}

#ifdef FASTDPO_AVX512_PATH
#pragma GCC push_options
#pragma GCC target("avx512bf16")
// backward_row for bfloat16 on a CPU with AVX512-BF16 (Isa::kAvx512Bf16): the same math, each
// pair of float32 vectors packed by one vcvtne2ps2bf16 (round to nearest even, NaN kept; a
// result below bfloat16's normal range, |g p| < 1.2e-38, becomes 0 instead of a subnormal).
// Compiled for that extension alone, so it only runs where the CPU has it.
template <bool kStream>
void backward_row_bf16(const c10::BFloat16* row, c10::BFloat16* dst, int64_t V, int64_t y, float lse, float gi) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec vlse(lse);
  const Exp2 exp2, exp2_neg_g(-gi);
  const Vec label(static_cast<float>(row[y]));
  const float p_label = reduce_lanes(exp2(exp2_arg(label, vlse)), [](float a, float) { return a; });
  int64_t i = 0;
  for (; i + 2 * W <= V; i += 2 * W) {
    const __m512 a = exp2_neg_g(exp2_arg(load_vec<c10::BFloat16, float>(row + i), vlse));
    const __m512 b = exp2_neg_g(exp2_arg(load_vec<c10::BFloat16, float>(row + i + W), vlse));
    const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a is the low half
    if constexpr (kStream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), packed);
    } else {
      _mm512_storeu_si512(dst + i, packed);
    }
  }
  for (; i < V; ++i) dst[i] = static_cast<c10::BFloat16>(std::exp(static_cast<float>(row[i]) - lse) * -gi);
  dst[y] = static_cast<c10::BFloat16>(p_label * -gi + gi);
}
#pragma GCC pop_options
#endif

// A row of zeros (an ignored position's gradient), streamed like the counted rows if kStream.
template <bool kStream, typename scalar_t>
void zero_row(scalar_t* dst, int64_t V) {
  int64_t i = 0;
  if constexpr (kStream) {
    const at::vec::Vectorized<float> zero(0.f);
    for (; i + 2 * zero.size() <= V; i += 2 * zero.size()) store_two_avx512<true>(dst + i, zero, zero);
  }
  std::fill(dst + i, dst + V, scalar_t(0));
}

// Gradients this large are streamed to memory (on the AVX-512 path): they exceed any cache, and
// non-temporal stores skip reading each destination line before writing it.
constexpr int64_t kStreamBytes = int64_t(64) << 20;

// kBf16Ne: bfloat16 rows by backward_row_bf16 (AVX512-BF16).
template <bool kAvx512, bool kStream, typename scalar_t, bool kBf16Ne = false>
void backward_rows(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                   const at::Tensor& grad_rows, int64_t ignore_index, const Geometry& g, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = logits.data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const int64_t o0 = grad.stride(0), o1 = grad.stride(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const acc_t* lse_in = lse.data_ptr<acc_t>();
  const acc_t* g_in = grad_rows.data_ptr<acc_t>();
  // Every logits row, including the last one under the shift, which scores nothing.
  at::parallel_for(0, g.N * g.T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.T, t = r % g.T;
      scalar_t* dst = out + n * o0 + t * o1;
      const int64_t y = t < g.Tout ? lab[n * g.T + t + g.shift] : ignore_index;
      if (y == ignore_index) {  // zero gradient, the logits row is never read
        zero_row<kStream>(dst, g.V);
        continue;
      }
      const int64_t i = n * g.Tout + t;
      const scalar_t* row = in + n * g.s0 + t * g.s1;
      if (std::isnan(lse_in[i])) {  // a NaN or +inf logit in the row (see forward_row)
        std::fill(dst, dst + g.V, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
        continue;
      }
#ifdef FASTDPO_AVX512_PATH
      if constexpr (kBf16Ne && std::is_same_v<scalar_t, c10::BFloat16>) {
        backward_row_bf16<kStream>(row, dst, g.V, y, lse_in[i], g_in[i]);
        continue;
      }
#endif
      backward_row<kAvx512, kStream>(row, dst, g.V, y, lse_in[i], g_in[i]);
    }
    if constexpr (kStream) stream_fence();
  });
}

// Which backward: the AVX-512 path streams when the gradient is large and every row of it
// starts on a 64-byte boundary; bfloat16 uses AVX512-BF16 where the CPU has it.
template <typename scalar_t>
void dispatch_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                       const at::Tensor& grad_rows, int64_t ignore_index, const Geometry& g, at::Tensor& grad) {
  const int64_t item = static_cast<int64_t>(sizeof(scalar_t));
  const bool aligned = reinterpret_cast<uintptr_t>(grad.data_ptr()) % 64 == 0 && (grad.stride(0) * item) % 64 == 0 &&
                       (grad.stride(1) * item) % 64 == 0 && (2 * at::vec::Vectorized<float>::size() * item) % 64 == 0;
  const bool stream = aligned && grad.nbytes() >= static_cast<size_t>(kStreamBytes);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (fastdpo::isa() == fastdpo::Isa::kAvx512Bf16) {
      if (stream) return backward_rows<true, true, scalar_t, true>(logits, labels, lse, grad_rows, ignore_index, g, grad);
      return backward_rows<true, false, scalar_t, true>(logits, labels, lse, grad_rows, ignore_index, g, grad);
    }
  }
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {  // (float64 is for gradcheck only)
    if (avx512_path() && stream) {
      return backward_rows<true, true, scalar_t>(logits, labels, lse, grad_rows, ignore_index, g, grad);
    }
    if (avx512_path()) return backward_rows<true, false, scalar_t>(logits, labels, lse, grad_rows, ignore_index, g, grad);
  }
  backward_rows<false, false, scalar_t>(logits, labels, lse, grad_rows, ignore_index, g, grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logps_forward(const at::Tensor& logits,
                                                                         const at::Tensor& labels,
                                                                         int64_t ignore_index, bool shift) {
  const Geometry g = geometry(logits, labels, shift);
  check_labels(labels, g, ignore_index);
  auto acc = logits.options().dtype(math_dtype(logits));
  at::Tensor token_logps = at::empty({g.N, g.Tout}, acc);
  at::Tensor lse = at::empty({g.N, g.Tout}, acc);
  at::Tensor row_logit_sums = at::empty({g.N, g.Tout}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logps_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardOutputs<acc_t> o{token_logps.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
                                  row_logit_sums.data_ptr<acc_t>()};
    if (avx512_path()) {
      forward_rows<false, true, scalar_t>(logits, labels, ignore_index, g, o);
    } else {
      forward_rows<false, false, scalar_t>(logits, labels, ignore_index, g, o);
    }
  });
  // Per-sequence sums in row order, in float64: deterministic and exact enough for any length.
  at::Tensor sequence_logps = token_logps.sum(1, false, at::kDouble).to(acc.dtype());
  at::Tensor logit_sums = row_logit_sums.sum(1, false, at::kDouble).to(acc.dtype());
  return {token_logps, lse, sequence_logps, logit_sums};
}

// The forward plus the token statistics (contract: fastdpo/backends/__init__.py), same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
logps_forward_statistics(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, bool shift) {
  const Geometry g = geometry(logits, labels, shift);
  check_labels(labels, g, ignore_index);
  auto acc = logits.options().dtype(math_dtype(logits));
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor token_logps = at::empty({g.N, g.Tout}, acc);
  at::Tensor lse = at::empty({g.N, g.Tout}, acc);
  at::Tensor row_logit_sums = at::empty({g.N, g.Tout}, acc);
  at::Tensor entropy = at::empty({g.N, g.Tout}, f32);
  at::Tensor log_sum_sq_probs = at::empty({g.N, g.Tout}, f32);
  at::Tensor is_top1 = at::empty({g.N, g.Tout}, logits.options().dtype(at::kBool));
  at::Tensor mean_logits = at::empty({g.N, g.Tout}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logps_forward_statistics", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardOutputs<acc_t> o{token_logps.data_ptr<acc_t>(),  lse.data_ptr<acc_t>(),
                                  row_logit_sums.data_ptr<acc_t>(), entropy.data_ptr<float>(),
                                  log_sum_sq_probs.data_ptr<float>(), is_top1.data_ptr<bool>(),
                                  mean_logits.data_ptr<float>()};
    if (avx512_path()) {
      forward_rows<true, true, scalar_t>(logits, labels, ignore_index, g, o);
    } else {
      forward_rows<true, false, scalar_t>(logits, labels, ignore_index, g, o);
    }
  });
  at::Tensor sequence_logps = token_logps.sum(1, false, at::kDouble).to(acc.dtype());
  at::Tensor logit_sums = row_logit_sums.sum(1, false, at::kDouble).to(acc.dtype());
  return {token_logps, lse, sequence_logps, logit_sums, entropy, log_sum_sq_probs, is_top1, mean_logits};
}

// The gradient is a fresh [N, T, V] buffer, written once. Faulting it in 4 KB pages costs
// more than the kernel itself (one page fault per 4 KB: ~130k for 512 MB); with transparent
// huge pages it is one fault per 2 MB. Ask for them where the OS allows it (THP "madvise" or
// "always"); elsewhere this is a no-op. The advice covers the whole pages inside the buffer.
void advise_huge_pages(void* ptr, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr size_t kMin = size_t(4) << 20;  // smaller buffers gain little
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(page - 1);
  if (bytes >= kMin && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

void check_backward_inputs(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& grad_rows,
                           const Geometry& g) {
  CHECK_CPU(lse);
  CHECK_CPU(grad_rows);
  CHECK_DTYPE(lse, math_dtype(logits));
  CHECK_DTYPE(grad_rows, math_dtype(logits));
  CHECK_SHAPE(lse, g.N, g.Tout);
  CHECK_SHAPE(grad_rows, g.N, g.Tout);
  TORCH_CHECK(lse.is_contiguous() && grad_rows.is_contiguous(), "lse and grad_rows must be contiguous");
}

at::Tensor logps_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                          const at::Tensor& grad_rows, int64_t ignore_index, bool shift) {
  const Geometry g = geometry(logits, labels, shift);
  check_backward_inputs(logits, lse, grad_rows, g);
  check_labels(labels, g, ignore_index);
  at::Tensor grad = at::empty({g.N, g.T, g.V}, logits.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logps_backward", [&] {
    dispatch_backward<scalar_t>(logits, labels, lse, grad_rows, ignore_index, g, grad);
  });
  return grad;
}

void logps_backward_inplace(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const at::Tensor& grad_rows, int64_t ignore_index, bool shift) {
  const Geometry g = geometry(logits, labels, shift);
  check_backward_inputs(logits, lse, grad_rows, g);
  check_labels(labels, g, ignore_index);
  // Each row is read block by block before the same block is written: safe in place.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logps_backward_", [&] {
    dispatch_backward<scalar_t>(logits, labels, lse, grad_rows, ignore_index, g, logits);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("logps_forward", &logps_forward);
  m.impl("logps_forward_statistics", &logps_forward_statistics);
  m.impl("logps_backward", &logps_backward);
  m.impl("logps_backward_", &logps_backward_inplace);
}
