"""Specifics of the triton backend: block heuristics, many-block online log-sum-exp, 64-bit
offsets, ignored rows never read, in-place backward, op registration and torch.compile.

Without a GPU these run through Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); the 64-bit and vectorisation checks compile the
real kernels for an sm_80 target in a subprocess without the interpreter (no GPU needed).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from helpers import (
    GRAD_TOL,
    LOGP_ATOL,
    assert_close_verbose,
    ground_truth_grad,
    ground_truth_token_logps,
    make_inputs,
)
from test_parity import _check_forward_and_grad

from fastdpo import available_backends, fused_logps, sequence_logps
from fastdpo.backends import common, resolve_backend
from fastdpo.backends import triton_kernels as tk

tk.load()
ops = torch.ops.fastdpo
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not tk.INTERPRETED,
    reason="these tests run the kernels on CPU tensors through Triton's interpreter: set TRITON_INTERPRET=1 "
    "before triton is imported (tests/conftest.py does when there is no GPU)",
)


@pytest.mark.parametrize(
    "vocab, block, warps",
    [
        (1, 16, 1),
        (7, 16, 1),
        (17, 32, 1),
        (1000, 1024, 2),
        (4096, 4096, 8),
        (4099, 4096, 8),
        (128256, 4096, 8),
    ],
)
def test_launch_config(vocab, block, warps):
    assert common.launch_config(vocab) == (block, warps)


def test_launch_config_rejects_empty_vocabulary():
    with pytest.raises(ValueError, match="non-empty"):
        common.launch_config(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 1000), (2, 3, 4099)], ids=str)
def test_many_blocks_with_a_growing_max(monkeypatch, dtype, shape):
    """Blocks of 64: the running max grows block after block (a ramp), so every rescale of the
    running sum is exercised, and the last block is partial."""
    monkeypatch.setattr(common, "MAX_BLOCK_V", 64)
    assert common.launch_config(shape[-1])[0] == 64
    logits, labels = make_inputs(*shape, torch.float32)
    ramp = torch.linspace(0, 12, shape[-1])
    _check_forward_and_grad("triton", (logits + ramp).to(dtype), labels)


@triton.jit
def _offsets_kernel(n_ptr, t_ptr, out_ptr, stride_n, stride_t, WIDEN: tl.constexpr):
    i = tl.program_id(0)
    n = tl.load(n_ptr + i)  # int32, like a program id
    t = tl.load(t_ptr + i)
    if WIDEN:
        offset = tk._row_offset(n, t, stride_n, stride_t)
    else:
        offset = (n * stride_n + t * stride_t).to(tl.int64)
    tl.store(out_ptr + i, offset)


def test_row_offset_arithmetic_is_64_bit():
    """Offsets past 2**31 elements (a [16, 4096, 128256] tensor has 8.4e9) without allocating
    them: the kernels' offset helper against exact integers, and, to show the check can fail,
    the same arithmetic in int32 wrapping around."""
    n = torch.tensor([0, 1, 15, 16383], dtype=torch.int32)
    t = torch.tensor([5, 4095, 4095, 1], dtype=torch.int32)
    stride_t = 128256
    stride_n = 4096 * stride_t // 8  # < 2**31, so it is passed as a 32-bit integer
    assert stride_n < 2**31
    exact = [int(a) * stride_n + int(b) * stride_t for a, b in zip(n, t)]
    assert max(exact) > 2**32
    out = torch.empty(4, dtype=torch.int64)
    _offsets_kernel[(4,)](n, t, out, stride_n, stride_t, WIDEN=True)
    assert out.tolist() == exact
    if tk.INTERPRETED:  # the interpreter does int32 arithmetic like the GPU: it wraps
        _offsets_kernel[(4,)](n, t, out, stride_n, stride_t, WIDEN=False)
        assert out.tolist() != exact


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastdpo.backends import triton_kernels as tk

    def compile_kernel(fn, dtype, names, grad_dtype=None):
        # the plain forward: its STATISTICS flag off (tests/test_statistics.py compiles it on)
        constexprs = {k: v for k, v in {"SHIFT": 1, "BLOCK_V": 4096, "STATISTICS": 0}.items() if k in names}
        signature = {}
        for name in names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("logits_ptr", "grad_ptr"):
                signature[name] = "*" + dtype
            elif name == "labels_ptr":
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32"
            else:
                signature[name] = "i32"  # the worst case for overflow: every integer in 32 bits
        # what Triton's launcher specialises at run time for aligned rows and strides
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                   if name.endswith("_ptr") or "stride" in name or name == "V"}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
        kernel = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"num_warps": 8})
        ttir, ptx = kernel.asm["ttir"], kernel.asm["ptx"]
        strides = [l for l in ttir.splitlines() if re.search(r"%(grad_)?stride_[nt][ ,)]", l) and "tt.func" not in l]
        addptrs = [l for l in ttir.splitlines() if re.search(r"tt.addptr %(logits|grad)_ptr,", l)]
        return dict(strides=strides, addptrs=addptrs, loads=sorted(set(re.findall(r"ld\\.global[.\\w]*", ptx))),
                    stores=sorted(set(re.findall(r"st\\.global[.\\w]*", ptx))))

    names = lambda fn: list(fn.arg_names)
    out = {}
    for dtype in ("fp32", "bf16", "fp16"):
        out["forward-" + dtype] = compile_kernel(tk._forward_kernel, dtype, names(tk._forward_kernel))
        out["backward-" + dtype] = compile_kernel(tk._backward_kernel, dtype, names(tk._backward_kernel))
    print(json.dumps(out))
    """
)


