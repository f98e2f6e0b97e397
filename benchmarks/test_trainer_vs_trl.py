"""One DPO training step: fastdpo's DPOTrainer against TRL 1.16's DPOTrainer on CPU, side by side.

    pytest benchmarks/test_trainer_vs_trl.py --benchmark-only [--bench-size full]

Every trainer of ``trainer_steps.STEPS`` gets the same GPT-2 built from a config, the same frozen
reference model and the same pairs, float32, no gradient checkpointing, AdamW with clipping; the
sizes are ``trainer_steps.SETUPS[--bench-size]`` (``full``: 4 layers, hidden 256, vocabulary
32000, batches of 4 pairs of 256 tokens). The step time is timed here (median of rounds after
warm-up steps); the peak resident memory of the training steps above the loaded models
(``step_peak_bytes``) and the process's peak are measured in a fresh subprocess per trainer and
go into ``extra_info``. No timing asserts. ``python -m benchmarks.trainer_steps compare`` prints
the same side by side with the ratios. ``fastdpo_logits`` is fastdpo's trainer with
``fused_linear=False`` (the model's logits into DPOLoss), to show what the fused linear path saves.
"""

import pathlib

import pytest

from benchmarks.conftest import bench_size, timing
from benchmarks.trainer_steps import SETUPS, STEPS, make_assets, probe_in_subprocess

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, request):
    setup = SETUPS[bench_size(request.config)]
    return make_assets(pathlib.Path(tmp_path_factory.mktemp("trainer_bench")), setup), setup


@pytest.mark.parametrize("method", list(STEPS))
def test_training_step(benchmark, assets, method, tmp_path, request):
    directory, s = assets
    benchmark.group = (
        f"DPO training step, GPT-2 {s.n_layer}x{s.n_embd}, vocab {s.vocab}, "
        f"{s.batch} pairs x {s.max_length} tokens, float32 CPU"
    )
    memory = probe_in_subprocess(method, directory, rounds=0)
    benchmark.extra_info.update(method=method, **memory)
    step = STEPS[method](directory, str(tmp_path))
    # Two warm-up steps: the first creates AdamW's state, the second settles the allocator.
    benchmark.pedantic(step, iterations=1, **dict(timing(request.config), warmup_rounds=2))
