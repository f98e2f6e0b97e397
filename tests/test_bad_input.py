"""Every public entry point x every available backend x each bad input: the error type, and a
one-line message that names the culprit (issue 13). Inputs are tiny so Triton's interpreter is quick.

Each row of ``BAD`` says which entry points it applies to; an entry point that takes no backend
(``preference_loss``), and the rows that replace the backend, run once (backend ``-``). Options
reach every entry point as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fastdpo
from fastdpo import DPOLoss, FusedLinearDPOLoss, preference_loss

BACKENDS = fastdpo.available_backends("cpu")
N, T, V, H = 4, 5, 7, 3  # 2 pairs


def valid_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(N, T, V, generator=gen),
        "labels": torch.randint(0, V, (N, T), generator=gen),
        "hidden": torch.randn(N, T, H, generator=gen),
        "weight": torch.randn(V, H, generator=gen),
        "bias": torch.randn(V, generator=gen),
        "logps": [-torch.rand(N // 2, generator=gen) for _ in range(4)],
        "counts": [torch.tensor([3, 4]), torch.tensor([2, 4])],
        "ref_logps": -torch.rand(N, generator=gen),
        "options": {},
    }


def _pairs(x, backend):
    counts = dict(chosen_counts=x["counts"][0], rejected_counts=x["counts"][1])
    return preference_loss(*x["logps"], **counts, **x["options"])


def _logits_module(x, backend):
    return DPOLoss(backend=backend, **x["options"])(x["logits"], x["labels"], ref_logps=x["ref_logps"])


def _linear_module(x, backend):
    loss = FusedLinearDPOLoss(backend=backend, **x["options"])
    return loss(x["hidden"], x["weight"], x["labels"], bias=x["bias"], ref_logps=x["ref_logps"])


def _logits(fn):
    return lambda x, backend: fn(x["logits"], x["labels"], backend=backend, **x["options"])


def _linear(fn):
    return lambda x, backend: fn(
        x["hidden"], x["weight"], x["labels"], bias=x["bias"], backend=backend, **x["options"]
    )


ENTRIES: dict[str, Callable] = {
    "token_logps": _logits(fastdpo.token_logps),
    "sequence_logps": _logits(fastdpo.sequence_logps),
    "fused_logps": _logits(fastdpo.fused_logps),
    "linear_token_logps": _linear(fastdpo.linear_token_logps),
    "linear_sequence_logps": _linear(fastdpo.linear_sequence_logps),
    "fused_linear_logps": _linear(fastdpo.fused_linear_logps),
    "preference_loss": _pairs,
    "DPOLoss": _logits_module,
    "FusedLinearDPOLoss": _linear_module,
}
LOGIT_FNS = ("token_logps", "sequence_logps", "fused_logps")
LINEAR_FNS = ("linear_token_logps", "linear_sequence_logps", "fused_linear_logps")
KERNEL_FNS = LOGIT_FNS + LINEAR_FNS
LOGITS = LOGIT_FNS + ("DPOLoss",)
LINEAR = LINEAR_FNS + ("FusedLinearDPOLoss",)
KERNELS = LOGITS + LINEAR
MODULES = ("DPOLoss", "FusedLinearDPOLoss")
LOSSES = ("preference_loss",) + MODULES


@dataclass(frozen=True)
class Bad:
    name: str
    entries: tuple[str, ...]
    change: Callable[[dict], None]  # turns valid inputs into the bad ones, in place
    error: type[Exception]
    match: str  # the culprit, as the message must name it
    backend: object = None  # passed instead of each available backend (the row then runs once)


def _set(**values):
    return lambda x: x.update(values)


def _map(name, fn):
    return lambda x: x.update({name: fn(x[name])})


def _option(**values):
    return lambda x: x["options"].update(values)


def _label(value):
    return lambda x: x["labels"].__setitem__((slice(None), 2), value)


def _logp(position, value):
    return lambda x: x["logps"].__setitem__(position, value)


def _positions(t):
    def change(x):
        for name in ("logits", "labels", "hidden"):
            x[name] = x[name][:, :t]

    return change


def _batch(rows):
    def change(x):
        for name in ("logits", "labels", "hidden", "ref_logps"):
            x[name] = x[name][:rows]
        x["logps"] = [p[: rows // 2] for p in x["logps"]]
        x["counts"] = [c[: rows // 2] for c in x["counts"]]

    return change


def _meta(t):
    return t.to("meta")


def _shorter(t):
    return t[..., :-1]


NAN, INF = float("nan"), float("inf")
NOT_INT = "ignore_index must be an int"
SEQUENCE_FNS = ("sequence_logps", "linear_sequence_logps")
FUSED_FNS = ("fused_logps", "fused_linear_logps")
PAIRS = ("preference_loss",)
FUSED_LOSS = ("FusedLinearDPOLoss",)
BUDGET_NUMBER = "memory_budget_mib must be a real number"
BUDGET_FINITE = "memory_budget_mib must be a finite number"
BAD = [
    # dtypes
    Bad("float64 logits", LOGITS, _map("logits", torch.Tensor.double), TypeError, "logits must be float32"),
    Bad("integer logits", LOGITS, _map("logits", torch.Tensor.long), TypeError, "logits must be float32"),
    Bad("float64 hidden", LINEAR, _map("hidden", torch.Tensor.double), TypeError, "hidden must be float32"),
    Bad("bfloat16 weight", LINEAR, _map("weight", torch.Tensor.bfloat16), TypeError, "share one dtype"),
    Bad("float labels", KERNELS, _map("labels", torch.Tensor.float), TypeError, "labels must be an integer"),
    Bad("bool labels", KERNELS, _map("labels", torch.Tensor.bool), TypeError, "labels must be an integer"),
    Bad("logits as a list", LOGITS, _map("logits", torch.Tensor.tolist), TypeError, "logits must be a torch"),
    Bad("hidden as a list", LINEAR, _map("hidden", torch.Tensor.tolist), TypeError, "hidden must be a torch"),
    Bad("labels as a list", KERNELS, _map("labels", torch.Tensor.tolist), TypeError, "labels must be a"),
    Bad("integer ref_logps", MODULES, _map("ref_logps", torch.Tensor.long), TypeError, "ref_logps must hold"),
    Bad("integer ref logps", PAIRS, _logp(2, torch.zeros(2).long()), TypeError, "ref_chosen_logps must be"),
    # shapes
    Bad("logits [N, V]", LOGITS, _map("logits", lambda t: t[:, 0]), ValueError, r"logits must be \[N, T, V"),
    Bad("labels shape", KERNELS, _map("labels", _shorter), ValueError, "labels shape"),
    Bad("weight [V, H-1]", LINEAR, _map("weight", _shorter), ValueError, r"weight must be \[V, H"),
    Bad("bias [V-1]", LINEAR, _map("bias", _shorter), ValueError, r"bias must be \[V\]"),
    Bad("strided vocab dim", LOGITS, _set(logits=torch.randn(N, V, T).mT), ValueError, "contiguous last"),
    Bad("T = 1", KERNELS, _positions(1), ValueError, r"shift=True needs sequences of at least 2 positions"),
    Bad("odd batch", MODULES, _batch(3), ValueError, r"(policy_logits|hidden) must hold chosen rows then"),
    Bad("empty batch", MODULES, _batch(0), ValueError, r"(policy_logits|hidden) is an empty batch"),
    Bad("empty batch", PAIRS, _batch(0), ValueError, "empty batch: the log-prob tensors"),
    Bad("counts [B, 1]", PAIRS, _set(counts=[torch.ones(2, 1)] * 2), ValueError, "chosen_counts"),
    Bad("ref_logps [2B-1]", MODULES, _map("ref_logps", _shorter), ValueError, r"ref_logps must be \[2B"),
    Bad("ref logps [B, 1]", PAIRS, _logp(3, torch.zeros(2, 1)), ValueError, "ref_rejected_logps must be"),
    # values and devices
    Bad("label V", KERNELS, _label(V), ValueError, rf"label {V} is outside \[0, {V}\)"),
    Bad("label -1", KERNELS, _label(-1), ValueError, "label -1 is outside"),
    Bad("labels on meta", KERNELS, _map("labels", _meta), ValueError, "labels are on meta"),
    Bad("weight on meta", LINEAR, _map("weight", _meta), ValueError, "weight is a meta tensor"),
    Bad("logits on meta", LOGIT_FNS, _map("logits", _meta), ValueError, "logits is a meta tensor"),
    Bad("hidden on meta", LINEAR_FNS, _map("hidden", _meta), ValueError, "hidden is a meta tensor"),
    Bad("ref_logps on meta", MODULES, _map("ref_logps", _meta), ValueError, "ref_logps is on meta"),
    Bad("ref on meta", PAIRS, _logp(2, _meta(torch.zeros(2))), ValueError, "ref_chosen_logps is on meta"),
    # options
    Bad("unknown backend", KERNELS, lambda x: None, ValueError, "unknown backend 'nope'", backend="nope"),
    Bad("backend 1", KERNELS, lambda x: None, TypeError, "backend must be a backend name", backend=1),
    Bad("ignore_index '-100'", KERNEL_FNS, _option(ignore_index="-100"), TypeError, NOT_INT),
    Bad("ignore_index 'x'", KERNEL_FNS, _option(ignore_index="x"), TypeError, NOT_INT),
    Bad("ignore_index 1.5", KERNEL_FNS, _option(ignore_index=1.5), TypeError, NOT_INT),
    Bad("ignore_index True", KERNEL_FNS, _option(ignore_index=True), TypeError, NOT_INT),
    Bad("ignore_index 2**70", KERNEL_FNS, _option(ignore_index=2**70), ValueError, "ignore_index must fit"),
    Bad("shift 'no'", KERNEL_FNS, _option(shift="no"), TypeError, "shift must be True or False"),
    Bad("shift 1", KERNEL_FNS, _option(shift=1), TypeError, "shift must be True or False"),
    Bad("average 'no'", SEQUENCE_FNS, _option(average="no"), TypeError, "average must be True or False"),
    Bad(
        "inplace 'no'",
        ("fused_logps", "DPOLoss"),
        _option(inplace_backward="no"),
        TypeError,
        "inplace_backward",
    ),
    Bad("row_tile '8'", ("fused_linear_logps",), _option(row_tile="8"), TypeError, "row_tile must be an int"),
    Bad("statistics 'yes'", FUSED_FNS, _option(statistics="yes"), TypeError, "statistics must be True"),
    Bad("unknown loss_type", LOSSES, _option(loss_type="dpo"), ValueError, "unknown loss_type 'dpo'"),
    Bad("beta str", LOSSES, _option(beta="0.1"), TypeError, "beta"),
    Bad("beta inf", LOSSES, _option(beta=INF), ValueError, "beta"),
    Bad("beta nan", LOSSES, _option(beta=NAN), ValueError, "beta"),
    Bad("NaN loss_weights", LOSSES, _option(loss_weights=[NAN]), ValueError, r"loss_weights\[0\]"),
    Bad("ignore_index str", MODULES, _option(ignore_index="-100"), TypeError, "ignore_index"),
    # FusedLinearDPOLoss(memory_budget_mib=...): MiB of softmax tiles kept for the backward; 0 keeps none
    Bad("budget -1", FUSED_LOSS, _option(memory_budget_mib=-1), ValueError, "memory_budget_mib must be >= 0"),
    Bad("budget '64'", FUSED_LOSS, _option(memory_budget_mib="64"), TypeError, BUDGET_NUMBER),
    Bad("budget True", FUSED_LOSS, _option(memory_budget_mib=True), TypeError, BUDGET_NUMBER),
    Bad("budget nan", FUSED_LOSS, _option(memory_budget_mib=NAN), ValueError, BUDGET_FINITE),
    Bad("budget inf", FUSED_LOSS, _option(memory_budget_mib=INF), ValueError, BUDGET_FINITE),
    # token-level options (issue 16)
    Bad("ld_alpha 1.5", MODULES, _option(ld_alpha=1.5), ValueError, r"ld_alpha must be in \[0, 1\]"),
    Bad("ld_alpha nan", MODULES, _option(ld_alpha=NAN), ValueError, r"ld_alpha must be in \[0, 1\]"),
    Bad("ld_alpha '0.5'", MODULES, _option(ld_alpha="0.5"), TypeError, "ld_alpha must be None or a number"),
    Bad("ld_alpha True", MODULES, _option(ld_alpha=True), TypeError, "ld_alpha must be None or a number"),
    Bad(
        "use_weighting 1", MODULES, _option(use_weighting=1), TypeError, "use_weighting must be True or False"
    ),
    Bad(
        "use_weighting aot",
        MODULES,
        _option(use_weighting=True, loss_type="aot"),
        ValueError,
        "use_weighting",
    ),
    Bad("token_metrics 'y'", MODULES, _option(token_metrics="y"), TypeError, "token_metrics must be True or"),
    Bad(
        "sft logps int", PAIRS, _option(sft_chosen_logps=torch.zeros(2).long()), TypeError, "sft_chosen_logps"
    ),
]


def _cases():
    for bad in BAD:
        for entry in bad.entries:
            once = entry == "preference_loss" or bad.backend is not None
            for backend in ["-"] if once else BACKENDS:
                yield pytest.param(entry, bad, backend, id=f"{entry}-{bad.name}-{backend}")


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_inputs_run(entry, backend):
    """The table's starting point is legal input, so each error below comes from its one change."""
    ENTRIES[entry](valid_inputs(), backend)


@pytest.mark.parametrize("entry, bad, backend", list(_cases()))
def test_bad_input_raises_a_one_line_error_naming_the_culprit(entry, bad, backend):
    x = valid_inputs()
    bad.change(x)
    with pytest.raises(bad.error, match=bad.match) as caught:
        ENTRIES[entry](x, backend if bad.backend is None else bad.backend)
    assert "\n" not in str(caught.value)
