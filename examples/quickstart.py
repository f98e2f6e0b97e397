"""Compute a DPO loss on generated logits with every backend this machine has, and check them
against the plain reference. Runs in seconds on a CPU; no download."""

import time

import torch

import fastdpo
from fastdpo.naive import naive_sequence_logps


def main() -> None:
    torch.manual_seed(0)
    pairs, seq_len, vocab = 2, 256, 32000
    labels = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels[:, :64] = -100  # prompt tokens are not scored
    policy_logits = torch.randn(2 * pairs, seq_len, vocab)
    ref_logits = policy_logits + 0.1 * torch.randn_like(policy_logits)

    print(f"logits [{2 * pairs}, {seq_len}, {vocab}] float32; backends here: {fastdpo.available_backends()}")
    exact = naive_sequence_logps(policy_logits, labels)
    for backend in fastdpo.available_backends():
        logits = policy_logits.clone().requires_grad_(True)
        start = time.perf_counter()
        out = fastdpo.DPOLoss(beta=0.1, backend=backend)(logits, labels, ref_logits)
        out.loss.backward()
        seconds = time.perf_counter() - start
        logps = torch.cat([out.policy_chosen_logps, out.policy_rejected_logps])
        error = (logps - exact).abs().max().item()
        print(
            f"  {backend:7s} loss {out.loss.item():.6f}  max |logp - reference| {error:.2e}  fwd+bwd {seconds:.2f}s"
        )
    print("metrics:", {k: round(v, 4) for k, v in out.metrics().items()})


if __name__ == "__main__":
    main()
