// Operand packing and the tile GEMM of the native fused linear kernel (csrc/fused_linear.cpp).
//
// Every product is at::native::cpublas::brgemm: C[M, N] (+)= A[M, K] B[K, N] with float32
// accumulation and float32 output, A row-major. For bfloat16 operands B must be in the VNNI
// layout [K/2][N][2] (two consecutive K entries of a column side by side, what the AVX512-BF16
// and AMX dot-product instructions read), K padded to even with zeros; float32 operands are
// plain row-major [K][N]. `op_t` is the operand type (float or at::BFloat16), `in_t` the
// type of the tensors (float, at::BFloat16, at::Half): packing converts.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/Utils.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastdpo_linear {

template <typename op_t>
constexpr bool kVnni = !std::is_same_v<op_t, float>;

// K rounded up to what the operand layout needs (even for VNNI pairs).
template <typename op_t>
constexpr int64_t pad_k(int64_t k) {
  return kVnni<op_t> ? (k + 1) / 2 * 2 : k;
}

template <typename to_t, typename from_t>
inline to_t cast(from_t x) {
  if constexpr (std::is_same_v<to_t, from_t>) {
    return x;  // a copy: no round trip through float
  } else {
    return static_cast<to_t>(static_cast<float>(x));
  }
}

// N is cut into panels so that the K x N panel of B a brgemm call streams stays in L2, and K
// into slices (C accumulated across them) so that the slice of A it re-reads for each panel
// does too: with the weight as A (GEMMs 1 and 3, K = H) the block then streams from memory once
// and is re-read from cache. Measured on the whole loss at 2x1024x2048x128256 (two threads,
// memory resident): bfloat16 about 8% faster, float32 about 14%; slices of 1024 the same as 512,
// 256 slower. Even, for VNNI pairs.
constexpr int64_t kGemmPanel = 256;
constexpr int64_t kGemmSlice = 512;

// C[M, N] (+)= A[M, K] B[K, N]; B in the operand layout with row length ldb (columns).
template <typename op_t>
void tile_gemm(int64_t M, int64_t N, int64_t K, const op_t* A, int64_t lda, const op_t* B, int64_t ldb, float* C,
               int64_t ldc, bool add) {
  for (int64_t k0 = 0; k0 < K; k0 += kGemmSlice) {
    const int64_t kb = std::min(kGemmSlice, K - k0);
    const op_t* slice = B + k0 * ldb;  // VNNI: k0 / 2 pair rows of 2 * ldb values
    for (int64_t n0 = 0; n0 < N; n0 += kGemmPanel) {
      const int64_t nb = std::min(kGemmPanel, N - n0);
      const op_t* panel = slice + (kVnni<op_t> ? 2 * n0 : n0);
      at::native::cpublas::brgemm(M, nb, kb, lda, ldb, ldc, add || k0 > 0, A + k0, panel, C + n0, kVnni<op_t>);
    }
  }
}

