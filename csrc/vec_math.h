// Vector math shared by the kernels of csrc/: exp on SIMD vectors, loading a block of a row in
// the math type, and the guard of the online log-sum-exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define FASTDPO_AVX512_PATH 1
#endif

namespace fastdpo {

// exp on a vector: the fast AVX variant (~1 ulp for our range) for float, exact scalar exp for double.
inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> vexp(const at::vec::Vectorized<double>& x) {
  return x.map([](double v) { return std::exp(v); });
}

// One vector of the math type from src (Vectorized<acc_t>::size() elements): a plain load when
// the types agree, else widened in registers (bfloat16 -> float32 is a zero-extend and a shift),
// so a 16-bit row never goes through a float32 copy in memory.
template <typename scalar_t, typename acc_t>
inline at::vec::Vectorized<acc_t> load_vec(const scalar_t* src) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return at::vec::Vectorized<acc_t>::loadu(src);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(src, out);
    return out;
  }
}

// Two vectors of the math type into dst (2 * Vectorized<acc_t>::size() elements), narrowed to
// scalar_t in registers (bfloat16 and float16: one packed store of both).
template <typename scalar_t, typename acc_t>
inline void store_two(scalar_t* dst, const at::vec::Vectorized<acc_t>& a, const at::vec::Vectorized<acc_t>& b) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    a.store(dst);
    b.store(dst + at::vec::Vectorized<acc_t>::size());
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(dst);
  }
}

