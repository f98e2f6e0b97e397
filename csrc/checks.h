// Argument checks shared by the kernels of csrc/: every entry point checks before it touches data_ptr.
#pragma once

#include <ATen/ATen.h>

#define CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must have " #d " dimensions, got ", (x).dim())
#define CHECK_LAST_CONTIGUOUS(x) \
  TORCH_CHECK((x).size(-1) <= 1 || (x).stride(-1) == 1, #x " must have a contiguous last dimension")
#define CHECK_SHAPE(x, ...) \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), #x " must be ", (t), ", got ", (x).scalar_type())