// Convert n values (vectorised where the types allow).
template <typename to_t, typename from_t>
inline void convert(const from_t* src, to_t* dst, int64_t n) {
  if constexpr (std::is_same_v<to_t, from_t>) {
    std::memcpy(dst, src, n * sizeof(to_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// B = rows^T as [K = H, N = r]: for float, out[k][i] = row_i[k]; for VNNI, out[k/2][i][k%2],
// i.e. the 32-bit pairs of each row transposed. `row(i)` gives row i's pointer. H must be
// even for VNNI (the caller falls back to float operands otherwise).
template <typename in_t, typename op_t, typename RowFn>
void pack_rows_transposed(RowFn row, int64_t r, int64_t H, op_t* out) {
  if constexpr (kVnni<op_t>) {
    static_assert(sizeof(op_t) == 2);
    for (int64_t i = 0; i < r; ++i) {
      const in_t* src = row(i);
      for (int64_t k2 = 0; k2 < H / 2; ++k2) {
        out[(k2 * r + i) * 2] = cast<op_t>(src[2 * k2]);
        out[(k2 * r + i) * 2 + 1] = cast<op_t>(src[2 * k2 + 1]);
      }
    }
  } else {
    for (int64_t i = 0; i < r; ++i) {
      const in_t* src = row(i);
      for (int64_t k = 0; k < H; ++k) out[k * r + i] = cast<op_t>(src[k]);
    }
  }
}

// Interleave two 16-bit rows: out[2n] = a[n], out[2n + 1] = b[n] (b null: zeros).
inline void interleave16(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i lo_idx = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i hi_idx = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (; k + 32 <= n; k += 32) {
    const __m512i va = _mm512_loadu_si512(a + k);
    const __m512i vb = b ? _mm512_loadu_si512(b + k) : _mm512_setzero_si512();
    const __m512i lo = _mm512_unpacklo_epi16(va, vb);  // per 128-bit lane: a0 b0 .. a3 b3
    const __m512i hi = _mm512_unpackhi_epi16(va, vb);  // per 128-bit lane: a4 b4 .. a7 b7
    _mm512_storeu_si512(out + 2 * k, _mm512_permutex2var_epi64(lo, lo_idx, hi));
    _mm512_storeu_si512(out + 2 * k + 32, _mm512_permutex2var_epi64(lo, hi_idx, hi));
  }
#endif
  for (; k < n; ++k) {
    out[2 * k] = a[k];
    out[2 * k + 1] = b ? b[k] : uint16_t(0);
  }
}

// B = rows as [K = r, N = H] in the operand layout: float copies/converts each row; VNNI
// interleaves rows 2k and 2k + 1 (a zero row pads an odd r). `tmp` holds two converted rows
// when in_t is not op_t.
template <typename in_t, typename op_t, typename RowFn>
void pack_rows(RowFn row, int64_t r, int64_t H, op_t* out, op_t* tmp) {
  if constexpr (kVnni<op_t>) {
    for (int64_t k2 = 0; k2 < pad_k<op_t>(r) / 2; ++k2) {
      const bool has_b = 2 * k2 + 1 < r;
      const op_t* a = reinterpret_cast<const op_t*>(row(2 * k2));
      const op_t* b = has_b ? reinterpret_cast<const op_t*>(row(2 * k2 + 1)) : nullptr;
      if constexpr (!std::is_same_v<in_t, op_t>) {
        convert(row(2 * k2), tmp, H);
        if (has_b) convert(row(2 * k2 + 1), tmp + H, H);
        a = tmp;
        b = has_b ? tmp + H : nullptr;
      }
      interleave16(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b),
                   reinterpret_cast<uint16_t*>(out + k2 * 2 * H), H);
    }
  } else {
    for (int64_t i = 0; i < r; ++i) convert(row(i), out + i * H, H);
  }
}

// A = x^T in the operand type: out[i][j] = x[j][i] for x [rows_x][ldx] (float32, or bfloat16
// G tiles kept by the chunk path), i < cols,
// j < rows_x; columns rows_x..lda of out are zero (K padding).
template <typename op_t, typename src_t>
void transpose_to(const src_t* x, int64_t rows_x, int64_t ldx, int64_t cols, op_t* out, int64_t lda) {
  constexpr int64_t B = 16;
  for (int64_t j0 = 0; j0 < rows_x; j0 += B) {
    const int64_t j1 = std::min(rows_x, j0 + B);
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = j0; j < j1; ++j) out[i * lda + j] = cast<op_t>(x[j * ldx + i]);
  }
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = rows_x; j < lda; ++j) out[i * lda + j] = op_t(0.0f);
}

// ---------------------------------------------------------------------------------------------
// Shared by the ops of csrc/fused_linear.cpp and csrc/fused_linear_chunk.cpp.

using Vec = at::vec::Vectorized<float>;
inline constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Which operands: bfloat16 brgemm needs oneDNN's ukernel and bf16 dot-product instructions.

inline bool probe_bf16_brgemm() {
  auto caps = at::cpu::get_cpu_capabilities();
  auto has = [&](const char* key) { return caps.count(key) && caps.at(key).toBool(); };
  if (!has("avx512_bf16") && !has("amx_bf16")) return false;
  // A 2 x 16 x 2 product in the VNNI layout, checked exactly.
  std::vector<at::BFloat16> a = {1.0f, 2.0f, 3.0f, 4.0f}, b(2 * 16 * 2);
  for (int n = 0; n < 16; ++n) b[2 * n] = float(n), b[2 * n + 1] = 1.0f;
  std::vector<float> c(2 * 16, -1.0f);
  try {
    at::native::cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a.data(), b.data(), c.data(), true);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  for (int n = 0; n < 16; ++n)
    if (c[n] != 1.0f * n + 2.0f || c[16 + n] != 3.0f * n + 4.0f) return false;
  return true;
}

inline bool bf16_operands_available() {
  static const bool probed = probe_bf16_brgemm();
  return probed && at::globalContext().userEnabledMkldnn();
}

// ---------------------------------------------------------------------------------------------
// Shared views of the inputs.

template <typename in_t>
struct Problem {
  const in_t* hidden;
  int64_t hs0, hs1, H;
  const in_t* weight;
  int64_t ws0, V;
  std::vector<float> bias;  // float32 copy, empty without bias
  const int64_t *row_n, *row_t, *label;
  int64_t C;

  const in_t* hrow(int64_t c) const { return hidden + row_n[c] * hs0 + row_t[c] * hs1; }
  const in_t* wrow(int64_t v) const { return weight + v * ws0; }
};

template <typename in_t>
Problem<in_t> problem(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& row_n, const at::Tensor& row_t, const at::Tensor& labels) {
  Problem<in_t> p{hidden.data_ptr<in_t>(), hidden.stride(0), hidden.stride(1), hidden.size(2),
                  weight.data_ptr<in_t>(), weight.stride(0), weight.size(0), {},
                  row_n.data_ptr<int64_t>(), row_t.data_ptr<int64_t>(), labels.data_ptr<int64_t>(),
                  row_n.numel()};
  if (bias.has_value()) {
    p.bias.resize(p.V);
    convert(bias->data_ptr<in_t>(), p.bias.data(), p.V);
  }
  return p;
}

// Tasks [0, n) handed out one at a time to the threads of a parallel region, each thread taking
// the next as it finishes one (a dynamic schedule: kept and recomputed row tiles, which cost one
// GEMM or two, spread evenly over the threads instead of by halves of the range). Every task
// computes its own outputs alone, so results do not depend on which thread ran it:
//   TaskQueue tasks(n);
//   at::parallel_for(0, tasks.workers(), 1, [&](int64_t, int64_t) { ...; for (int64_t t; tasks.next(t);) ...; });
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}
  int64_t workers() const { return std::min<int64_t>(n_, at::get_num_threads()); }
  bool next(int64_t& task) { return (task = next_.fetch_add(1)) < n_; }

 private:
  int64_t n_;
  std::atomic<int64_t> next_{0};
};

