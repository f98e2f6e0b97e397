// The fastdpo operator library: every op's schema, in one place. The CPU implementations are
// registered next to their kernels (logps_kernels.cpp, tile_kernels.cpp); fake (meta) kernels
// and autograd are added once in Python (fastdpo/backends/native.py).
//
//   logps_forward(logits, labels, ignore_index, shift) -> (token_logps, lse, sequence_logps, logit_sums)
//   logps_forward_statistics(...same) -> (...the same four, entropy, log_sum_sq_probs, is_top1, mean_logits)
//   logps_backward(logits, labels, lse, grad_rows, ignore_index, shift) -> grad
//   logps_backward_(logits!, ...) -> ()               the same, written into logits' storage
//   lse_fold_(tile!, running_max, running_sum) -> (new_max, new_sum, rescale, tile_logit_sum)
//   softmax_grad_tile_(tile!, labels_local, lse, grad_rows) -> ()
//   linear_forward / linear_weight_grad       the fused linear path's whole tiled loops (fused_linear.cpp)
//   linear_chunk_forward / linear_chunk_backward   its loss without recompute (fused_linear_chunk.cpp)
//   linear_bf16_operands() -> bool             does this CPU multiply bfloat16 tiles natively?
//
// Semantics: the backend contract in fastdpo/backends/__init__.py.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <vector>

#include "fused_linear.h"

TORCH_LIBRARY(fastdpo, m) {
  m.def("logps_forward(Tensor logits, Tensor labels, int ignore_index, bool shift) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logps_forward_statistics(Tensor logits, Tensor labels, int ignore_index, bool shift) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("logps_backward(Tensor logits, Tensor labels, Tensor lse, Tensor grad_rows, int ignore_index, bool shift) -> Tensor");
  m.def("logps_backward_(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor grad_rows, int ignore_index, bool shift) -> ()");
  m.def("lse_fold_(Tensor(a!) tile, Tensor running_max, Tensor running_sum) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("softmax_grad_tile_(Tensor(a!) tile, Tensor labels_local, Tensor lse, Tensor grad_rows) -> ()");
  m.def(
      "linear_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor row_n, Tensor row_t, Tensor labels, "
      "Tensor(a!)? hidden_grad, int row_tile, int vocab_tile, bool half_operands, bool statistics=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_weight_grad(Tensor hidden, Tensor weight, Tensor? bias, Tensor row_n, Tensor row_t, Tensor labels, "
      "Tensor lse, Tensor grad_rows, bool need_weight, bool need_bias, int row_tile, int vocab_tile, "
      "bool half_operands) -> (Tensor, Tensor)");
  m.def(
      "linear_chunk_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor row_n, Tensor row_t, Tensor labels, "
      "Tensor(a!) kept, Tensor(b!) block_max, Tensor(c!) grad_hidden, int row_tile, int vocab_tile, "
      "bool half_operands) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_chunk_backward(Tensor(a!) kept, Tensor block_max, Tensor lse, Tensor label_share, Tensor grad_rows, "
      "Tensor hidden, Tensor weight, Tensor? bias, Tensor row_n, Tensor row_t, Tensor labels, "
      "Tensor(b!) grad_hidden, Tensor(c!)? grad_weight, Tensor(d!)? grad_bias, int row_tile, int vocab_tile, "
      "bool half_operands) -> ()");
  // No tensor argument to dispatch on: the one op whose kernel is given with its schema.
  m.def("linear_bf16_operands() -> bool", [] { return fastdpo_linear::bf16_operands_available(); });
}

namespace {

// ADInplaceOrView kernel of the ops that write into an argument: bump the version counter of
// every argument the schema marks as written (Tensor(a!)), as PyTorch's own in-place ops do, so
// autograd notices when a tensor it saved has been overwritten. A second backward through
// in-place logits, or an earlier op that saved the logits, then raises instead of silently
// reading gradients as logits. (torch's autogradNotImplementedInplaceOrViewFallback only bumps
// mutable *outputs*; these ops return nothing or fresh tensors.)
void bump_written_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_arguments = schema.arguments().size();
  const size_t first = stack->size() - num_arguments;
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < num_arguments; ++i) {
    if (schema.is_mutable({c10::SchemaArgType::input, i})) written.push_back((*stack)[first + i].toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdpo, ADInplaceOrView, m) {
  for (const char* name : {"logps_backward_", "lse_fold_", "softmax_grad_tile_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_arguments>());
  }
}

// `import fastdpo._C` loads this library (and so registers the ops); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastdpo native kernels", -1, nullptr};
  return PyModule_Create(&module);
}
