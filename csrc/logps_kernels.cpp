// Fused log-softmax gather kernels for the `native` backend (CPU); op schemas in ops.cpp.
//
//   fastdpo::logps_forward(logits, labels, ignore_index, shift)
//       -> (token_logps [N, T'], lse [N, T'], sequence_logps [N], logit_sums [N])
//   fastdpo::logps_backward(logits, labels, lse, grad_rows, ignore_index, shift) -> grad [N, T, V]
//   fastdpo::logps_backward_(logits!, labels, lse, grad_rows, ignore_index, shift)   (in place)
//
// Outputs are float32 (float64 for float64 logits, which only gradcheck uses).
//
// Semantics are the contract in fastdpo/backends/__init__.py. Each counted row is read once in
// the forward (blocks of kBlock elements: block max, then one exp per element against a running
// max, so the row is never read twice from memory) and read once + written once in the
// backward. Math is float32 (float64 for float64 input, used by gradcheck). Rows run in
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

#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "vec_math.h"

namespace {

using fastdpo::exp_offset;
using fastdpo::load_block;
using fastdpo::vexp;

constexpr int64_t kBlock = 2048;  // elements per block: 8 KB of float32, stays in L1
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

template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const Geometry& g,
                  at::Tensor& token_logps, at::Tensor& lse, at::Tensor& row_logit_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  acc_t* tok = token_logps.data_ptr<acc_t>();
  acc_t* lse_out = lse.data_ptr<acc_t>();
  acc_t* row_sum = row_logit_sums.data_ptr<acc_t>();
  at::parallel_for(0, g.N * g.Tout, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Tout, t = r % g.Tout;
      const int64_t y = lab[n * g.T + t + g.shift];
      if (y == ignore_index) {  // skipped: the row is never read
        tok[r] = 0;
        lse_out[r] = 0;
        row_sum[r] = 0;
        continue;
      }
      const scalar_t* row = base + n * g.s0 + t * g.s1;
      acc_t run_max = -std::numeric_limits<acc_t>::infinity(), run_sum = 0, logit_sum = 0;
      for (int64_t off = 0; off < g.V; off += kBlock) {
        const int64_t len = std::min(kBlock, g.V - off);
        const acc_t* x = load_block(row + off, buf, len);
        const acc_t block_max = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, len);
        logit_sum += at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, x, len);
        const acc_t new_max = std::max(run_max, block_max);
        const acc_t offset = exp_offset(new_max);  // 0 while every logit so far is -inf
        const Vec voffset(offset);
        const acc_t block_sum = at::vec::map_reduce_all<acc_t>(
            [&](Vec v) { return vexp(v - voffset); }, [](Vec a, Vec b) { return a + b; }, x, len);
        run_sum = run_sum * std::exp(run_max - offset) + block_sum;
        run_max = new_max;
      }
      const acc_t row_lse = run_max + std::log(run_sum);
      tok[r] = static_cast<acc_t>(row[y]) - row_lse;
      lse_out[r] = row_lse;
      row_sum[r] = logit_sum;
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                   const at::Tensor& grad_rows, int64_t ignore_index, const Geometry& g, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const scalar_t* in = logits.data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const int64_t o0 = grad.stride(0), o1 = grad.stride(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const acc_t* lse_in = lse.data_ptr<acc_t>();
  const acc_t* g_in = grad_rows.data_ptr<acc_t>();
  // Every logits row, including the last one under the shift, which scores nothing.
  at::parallel_for(0, g.N * g.T, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t xbuf[kBlock];
    alignas(64) acc_t gbuf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.T, t = r % g.T;
      scalar_t* dst = out + n * o0 + t * o1;
      const int64_t y = t < g.Tout ? lab[n * g.T + t + g.shift] : ignore_index;
      if (y == ignore_index) {  // zero gradient, the logits row is never read
        std::fill(dst, dst + g.V, scalar_t(0));
        continue;
      }
      const scalar_t* row = in + n * g.s0 + t * g.s1;
      const int64_t i = n * g.Tout + t;
      const acc_t gi = g_in[i];
      const Vec vlse(lse_in[i]), vneg_g(-gi);
      for (int64_t off = 0; off < g.V; off += kBlock) {
        const int64_t len = std::min(kBlock, g.V - off);
        const acc_t* x = load_block(row + off, xbuf, len);
        // g * (onehot - softmax); for float input written straight into the destination
        acc_t* o = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(dst + off) : gbuf;
        at::vec::map([&](Vec v) { return vexp(v - vlse) * vneg_g; }, o, x, len);
        if (y >= off && y < off + len) o[y - off] += gi;
        if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(gbuf, dst + off, len);
      }
    }
  });
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
    forward_rows<scalar_t>(logits, labels, ignore_index, g, token_logps, lse, row_logit_sums);
  });
  // Per-sequence sums in row order, in float64: deterministic and exact enough for any length.
  at::Tensor sequence_logps = token_logps.sum(1, false, at::kDouble).to(acc.dtype());
  at::Tensor logit_sums = row_logit_sums.sum(1, false, at::kDouble).to(acc.dtype());
  return {token_logps, lse, sequence_logps, logit_sums};
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
    backward_rows<scalar_t>(logits, labels, lse, grad_rows, ignore_index, g, grad);
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
    backward_rows<scalar_t>(logits, labels, lse, grad_rows, ignore_index, g, logits);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("logps_forward", &logps_forward);
  m.impl("logps_backward", &logps_backward);
  m.impl("logps_backward_", &logps_backward_inplace);
}