// Run f(i0, count) over the lanes of r values, one vector at a time.
template <typename F>
inline void lanes(int64_t r, F f) {
  for (int64_t i0 = 0; i0 < r; i0 += Vec::size()) f(i0, std::min<int64_t>(Vec::size(), r - i0));
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A-operand rows of the weight block: the weight itself when the types agree, else converted.
template <typename in_t, typename op_t>
const op_t* weight_block(const Problem<in_t>& p, int64_t v0, int64_t vb, std::vector<op_t>& buf, int64_t& lda) {
  if constexpr (std::is_same_v<in_t, op_t>) {
    lda = p.ws0;
    return p.wrow(v0);
  } else {
    for (int64_t j = 0; j < vb; ++j) convert(p.wrow(v0 + j), buf.data() + j * p.H, p.H);
    lda = p.H;
    return buf.data();
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

struct RowState {  // per row of a row tile
  std::vector<float> m, s_other, p_label, picked, logit_sum, tile_max, tile_sum, scale, m_ref;
  std::vector<int64_t> local;  // label - v0 of the current block
  // Token statistics (sized only when asked for): w = sum e (x - m_ref) and q = sum e^2 over the
  // whole row (label included), their tile parts, the first maximum's index (arg) and its
  // index within the tile (tile_arg, a float lane).
  std::vector<float> w, q, tile_w, tile_q, tile_arg;
  std::vector<int64_t> arg;
  explicit RowState(int64_t n, bool statistics = false)
      : m(n), s_other(n), p_label(n), picked(n), logit_sum(n), tile_max(n), tile_sum(n), scale(n), m_ref(n),
        local(n) {
    if (!statistics) return;
    for (auto* v : {&w, &q, &tile_w, &tile_q, &tile_arg}) v->resize(n);
    arg.resize(n);
  }
  // A row tile starts with nothing folded.
  void start(int64_t r) {
    std::fill_n(m.begin(), r, -kInf);
    for (auto* s : {&s_other, &p_label, &logit_sum}) std::fill_n(s->begin(), r, 0.0f);
    if (w.empty()) return;
    std::fill_n(w.begin(), r, 0.0f);
    std::fill_n(q.begin(), r, 0.0f);
    std::fill_n(arg.begin(), r, -1);
  }
  // Row i's (label logit, lse, logit sum) once every block is folded.
  void finish(int64_t i, float* label, float* lse, float* sum) const {
    const float s = s_other[i] + p_label[i];
    *label = picked[i];
    *lse = s > 0.0f ? m[i] + std::log(s) : -kInf;
    *sum = logit_sum[i];
  }
  // Row i's entropy = log s - w / s and log sum p^2 = log q - 2 log s (0 for a row without a
  // finite logit), and whether the label is the first maximum.
  void finish_statistics(int64_t i, int64_t label, float* entropy, float* log_sum_sq, bool* is_top1) const {
    const float s = s_other[i] + p_label[i], log_s = std::log(s);
    *entropy = s > 0.0f ? log_s - w[i] / s : 0.0f;
    *log_sum_sq = s > 0.0f ? std::log(q[i]) - 2.0f * log_s : 0.0f;
    *is_top1 = arg[i] == label;
  }
};

// Fold the float32 tile x^T [vb, ldx] (r live columns) of block v0 into the rows' state. On
// return the tile holds exp(x - m_new) with the label entries zeroed. With Statistics the same
// sweeps also fold w, q and the first maximum; the other results are bitwise the same.
template <bool Statistics, typename in_t>
void fold_block(const Problem<in_t>& p, float* xT, int64_t vb, int64_t ldx, int64_t r, int64_t v0, int64_t c0,
                RowState& st) {
  std::fill_n(st.tile_max.begin(), r, -kInf);
  for (int64_t j = 0; j < vb; ++j) {  // sweep 1: bias, max, logit sum
    float* x = xT + j * ldx;
    const Vec bj(p.bias.empty() ? 0.0f : p.bias[v0 + j]);
    lanes(r, [&](int64_t i0, int64_t n) {
      Vec v = Vec::loadu(x + i0, n);
      if (!p.bias.empty()) {
        v = v + bj;
        v.store(x + i0, n);
      }
      const Vec old = Vec::loadu(st.tile_max.data() + i0, n);
      if constexpr (Statistics) {  // strictly greater: an equal later entry keeps the first index
        const Vec arg = Vec::loadu(st.tile_arg.data() + i0, n);
        Vec::blendv(arg, Vec(float(j)), v > old).store(st.tile_arg.data() + i0, n);
      }
      at::vec::maximum(old, v).store(st.tile_max.data() + i0, n);
      (Vec::loadu(st.logit_sum.data() + i0, n) + v).store(st.logit_sum.data() + i0, n);
    });
  }
  for (int64_t i = 0; i < r; ++i) {
    const int64_t y = p.label[c0 + i] - v0;
    st.local[i] = (y >= 0 && y < vb) ? y : -1;
    if (st.local[i] >= 0) {
      st.picked[i] = xT[y * ldx + i];
      xT[y * ldx + i] = -kInf;  // the label is summed apart (p_label), never in the GEMM
    }
    const float m_new = std::max(st.m[i], st.tile_max[i]);
    // A row whose running max is still -inf has nothing to rescale; an all -inf block must
    // not make exp(-inf - -inf) = NaN, so it is exponentiated against 0 (every term is 0).
    st.scale[i] = st.m[i] == -kInf ? 0.0f : std::exp(st.m[i] - m_new);
    if constexpr (Statistics) {
      if (st.tile_max[i] > st.m[i]) st.arg[i] = v0 + int64_t(st.tile_arg[i]);
      // Rebase w = sum e (x - m_ref) to the new reference: w' = r (w + (m_ref - m_ref') s).
      const float ref_old = st.m[i] == -kInf ? 0.0f : st.m[i], ref_new = m_new == -kInf ? 0.0f : m_new;
      const float s_old = st.s_other[i] + st.p_label[i];
      st.w[i] = st.scale[i] * (st.w[i] + (ref_old - ref_new) * s_old);
      st.q[i] *= st.scale[i] * st.scale[i];
    }
    st.m_ref[i] = m_new == -kInf ? 0.0f : m_new;
    st.m[i] = m_new;
  }
  std::fill_n(st.tile_sum.begin(), r, 0.0f);
  if constexpr (Statistics) {
    std::fill_n(st.tile_w.begin(), r, 0.0f);
    std::fill_n(st.tile_q.begin(), r, 0.0f);
  }
  for (int64_t j = 0; j < vb; ++j) {  // sweep 2: exp(x - m) in place and its sum
    float* x = xT + j * ldx;
    lanes(r, [&](int64_t i0, int64_t n) {
      const Vec d = Vec::loadu(x + i0, n) - Vec::loadu(st.m_ref.data() + i0, n);
      const Vec e = d.exp_u20();
      e.store(x + i0, n);
      (Vec::loadu(st.tile_sum.data() + i0, n) + e).store(st.tile_sum.data() + i0, n);
      if constexpr (Statistics) {  // a masked entry (e = 0, d = -inf) adds 0, never 0 * -inf
        const Vec wd = e * at::vec::maximum(d, Vec(-1e30f));
        (Vec::loadu(st.tile_w.data() + i0, n) + wd).store(st.tile_w.data() + i0, n);
        (Vec::loadu(st.tile_q.data() + i0, n) + e * e).store(st.tile_q.data() + i0, n);
      }
    });
  }
  for (int64_t i = 0; i < r; ++i) {
    st.s_other[i] = st.s_other[i] * st.scale[i] + st.tile_sum[i];
    st.p_label[i] *= st.scale[i];
    const float e_label = st.local[i] >= 0 ? std::exp(st.picked[i] - st.m_ref[i]) : 0.0f;
    if (st.local[i] >= 0) st.p_label[i] += e_label;
    if constexpr (Statistics) {
      st.w[i] += st.tile_w[i];
      st.q[i] += st.tile_q[i] + e_label * e_label;
      if (e_label > 0.0f) st.w[i] += e_label * (st.picked[i] - st.m_ref[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile steps shared by the recompute path (csrc/fused_linear.cpp) and the chunk path
// (csrc/fused_linear_chunk.cpp).

// h of every row tile as the B operand of the head's gradient GEMM ([r, H], K = r padded), packed
// once per call: tile t at out + t * pad_k(R) * H.
template <typename in_t, typename op_t>
std::vector<op_t> pack_hidden_tiles(const Problem<in_t>& p, int64_t R) {
  const int64_t tiles = (p.C + R - 1) / R, stride = pad_k<op_t>(R) * p.H;
  std::vector<op_t> out(tiles * stride);
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<op_t> tmp(2 * p.H);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * R;
      pack_rows<in_t, op_t>([&](int64_t i) { return p.hrow(c0 + i); }, std::min(R, p.C - c0), p.H,
                            out.data() + t * stride, tmp.data());
    }
  });
  return out;
}

// Entries of the head's gradient tile at least this share of their row's |g| are corrected to
// float32 after the bfloat16 GEMM (head_grad_tile).
inline constexpr float kExactShare = 1.0f / 256.0f;

// Each row's limit scale * kExactShare |g|, made once per call for every tile and block.
inline std::vector<float> exact_limits(const std::vector<float>& g, float scale = 1.0f) {
  std::vector<float> limit(g.size());
  for (size_t c = 0; c < g.size(); ++c) limit[c] = scale * kExactShare * std::abs(g[c]);
  return limit;
}

// grad_W rows v0..v0+vb += G^T [vb, r] (float32, row stride ldg) . h [r, H] (B: the row tile c0
// packed by pack_hidden_tiles); g_rows [r] the rows' upstream gradients (|G| <= |g| entrywise).
// With bfloat16 operands G^T is rounded to bfloat16 for the GEMM, and every entry with
// |G| > kExactShare |g| - the label's g (1 - p) and the few large probabilities, at most 1 /
// kExactShare per row because sum |G| <= 2 |g| - gets its rounding error back in float32 (h
// times the residual). What stays is under 2^-9 kExactShare |g| = 2^-17 |g| per entry: the bound
// of splitting every entry into bfloat16 hi + lo (two GEMMs), for one GEMM and a sparse fix-up
// (see the header comment of csrc/fused_linear.cpp). limit [r]: the rows' kExactShare |g|
// (exact_limits). gA holds vb x pad_k(r) operands.
template <typename in_t, typename op_t>
void head_grad_tile(const Problem<in_t>& p, const float* g, int64_t ldg, int64_t vb, int64_t r, int64_t v0,
                    int64_t c0, const float* limit, const op_t* B, float* gw, std::vector<op_t>& gA) {
  const int64_t H = p.H;
  if constexpr (kVnni<op_t>) {
    const int64_t k = pad_k<op_t>(r);
    std::vector<std::pair<int64_t, int64_t>> exact;  // (j, i) of the entries fixed in float32
    for (int64_t j = 0; j < vb; ++j) {
      const float* x = g + j * ldg;
      convert(x, gA.data() + j * k, r);
      if (k > r) gA[j * k + r] = op_t(0.0f);
      lanes(r, [&](int64_t i0, int64_t n) {
        const Vec big = Vec::loadu(x + i0, n).abs() > Vec::loadu(limit + i0, n);
        if (big.zero_mask() == (1 << Vec::size()) - 1) return;  // no lane over its limit
        for (int64_t l = 0; l < n; ++l)
          if (std::abs(x[i0 + l]) > limit[i0 + l]) exact.emplace_back(j, i0 + l);
      });
    }
    tile_gemm<op_t>(vb, H, k, gA.data(), k, B, H, gw, H, true);
    for (auto [j, i] : exact) {
      const float residual = g[j * ldg + i] - float(gA[j * k + i]);
      if (residual == 0.0f) continue;
      const in_t* h = p.hrow(c0 + i);
      float* out = gw + j * H;
      for (int64_t d = 0; d < H; ++d) out[d] += residual * float(h[d]);
    }
  } else {
    tile_gemm<op_t>(vb, H, r, g, ldg, B, H, gw, H, true);
  }
}

// Buffers of hidden_grad_tile for one task.
template <typename op_t>
struct HiddenGradBuffers {
  std::vector<op_t> pA, wB, tmp, wconv;
  HiddenGradBuffers(int64_t R, int64_t VB, int64_t H, bool convert_weight)
      : pA(R * pad_k<op_t>(VB)), wB(kVnni<op_t> ? pad_k<op_t>(VB) * H : 0), tmp(2 * H),
        wconv(convert_weight ? VB * H : 0) {}
};

// acc [r, H] += P [r, vb] . W_block [vb, H], P given transposed as [vb, r] (row stride ldg;
// float32, or bfloat16 kept by the chunk path) and rounded to the operand type: a sum within one row, where one bfloat16 rounding of
// each term costs about what rounding the result does (csrc/fused_linear.cpp). W (lda) is the
// block as a float32 A operand when the caller has it already, else null.
template <typename in_t, typename op_t, typename g_t>
void hidden_grad_tile(const Problem<in_t>& p, const g_t* gT, int64_t ldg, int64_t vb, int64_t r, int64_t v0,
                      float* acc, HiddenGradBuffers<op_t>& buf, const op_t* W = nullptr, int64_t lda = 0) {
  const int64_t H = p.H, k = pad_k<op_t>(vb);
  transpose_to<op_t>(gT, vb, ldg, r, buf.pA.data(), k);
  if constexpr (kVnni<op_t>) {
    pack_rows<in_t, op_t>([&](int64_t j) { return p.wrow(v0 + j); }, vb, H, buf.wB.data(), buf.tmp.data());
    W = buf.wB.data();
    lda = H;
  } else if (W == nullptr) {
    W = weight_block<in_t, op_t>(p, v0, vb, buf.wconv, lda);
  }
  tile_gemm<op_t>(r, H, k, buf.pA.data(), k, W, lda, acc, H, true);
}

// ---------------------------------------------------------------------------------------------
// The recompute path's steps, shared by csrc/fused_linear.cpp and the rows of the chunk path
// (csrc/fused_linear_chunk.cpp) that its memory budget does not keep.

// Per counted row outputs of the forward; the statistics pointers are null when not asked for.
struct ForwardOut {
  float *label, *lse, *sum;
  float *entropy = nullptr, *log_sum_sq = nullptr;
  bool* is_top1 = nullptr;
};

// One task's buffers for forward_row_tile.
template <typename in_t, typename op_t>
struct ForwardBuffers {
  int64_t ldx;
  std::vector<op_t> hT, wconv;
  std::vector<float> xT, acc;
  HiddenGradBuffers<op_t> grad;
  RowState st;
  ForwardBuffers(int64_t R, int64_t VB, int64_t H, bool with_grad, bool statistics)
      : ldx(round_up(R, Vec::size())), hT(H * R), wconv(std::is_same_v<in_t, op_t> ? 0 : VB * H), xT(VB * ldx),
        acc(with_grad ? R * H : 0), grad(with_grad ? R : 0, with_grad ? VB : 0, H, false), st(R, statistics) {}
};

// The forward of rows c0..c0+r over the whole vocabulary, blocks in order:
//   x^T [v, r] = W_block [v, H] . h^T [H, r]                       GEMM 1, A is the weight itself
//   fold x into each row's running max m, the sum of exp(x - m) over the non-label columns
//   (s_other) and the label's exp(x_label - m) (p_label), the label logit and the logit sum;
//   with hidden_grad: acc [r, H] += exp(x - m)[r, v] (label column zeroed) . W_block [v, H]
//   (GEMM 2), rescaled as m grows. At the end of the row, with s = s_other + p_label:
//   lse = m + log s and d log p(label) / d h = W[label] * s_other / s - acc / s, written into
//   hidden_grad (hidden's dtype). Keeping the label apart avoids the cancellation in
//   W[label] - softmax . W when the label's probability is near 1.
template <bool Statistics, typename in_t, typename op_t>
void forward_row_tile(const Problem<in_t>& p, int64_t c0, int64_t r, int64_t VB, in_t* hidden_grad, int64_t gs0,
                      int64_t gs1, const ForwardOut& out, ForwardBuffers<in_t, op_t>& b) {
  const int64_t H = p.H, V = p.V, ldx = b.ldx;
  const bool grad = hidden_grad != nullptr;
  RowState& st = b.st;
  pack_rows_transposed<in_t, op_t>([&](int64_t i) { return p.hrow(c0 + i); }, r, H, b.hT.data());
  st.start(r);
  std::fill(b.acc.begin(), b.acc.end(), 0.0f);
  for (int64_t v0 = 0; v0 < V; v0 += VB) {
    const int64_t vb = std::min(VB, V - v0);
    int64_t lda;
    const op_t* W = weight_block<in_t, op_t>(p, v0, vb, b.wconv, lda);
    tile_gemm<op_t>(vb, r, H, W, lda, b.hT.data(), r, b.xT.data(), ldx, false);  // GEMM 1
    fold_block<Statistics>(p, b.xT.data(), vb, ldx, r, v0, c0, st);
    if (!grad) continue;
    for (int64_t i = 0; i < r; ++i) {
      if (st.scale[i] == 1.0f) continue;
      const Vec s(st.scale[i]);
      float* a = b.acc.data() + i * H;
      at::vec::map([&](Vec x) { return x * s; }, a, a, H);
    }
    hidden_grad_tile<in_t, op_t>(p, b.xT.data(), ldx, vb, r, v0, b.acc.data(), b.grad, W, lda);  // GEMM 2
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
    const float* a = b.acc.data() + i * H;
    for (int64_t k = 0; k < H; ++k) dst[k] = cast<in_t>(float(wy[k]) * own - a[k] * inv);
  }
}

// h^T of row tiles t_first.. (GEMM 1 and 3's B operand, [H, r]), packed once per call and shared
// by the tasks: tile t at out + (t - t_first) * R * H.
template <typename in_t, typename op_t>
std::vector<op_t> pack_transposed_tiles(const Problem<in_t>& p, int64_t R, int64_t t_first) {
  const int64_t tiles = (p.C + R - 1) / R;
  std::vector<op_t> out(std::max<int64_t>(tiles - t_first, 0) * R * p.H);
  at::parallel_for(t_first, std::max(tiles, t_first), 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * R;
      pack_rows_transposed<in_t, op_t>([&](int64_t i) { return p.hrow(c0 + i); }, std::min(R, p.C - c0), p.H,
                                       out.data() + (t - t_first) * R * p.H);
    }
  });
  return out;
}

// Per row (g, lse) for recompute_grad_tile: rows whose log-sum-exp is -inf (no finite logit)
// get g = 0 and lse = 0, so they contribute nothing (and never exp(-inf - -inf)).
inline std::pair<std::vector<float>, std::vector<float>> finite_rows(const float* lse, const float* grad_rows,
                                                                      int64_t C) {
  std::vector<float> g(C), lse_ref(C);
  for (int64_t c = 0; c < C; ++c) {
    const bool finite = lse[c] != -kInf;
    g[c] = finite ? grad_rows[c] : 0.0f;
    lse_ref[c] = finite ? lse[c] : 0.0f;
  }
  return {g, lse_ref};
}

// gb[j] += the sum of row j of the float32 tile x [vb, ld] (r live columns).
inline void add_row_sums(const float* x, int64_t ld, int64_t vb, int64_t r, float* gb) {
  for (int64_t j = 0; j < vb; ++j) {
    Vec acc(0.0f);
    lanes(r, [&](int64_t i0, int64_t n) { acc = acc + Vec::loadu(x + j * ld + i0, n); });
    alignas(64) float parts[Vec::size()];
    acc.store(parts);
    float sum = 0.0f;
    for (int64_t l = 0; l < Vec::size(); ++l) sum += parts[l];
    gb[j] += sum;
  }
}

// The weight gradient of one (vocabulary block v0..v0+vb, row tile c0..c0+r) on the recompute
// path: x^T = W_block . h^T (GEMM 3; hT is the tile packed by pack_rows_transposed), G^T = g *
// (onehot - exp(x - lse)) in the float32 tile xT [vb, ldx], gb [vb] += its row sums (gb null: no
// bias gradient) and gw [vb, H] += G^T h (GEMM 4, head_grad_tile; gw null: none). lse_ref, g
// and limit (exact_limits of g) are indexed by row: 0 for rows without a finite log-sum-exp,
// which then add nothing.
template <typename in_t, typename op_t>
void recompute_grad_tile(const Problem<in_t>& p, const op_t* W, int64_t lda, const op_t* hT, const op_t* hV,
                         int64_t v0, int64_t vb, int64_t c0, int64_t r, const float* lse_ref, const float* g,
                         const float* limit, float* xT, int64_t ldx, float* gb, float* gw, std::vector<op_t>& gA) {
  tile_gemm<op_t>(vb, r, p.H, W, lda, hT, r, xT, ldx, false);  // GEMM 3
  for (int64_t j = 0; j < vb; ++j) {
    float* x = xT + j * ldx;
    const Vec bj(p.bias.empty() ? 0.0f : p.bias[v0 + j]);
    lanes(r, [&](int64_t i0, int64_t n) {
      const Vec z = Vec::loadu(x + i0, n) + bj - Vec::loadu(lse_ref + c0 + i0, n);
      (z.exp_u20() * -Vec::loadu(g + c0 + i0, n)).store(x + i0, n);
    });
  }
  for (int64_t i = 0; i < r; ++i) {
    const int64_t y = p.label[c0 + i] - v0;
    if (y >= 0 && y < vb) xT[y * ldx + i] += g[c0 + i];
  }
  if (gb) add_row_sums(xT, ldx, vb, r, gb);
  if (gw) head_grad_tile<in_t, op_t>(p, xT, ldx, vb, r, v0, c0, limit + c0, hV, gw, gA);  // GEMM 4
}

// ---------------------------------------------------------------------------------------------
// Checks and dispatch.

inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& row_n, const at::Tensor& row_t, const at::Tensor& labels, int64_t row_tile,
                  int64_t vocab_tile) {
  CHECK_CPU(hidden);
  CHECK_CPU(weight);
  CHECK_DIM(hidden, 3);
  CHECK_DIM(weight, 2);
  CHECK_LAST_CONTIGUOUS(hidden);
  TORCH_CHECK(weight.stride(1) == 1, "weight must have a contiguous last dimension");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "hidden must be float32, bfloat16 or float16, got ", dt);
  CHECK_DTYPE(weight, dt);
  TORCH_CHECK(weight.size(1) == hidden.size(2) && weight.size(0) > 0 && weight.size(1) > 0,
              "weight must be [V, H] with H = hidden.size(2) = ", hidden.size(2), ", got ", weight.sizes());
  if (bias.has_value()) {
    CHECK_CPU((*bias));
    CHECK_DTYPE((*bias), dt);
    CHECK_SHAPE((*bias), weight.size(0));
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous");
  }
  const int64_t C = row_n.numel();
  for (const at::Tensor* x : {&row_n, &row_t, &labels}) {
    CHECK_CPU((*x));
    CHECK_DTYPE((*x), at::kLong);
    TORCH_CHECK(x->dim() == 1 && x->numel() == C && x->is_contiguous(),
                "row_n, row_t and labels must be contiguous [C] tensors of one length");
  }
  TORCH_CHECK(row_tile >= 1 && vocab_tile >= 1, "row_tile and vocab_tile must be >= 1, got ", row_tile, ", ",
              vocab_tile);
  const int64_t *n = row_n.data_ptr<int64_t>(), *t = row_t.data_ptr<int64_t>(), *y = labels.data_ptr<int64_t>();
  const int64_t N = hidden.size(0), T = hidden.size(1), V = weight.size(0);
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK(n[c] >= 0 && n[c] < N && t[c] >= 0 && t[c] < T, "row ", c, " (", n[c], ", ", t[c],
                ") is outside hidden's [", N, ", ", T, "]");
    TORCH_CHECK(y[c] >= 0 && y[c] < V, "label ", y[c], " of row ", c, " is outside [0, ", V, ")");
  }
}

inline bool use_bf16(const at::Tensor& hidden, bool half_operands) {
  return hidden.scalar_type() == at::kBFloat16 && half_operands && hidden.size(2) % 2 == 0 &&
         bf16_operands_available();
}

enum class Operands { f32, bf16, bf16_as_f32, f16_as_f32 };

inline Operands operands(const at::Tensor& hidden, bool half_operands) {
  switch (hidden.scalar_type()) {
    case at::kFloat:
      return Operands::f32;
    case at::kBFloat16:
      return use_bf16(hidden, half_operands) ? Operands::bf16 : Operands::bf16_as_f32;
    default:
      return Operands::f16_as_f32;
  }
}

// Run f(in_t{}, op_t{}) with the input and operand types of the operand path.
template <typename F>
void dispatch_operands(const at::Tensor& hidden, bool half_operands, F f) {
  switch (operands(hidden, half_operands)) {
    case Operands::f32: f(float{}, float{}); break;
    case Operands::bf16: f(at::BFloat16{}, at::BFloat16{}); break;
    case Operands::bf16_as_f32: f(at::BFloat16{}, float{}); break;
    case Operands::f16_as_f32: f(at::Half{}, float{}); break;
  }
}

}  // namespace fastdpo_linear
