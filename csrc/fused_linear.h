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
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
  return static_cast<to_t>(static_cast<float>(x));
}

// N is cut into panels so that the K x N panel of B a brgemm call streams stays in L2.
constexpr int64_t kGemmPanel = 256;

// C[M, N] (+)= A[M, K] B[K, N]; B in the operand layout with row length ldb (columns).
template <typename op_t>
void tile_gemm(int64_t M, int64_t N, int64_t K, const op_t* A, int64_t lda, const op_t* B, int64_t ldb, float* C,
               int64_t ldc, bool add) {
  for (int64_t n0 = 0; n0 < N; n0 += kGemmPanel) {
    const int64_t nb = std::min(kGemmPanel, N - n0);
    const op_t* panel = B + (kVnni<op_t> ? 2 * n0 : n0);
    at::native::cpublas::brgemm(M, nb, K, lda, ldb, ldc, add, A, panel, C + n0, kVnni<op_t>);
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

// A float32 row as the sum of two operand rows, hi = round(x) and lo = round(x - hi): a
// bfloat16 pair carries 16 significant bits, so products of the pair with bfloat16 operands
// lose ~2^-17 relatively instead of 2^-9 (the difference between float32 and bfloat16 gradient
// tiles). `tmp` holds n floats.
inline void split_hi_lo(const float* x, int64_t n, at::BFloat16* hi, at::BFloat16* lo, float* tmp) {
  at::vec::convert(x, hi, n);
  at::vec::convert(hi, tmp, n);
  for (int64_t k = 0; k < n; ++k) tmp[k] = x[k] - tmp[k];
  at::vec::convert(tmp, lo, n);
}

// A = x^T in the operand type: out[i][j] = x[j][i] for a float x [rows_x][ldx], i < cols,
// j < rows_x; columns rows_x..lda of out are zero (K padding).
template <typename op_t>
void transpose_to(const float* x, int64_t rows_x, int64_t ldx, int64_t cols, op_t* out, int64_t lda) {
  constexpr int64_t B = 16;
  for (int64_t j0 = 0; j0 < rows_x; j0 += B) {
    const int64_t j1 = std::min(rows_x, j0 + B);
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = j0; j < j1; ++j) out[i * lda + j] = cast<op_t>(x[j * ldx + i]);
  }
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = rows_x; j < lda; ++j) out[i * lda + j] = op_t(0.0f);
}

}  // namespace fastdpo_linear
