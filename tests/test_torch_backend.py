"""Specifics of the pure-PyTorch backend: chunking and memory behaviour."""

import torch
from helpers import ground_truth_grad, ground_truth_token_logps, make_inputs

from fastdpo import fused_logps
from fastdpo.backends import torch_chunked


def test_many_chunks_match_one_chunk(monkeypatch):
    logits, labels = make_inputs(3, 11, 37)
    x = logits.clone().requires_grad_(True)
    monkeypatch.setattr(torch_chunked, "CHUNK_BYTES", 4 * 37 * 3)  # 3 rows per chunk, a ragged last one
    out = fused_logps(x, labels, backend="torch")
    out.sequence_logps.sum().backward()
    exact = ground_truth_token_logps(logits, labels)
    torch.testing.assert_close(out.token_logps.double(), exact, atol=1e-5, rtol=0)
    grad = ground_truth_grad(logits, labels, torch.ones_like(exact))
    torch.testing.assert_close(x.grad.double(), grad, atol=1e-6, rtol=1e-5)


def test_inplace_backward_reuses_the_logits_storage():
    logits, labels = make_inputs(4, 6, 13)
    x = logits.clone().requires_grad_(True)
    fused_logps(x, labels, backend="torch").sequence_logps.sum().backward()
    expected = x.grad.clone()
    y = logits.clone()
    tok, lse, _, _ = torch_chunked.forward(y, labels, -100, True)
    grad = torch_chunked.backward(y, labels, lse, torch.ones_like(tok), -100, True, inplace=True)
    assert grad.data_ptr() == y.data_ptr()
    torch.testing.assert_close(grad, expected)
