// Tile kernels for the fused linear path (fastdpo/backends/linear_tiles.py) on CPU; op schemas in ops.cpp.
//
// The fused linear path projects hidden states onto the LM head one float32 tile
// [rows, vocab block] at a time and never holds the full logits. These two ops do the
// element-wise work on one tile in a single sweep per row, while the tile is still in cache:
//
//   fastdpo::lse_fold_(tile!, running_max, running_sum) -> (new_max, new_sum, rescale, tile_logit_sum)
//       Folds the tile into each row's online log-sum-exp: new_max = max(running_max, max(tile)),
//       new_sum = running_sum * rescale + sum(exp(tile - new_max)) with rescale =
//       exp(running_max - new_max), and the row's logit sum over the tile (for the logits/*
//       metric). The tile is overwritten with exp(tile - new_max): the caller multiplies it into
//       the LM head to accumulate the softmax-weighted head rows (the hidden-state gradient).
//   fastdpo::softmax_grad_tile_(tile!, labels_local, lse, grad_rows) -> ()
//       Overwrites the tile with grad_rows * (onehot(label) - exp(tile - lse)), the gradient of
//       the rows' label log-probs with respect to the tile; labels_local outside [0, vocab
//       block) are not in this tile.
//
// Math is float32 (float64 for float64 tiles, which only gradcheck-style tests use). Rows run
// in parallel and each row's reductions are sequential in a fixed order, so results do not
// depend on the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "vec_math.h"

namespace {

using fastdpo::exp_offset;
using fastdpo::vexp;

constexpr int64_t kGrain = 8;  // rows per parallel task

void check_tile(const at::Tensor& tile) {
  CHECK_CPU(tile);
  CHECK_DIM(tile, 2);
  CHECK_LAST_CONTIGUOUS(tile);
  TORCH_CHECK(tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kDouble,
              "tile must be float32 (or float64), got ", tile.scalar_type());
}

void check_row_vector(const at::Tensor& x, const at::Tensor& tile, at::ScalarType dtype, const char* name) {
  CHECK_CPU(x);
  TORCH_CHECK(x.dim() == 1 && x.size(0) == tile.size(0), name, " must have shape [", tile.size(0), "], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

template <typename acc_t>
void fold_rows(at::Tensor& tile, const at::Tensor& running_max, const at::Tensor& running_sum, at::Tensor& new_max,
               at::Tensor& new_sum, at::Tensor& rescale, at::Tensor& logit_sum) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t rows = tile.size(0), cols = tile.size(1), stride = tile.stride(0);
  acc_t* base = tile.data_ptr<acc_t>();
  const acc_t* old_max = running_max.data_ptr<acc_t>();
  const acc_t* old_sum = running_sum.data_ptr<acc_t>();
  acc_t* out_max = new_max.data_ptr<acc_t>();
  acc_t* out_sum = new_sum.data_ptr<acc_t>();
  acc_t* out_scale = rescale.data_ptr<acc_t>();
  acc_t* out_logits = logit_sum.data_ptr<acc_t>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* x = base + r * stride;
      // Sweep 1: max and sum of the logits.
      const acc_t tile_max =
          at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, cols);
      out_logits[r] = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, x, cols);
      const acc_t m = std::max(old_max[r], tile_max);
      // 0 while the row is all -inf (its running max is then -inf and its running sum empty):
      // the scale is exp(-inf) = 0 and the tile becomes exp(-inf) = 0, never exp(-inf - -inf).
      const acc_t offset = exp_offset(m);
      const acc_t scale = std::exp(old_max[r] - offset);
      // Sweep 2 (the row is now in L1): exponentiate in place and sum.
      const Vec voffset(offset);
      at::vec::map([&](Vec v) { return vexp(v - voffset); }, x, x, cols);
      const acc_t exp_sum = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, x, cols);
      out_max[r] = m;
      out_sum[r] = old_sum[r] * scale + exp_sum;
      out_scale[r] = scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_fold(at::Tensor& tile, const at::Tensor& running_max,
                                                                    const at::Tensor& running_sum) {
  check_tile(tile);
  check_row_vector(running_max, tile, tile.scalar_type(), "running_max");
  check_row_vector(running_sum, tile, tile.scalar_type(), "running_sum");
  TORCH_CHECK(tile.size(1) > 0, "tile must have at least one column");
  at::Tensor new_max = at::empty_like(running_max), new_sum = at::empty_like(running_sum);
  at::Tensor rescale = at::empty_like(running_max), logit_sum = at::empty_like(running_max);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "lse_fold_", [&] {
    fold_rows<scalar_t>(tile, running_max, running_sum, new_max, new_sum, rescale, logit_sum);
  });
  return {new_max, new_sum, rescale, logit_sum};
}

template <typename acc_t>
void grad_rows(at::Tensor& tile, const at::Tensor& labels_local, const at::Tensor& lse, const at::Tensor& grad) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t rows = tile.size(0), cols = tile.size(1), stride = tile.stride(0);
  acc_t* base = tile.data_ptr<acc_t>();
  const int64_t* lab = labels_local.data_ptr<int64_t>();
  const acc_t* lse_in = lse.data_ptr<acc_t>();
  const acc_t* g_in = grad.data_ptr<acc_t>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* x = base + r * stride;
      const Vec vlse(lse_in[r]), vneg_g(-g_in[r]);
      at::vec::map([&](Vec v) { return vexp(v - vlse) * vneg_g; }, x, x, cols);
      const int64_t y = lab[r];
      if (y >= 0 && y < cols) x[y] += g_in[r];  // labels of other vocabulary blocks are not here
    }
  });
}

void softmax_grad_tile(at::Tensor& tile, const at::Tensor& labels_local, const at::Tensor& lse,
                       const at::Tensor& grad) {
  check_tile(tile);
  check_row_vector(labels_local, tile, at::kLong, "labels_local");
  check_row_vector(lse, tile, tile.scalar_type(), "lse");
  check_row_vector(grad, tile, tile.scalar_type(), "grad_rows");
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "softmax_grad_tile_",
                             [&] { grad_rows<scalar_t>(tile, labels_local, lse, grad); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("lse_fold_", &lse_fold);
  m.impl("softmax_grad_tile_", &softmax_grad_tile);
}
