"""One DPO training step: fastdpo's DPOTrainer against TRL 1.16's DPOTrainer on CPU, side by side.

    pytest benchmarks/test_trainer_vs_trl.py --benchmark-only

Same GPT-2 built from a config (4 layers, hidden 256, vocabulary 32000), same frozen reference
model, same 16 pairs (96 prompt + 160 completion tokens), batch of 4 pairs, max_length 256,
float32, no gradient checkpointing, AdamW with clipping; see benchmarks/trainer_steps.py. The
step time is timed here (median of rounds after a warm-up); the peak resident memory of the
training steps above the loaded models (``step_peak_bytes``) and the process's peak are measured
in a fresh subprocess per trainer and go into ``extra_info``. No timing asserts. ``python -m benchmarks.trainer_steps compare`` prints the same
side by side with the ratios. ``fastdpo_logits`` is fastdpo's trainer with
``fused_linear=False`` (the model's logits into DPOLoss), to show what the fused linear path saves. Set FASTDPO_BENCH_ROUNDS to trade time for precision (default 3).
"""

import os
import pathlib

import pytest

from benchmarks.trainer_steps import STEPS, make_assets, probe_in_subprocess

ROUNDS = int(os.environ.get("FASTDPO_BENCH_ROUNDS", "3"))
pytest.importorskip("trl")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(pathlib.Path(tmp_path_factory.mktemp("trainer_bench")))


@pytest.mark.parametrize("method", ["fastdpo", "fastdpo_logits", "trl"])
def test_training_step(benchmark, assets, method, tmp_path):
    benchmark.group = "DPO training step, GPT-2 4x256, vocab 32000, 4 pairs x 256 tokens, float32 CPU"
    memory = probe_in_subprocess(method, assets, rounds=0)
    benchmark.extra_info.update(method=method, **memory)
    step = STEPS[method](assets, str(tmp_path))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
