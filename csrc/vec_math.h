// Vector math shared by the kernels of csrc/: exp on SIMD vectors, loading a block of a row in
// the math type, and the guard of the online log-sum-exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

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

}  // namespace fastdpo