def _without_interpreter(script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_compiled_kernels_use_64_bit_offsets_and_128_bit_loads():
    """The real kernels, compiled for sm_80 (no GPU needed): every stride is widened to i64 before
    any arithmetic, every pointer into the logits/gradient moves by an i64 offset, and rows are
    read and written with 128-bit vector instructions."""
    result = _without_interpreter(_COMPILE_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = json.loads(result.stdout.strip().splitlines()[-1])
    for name, k in kernels.items():
        assert k["strides"], name
        for line in k["strides"]:
            assert "arith.extsi" in line and "i32 to i64" in line, (name, line)
        assert k["addptrs"], name
        for line in k["addptrs"]:
            assert line.split(" loc(")[0].endswith("i64"), (name, line)
        assert any(".v4." in op for op in k["loads"]), (name, k["loads"])
    for dtype in ("fp32", "bf16", "fp16"):
        stores = kernels[f"backward-{dtype}"]["stores"]
        assert any(".v4." in op or ".v2." in op for op in stores), (dtype, stores)


_TRACE_SCRIPT = textwrap.dedent(
    """
    import torch
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fastdpo.backends import triton_kernels as tk

    assert not tk.INTERPRETED
    tk.define_ops()  # what importing the module does on a machine with CUDA
    ops = torch.ops.fastdpo

    def step(x, y):
        _tok, lse, seq, _sums = ops.triton_logps_forward(x, y, -100, True)
        return seq, ops.triton_logps_backward(x, y, lse, torch.ones_like(lse), -100, True)

    class Captured(Exception):
        pass

    def capture(graph_module, _inputs):
        print(graph_module.code)
        raise Captured  # the graph is all we want: there is no GPU to run it on

    with FakeTensorMode():  # fake CUDA tensors need no GPU
        x = torch.empty(2, 5, 7, device="cuda", dtype=torch.bfloat16)
        y = torch.zeros(2, 5, device="cuda", dtype=torch.long)
        try:
            aot_function(step, fw_compiler=capture)(x, y)
        except Captured:
            pass
    """
)


def test_triton_op_path_decomposes_into_the_kernels_for_the_compiler():
    """Without the interpreter (the GPU path) the ops are triton_ops: AOTAutograd, which
    torch.compile runs before Inductor, sees the two Triton kernel launches themselves, with the
    grids and block sizes of the heuristics, not an opaque op. Traced on fake CUDA tensors."""
    result = _without_interpreter(_TRACE_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    graph = result.stdout
    assert "fastdpo.triton_logps" not in graph
    assert graph.count("triton_kernel_wrapper_functional(") == 2
    assert "grid = [(8, 1, 1)]" in graph and "'row_sum_ptr'" in graph  # forward: N * T' programs
    assert "grid = [(10, 1, 1)]" in graph and "'grad_rows_ptr'" in graph  # backward: N * T rows x 1 block
    assert "'BLOCK_V': 16" in graph


def test_available_only_on_cuda_without_the_interpreter():
    script = textwrap.dedent(
        """
        import torch
        from fastdpo import available_backends, sequence_logps
        from fastdpo.backends import get_backend
        backend = get_backend("triton")
        print(backend is not None, "triton" in available_backends("cpu"), backend.supports(torch.device("cuda")))
        try:
            sequence_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), backend="triton")
        except ValueError as exc:
            print(exc)
        """
    )
    result = _without_interpreter(script)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "True False True"
    assert "does not run on cpu tensors" in lines[1] and "falls back to 'torch'" in lines[1]


def test_available_under_the_interpreter_and_picked_by_auto_for_cuda():
    assert "triton" in available_backends("cpu")
    assert resolve_backend("auto", torch.device("cuda")).name == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ignored_rows_full_of_nan_are_never_read(dtype):
    logits, labels = make_inputs(3, 8, 300, dtype, ignore_frac=0.5)
    target = labels[:, 1:]
    logits[:, :-1][target == -100] = float("nan")
    logits[:, -1] = float("nan")  # scores nothing under the shift
    x = logits.clone().requires_grad_(True)
    out = fused_logps(x, labels, backend="triton")
    assert torch.isfinite(out.token_logps).all() and torch.isfinite(out.logit_sums).all()
    (out.sequence_logps.sum() + out.token_logps.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, :-1][target == -100] == 0).all() and (x.grad[:, -1] == 0).all()
    # in place, the NaN rows are overwritten with zeros (written, not read)
    _, lse, _, _ = tk.forward(logits, labels, -100, True)
    grad = tk.backward(logits, labels, lse, torch.ones_like(lse), -100, True, inplace=True)
    assert grad.data_ptr() == logits.data_ptr() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inplace_backward_matches_and_reuses_storage(dtype):
    logits, labels = make_inputs(4, 9, 131, dtype)
    x = logits.clone().requires_grad_(True)
    fused_logps(x, labels, backend="triton").sequence_logps.sum().backward()
    y = logits.clone()
    tok, lse, _, _ = tk.forward(y, labels, -100, True)
    grad = tk.backward(y, labels, lse, torch.ones_like(tok), -100, True, inplace=True)
    assert grad.data_ptr() == y.data_ptr()
    assert torch.equal(grad, x.grad)


def test_inplace_backward_on_a_strided_view_writes_only_the_view():
    base, _ = make_inputs(2, 10, 40, torch.bfloat16)
    view = base[:, ::2, :33]
    _, labels = make_inputs(2, 5, 33, seed=3)
    before = base.clone()
    tok, lse, _, _ = tk.forward(view, labels, -100, True)
    w = torch.randn(tok.shape, generator=torch.Generator().manual_seed(4))
    tk.backward(view, labels, lse, w, -100, True, inplace=True)
    expected = ground_truth_grad(before[:, ::2, :33], labels, w)
    rtol, atol = GRAD_TOL[torch.bfloat16]
    assert_close_verbose(base[:, ::2, :33], expected, atol=atol, rtol=rtol, what="grad in place")
    untouched = torch.ones(base.shape, dtype=torch.bool)
    untouched[:, ::2, :33] = False
    assert torch.equal(base[untouched], before[untouched])


def test_out_of_range_label_at_op_level_gives_nan_not_an_out_of_bounds_read():
    """The public API rejects such labels; the op itself must still not read outside the row."""
    logits, labels = make_inputs(2, 4, 9)
    labels[0, 2], labels[1, 3] = 9, -5
    tok, _, _, _ = ops.triton_logps_forward(logits, labels, -100, True)
    assert tok[0, 1].isnan() and tok[1, 2].isnan() and torch.isfinite(tok[0, 0])


def test_results_are_bitwise_reproducible():
    logits, labels = make_inputs(4, 17, 777, torch.bfloat16)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        out = fused_logps(x, labels, backend="triton")
        (out.sequence_logps.sum() + out.token_logps.sum()).backward()
        runs.append((out.token_logps, out.sequence_logps, out.logit_sums, x.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shift", [True, False])
def test_opcheck_forward(dtype, shift):
    logits, labels = make_inputs(3, 6, 37, dtype)
    torch.library.opcheck(ops.triton_logps_forward, (logits, labels, -100, shift))
    if dtype == torch.float32:  # also through the registered autograd
        x = logits.clone().requires_grad_(True)
        torch.library.opcheck(ops.triton_logps_forward, (x, labels, -100, shift))


def test_opcheck_backward_ops():
    logits, labels = make_inputs(3, 6, 37)
    _, lse, _, _ = ops.triton_logps_forward(logits, labels, -100, True)
    grad_rows = torch.randn(lse.shape)
    torch.library.opcheck(ops.triton_logps_backward, (logits, labels, lse, grad_rows, -100, True))
    torch.library.opcheck(ops.triton_logps_backward_, (logits.clone(), labels, lse, grad_rows, -100, True))


def test_torch_compile_with_the_op_in_one_graph():
    """fullgraph: the op (with its autograd) traces without a graph break, forward and backward."""
    logits, labels = make_inputs(2, 7, 19)

    def loss(x, y):
        _tok, _lse, seq, sums = ops.triton_logps_forward(x, y, -100, True)
        return (seq * 2 + sums.mean()).sum()

    x_compiled, x_eager = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    compiled = torch.compile(loss, fullgraph=True)
    compiled(x_compiled, labels).backward()
    eager = loss(x_eager, labels)
    eager.backward()
    torch.testing.assert_close(compiled(logits, labels), eager.detach())
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_torch_compile_of_sequence_logps():
    logits, labels = make_inputs(2, 7, 19, torch.bfloat16)
    compiled = torch.compile(lambda x, y: sequence_logps(x, y, backend="triton"))
    exact = ground_truth_token_logps(logits, labels).sum(-1)
    assert_close_verbose(compiled(logits, labels), exact, atol=LOGP_ATOL[torch.bfloat16] * 7, what="seq")