// Horizontal reduction of one vector, lane by lane in a fixed order (deterministic).
template <typename acc_t, typename Op>
inline acc_t reduce_lanes(const at::vec::Vectorized<acc_t>& v, Op op) {
  alignas(64) acc_t lanes[at::vec::Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t r = lanes[0];
  for (int i = 1; i < at::vec::Vectorized<acc_t>::size(); ++i) r = op(r, lanes[i]);
  return r;
}

// What the online log-sum-exp subtracts before exponentiating: the running max, or 0 while the
// row is all -inf so far (a masked vocabulary block). Subtracting -inf itself would give
// exp(-inf - -inf) = NaN; subtracting 0 gives exp(-inf) = 0 for every term so far, the right sum.
template <typename acc_t>
inline acc_t exp_offset(acc_t running_max) {
  return running_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : running_max;
}

// --- The AVX-512 path of the log-prob kernels (logps_kernels.cpp) ---------------------------
//
// In an AVX-512 build the kernels use, besides at::vec, an exp for non-positive arguments built
// on vscalefps and a bfloat16 store that packs two float32 vectors with one permute, and stream
// large gradients past the cache. Everywhere else (AVX2 and default builds) they use at::vec
// alone: the generic path. FASTDPO_NATIVE_ISA=generic forces the generic path in an AVX-512
// build too (read once, at the first kernel call), so tests check both on one machine.

// Which kernels run, chosen once, at the first kernel call:
//   kGeneric     at::vec alone (what AVX2 and default builds run);
//   kAvx512      the AVX-512 path;
//   kAvx512Bf16  the AVX-512 path, bfloat16 gradients packed by vcvtne2ps2bf16 (AVX512-BF16).
// FASTDPO_NATIVE_ISA = auto (default: the best this build and CPU allow), avx512, avx512bf16 or
// generic picks one; asking for one the build or the CPU lacks is an error.
enum class Isa { kGeneric, kAvx512, kAvx512Bf16 };

inline Isa isa() {
  static const Isa chosen = [] {
    const char* env = std::getenv("FASTDPO_NATIVE_ISA");
    const char* name = env == nullptr || *env == 0 ? "auto" : env;
    const auto is = [&](const char* s) { return std::strcmp(name, s) == 0; };
    TORCH_CHECK_VALUE(is("auto") || is("avx512") || is("avx512bf16") || is("generic"),
                      "FASTDPO_NATIVE_ISA must be auto, avx512, avx512bf16 or generic, got '", name, "'");
    if (is("generic")) return Isa::kGeneric;
#ifdef FASTDPO_AVX512_PATH
    const bool bf16 = __builtin_cpu_supports("avx512bf16");
    TORCH_CHECK_VALUE(bf16 || !is("avx512bf16"), "FASTDPO_NATIVE_ISA=avx512bf16, but this CPU lacks AVX512-BF16");
    return is("avx512") || !bf16 ? Isa::kAvx512 : Isa::kAvx512Bf16;
#else
    TORCH_CHECK_VALUE(is("auto"), "FASTDPO_NATIVE_ISA=", name, ", but fastdpo._C was built without AVX-512");
    return Isa::kGeneric;
#endif
  }();
  return chosen;
}

inline bool avx512_path() { return isa() != Isa::kGeneric; }

// The statistics' sum e t clamps t = (x - m) log2 e below to this, so that a masked entry
// (t = -inf, e = 0) adds 0 rather than 0 * -inf; every t below it has e = 0 exactly anyway.
constexpr float kExp2Floor = -1500.f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

#ifdef FASTDPO_AVX512_PATH
// The exponent of exp(x - shift) in base 2; -inf for a masked x, NaN kept. x - shift is rounded
// first, so that x == shift gives t = 0 and e = 1 exactly (a one-hot row's entropy is then
// exactly 0), and t's error is relative to x - shift, not to shift. (The one fused multiply-add
// x log2 e - shift log2 e would save an instruction, but rounding shift log2 e errs by
// 4e-8 |shift| in t: at logits of 1e5 the backward's softmax was 0.3% off.)
inline at::vec::Vectorized<float> exp2_arg(const at::vec::Vectorized<float>& x, const at::vec::Vectorized<float>& shift) {
  return _mm512_mul_ps(_mm512_sub_ps(x, shift), _mm512_set1_ps(kLog2e));
}
inline at::vec::Vectorized<float> clamp_exp2_arg(const at::vec::Vectorized<float>& t) {
  return _mm512_max_ps(_mm512_set1_ps(kExp2Floor), t);  // NaN kept: vmaxps returns its second operand
}

// scale * 2^t: 2^t = 2^n * 2^f with n = round(t) (vrndscaleps), f = t - n in [-1/2, 1/2]
// (vreduceps, which gives f = 0 for t = -inf: then 2^n 2^f = 0 * 1 = 0 with no clamp), 2^f by
// a degree-5 polynomial (a minimax fit of relative error 2e-7 with float32 rounding, 10x below
// exp_u20's; its constant term is exactly 1, so 2^0 = 1) whose coefficients carry the scale,
// 2^n by vscalefps, which gives exactly 0 below 2^-149. 8 instructions; n and f both come
// straight from t, so they do not wait on each other.
struct Exp2 {
  __m512 c[6];
  explicit Exp2(float scale = 1.f) {
    static constexpr float kCoef[6] = {1.0f,
                                       0.6931470036506653f,
                                       0.24022242426872253f,
                                       0.05550733581185341f,
                                       0.009671512991189957f,
                                       0.001326472614891827f};
    for (int k = 0; k < 6; ++k) c[k] = _mm512_set1_ps(kCoef[k] * scale);
  }
  at::vec::Vectorized<float> operator()(const at::vec::Vectorized<float>& t) const {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(c[5], f, c[4]);
    p = _mm512_fmadd_ps(p, f, c[3]);
    p = _mm512_fmadd_ps(p, f, c[2]);
    p = _mm512_fmadd_ps(p, f, c[1]);
    p = _mm512_fmadd_ps(p, f, c[0]);
    return _mm512_scalef_ps(p, n);
  }
};

// 32 bfloat16 at p (one 64-byte load) as two float32 vectors, in two instructions where
// widening takes four: shifting each 32-bit lane left by 16 gives the even elements, clearing
// its low half the odd ones. For sums and maxima, which do not care about the order.
inline void load_bf16_pairs(const c10::BFloat16* p, at::vec::Vectorized<float>& even, at::vec::Vectorized<float>& odd) {
  const __m512i r = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// The largest of n bfloat16 at p (n a multiple of 64), -inf for n = 0, without widening them:
// bit patterns compared as signed 16-bit integers order the non-negative values as floats and
// the negative ones backwards (a larger magnitude is a larger integer), so the maximum is the
// integer max if that is non-negative, else the integer min. Two instructions per 32 values.
// A NaN (as a positive pattern, above +inf) may come out as the maximum, never a wrong finite one.
inline float bf16_max(const c10::BFloat16* p, int64_t n) {
  if (n == 0) return -std::numeric_limits<float>::infinity();
  __m512i hi0 = _mm512_set1_epi16(INT16_MIN), hi1 = hi0, lo0 = _mm512_set1_epi16(INT16_MAX), lo1 = lo0;
  for (int64_t i = 0; i < n; i += 64) {
    const __m512i a = _mm512_loadu_si512(p + i), b = _mm512_loadu_si512(p + i + 32);
    hi0 = _mm512_max_epi16(hi0, a), lo0 = _mm512_min_epi16(lo0, a);
    hi1 = _mm512_max_epi16(hi1, b), lo1 = _mm512_min_epi16(lo1, b);
  }
  // widen each 16-bit lane's value to a 32-bit lane (both halves), then reduce those
  const __m512i hi = _mm512_max_epi16(hi0, hi1), lo = _mm512_min_epi16(lo0, lo1);
  const int32_t top = _mm512_reduce_max_epi32(
      _mm512_max_epi32(_mm512_srai_epi32(hi, 16), _mm512_srai_epi32(_mm512_slli_epi32(hi, 16), 16)));
  const int32_t bits = top >= 0 ? top
                                : _mm512_reduce_min_epi32(_mm512_min_epi32(
                                      _mm512_srai_epi32(lo, 16), _mm512_srai_epi32(_mm512_slli_epi32(lo, 16), 16)));
  return c10::bit_cast<float>(static_cast<uint32_t>(static_cast<uint16_t>(bits)) << 16);
}

// max(a, b) in one instruction (at::vec::maximum adds two for NaN, which the kernels' sums
// carry anyway).
inline at::vec::Vectorized<float> max_fast(const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b) {
  return _mm512_max_ps(a, b);
}

// Round a float32 vector to bfloat16 bit patterns (in the high half of each 32-bit lane):
// round to nearest even; NaN stays a (quiet) NaN.
inline __m512i round_to_bf16_bits(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(x, _mm512_set1_epi32(0x00400000)));
}

// Two float32 vectors to 32 bfloat16 at dst: one permute picks the high halves of both.
template <bool kStream>
inline void store_two_bf16(c10::BFloat16* dst, __m512 a, __m512 b) {
  alignas(64) static constexpr uint16_t kHighHalves[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                           23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                           45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i idx = _mm512_load_si512(kHighHalves);
  const __m512i packed = _mm512_permutex2var_epi16(round_to_bf16_bits(a), idx, round_to_bf16_bits(b));
  if constexpr (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), packed);
  } else {
    _mm512_storeu_si512(dst, packed);
  }
}
#else
// Not compiled: the AVX-512 path is never chosen (avx512_path() is false); these only keep
// its instantiations compiling.
inline at::vec::Vectorized<float> exp2_arg(const at::vec::Vectorized<float>& x, const at::vec::Vectorized<float>& s) {
  return x - s;
}
inline at::vec::Vectorized<float> clamp_exp2_arg(const at::vec::Vectorized<float>& t) { return t; }
inline float bf16_max(const c10::BFloat16* p, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<float>(p[i]));
  return m;
}
inline void load_bf16_pairs(const c10::BFloat16* p, at::vec::Vectorized<float>& even, at::vec::Vectorized<float>& odd) {
  even = load_vec<c10::BFloat16, float>(p);
  odd = load_vec<c10::BFloat16, float>(p + at::vec::Vectorized<float>::size());
}
struct Exp2 {
  explicit Exp2(float = 1.f) {}
  at::vec::Vectorized<float> operator()(const at::vec::Vectorized<float>& t) const { return vexp(t); }
};
inline at::vec::Vectorized<float> max_fast(const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b) {
  return at::vec::maximum(a, b);
}
#endif

// Two float32 vectors to dst in scalar_t on the AVX-512 path: bfloat16 by the permute above,
// float32 as is, streamed (non-temporal, dst 64-byte aligned) if kStream; float16 as at::vec does.
template <bool kStream, typename scalar_t>
inline void store_two_avx512(scalar_t* dst, const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b) {
#ifdef FASTDPO_AVX512_PATH
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    store_two_bf16<kStream>(dst, a, b);
    return;
  } else if constexpr (std::is_same_v<scalar_t, float> && kStream) {
    _mm512_stream_ps(dst, a);
    _mm512_stream_ps(dst + 16, b);
    return;
  }
#endif
  store_two<scalar_t, float>(dst, a, b);
}

// Make streamed stores visible before the thread's task ends (they are weakly ordered).
inline void stream_fence() {
#ifdef FASTDPO_AVX512_PATH
  _mm_sfence();
#endif
}

}  // namespace fastdpo
