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

// A block of a row in the math type: the row itself when the types agree, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// What the online log-sum-exp subtracts before exponentiating: the running max, or 0 while the
// row is all -inf so far (a masked vocabulary block). Subtracting -inf itself would give
// exp(-inf - -inf) = NaN; subtracting 0 gives exp(-inf) = 0 for every term so far, the right sum.
template <typename acc_t>
inline acc_t exp_offset(acc_t running_max) {
  return running_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : running_max;
}

}  // namespace fastdpo
