"""One DPO training step: ``fastdpo.trl.DPOTrainer`` against TRL 1.16's ``DPOTrainer`` on CPU,
the same model, data and ``DPOConfig``, side by side, in float32 and under bfloat16 autocast.

    pytest benchmarks/test_trl_step.py --benchmark-only

The set-up and what is measured are benchmarks/trl_steps.py's (``python -m benchmarks.trl_steps
compare`` prints the same with the ratios). The step time is timed here (median of rounds after a
warm-up); the step's peak resident memory and the process's peak are measured in a fresh
subprocess per trainer and go into ``extra_info``. No timing asserts. Set FASTDPO_BENCH_ROUNDS to
trade time for precision (default 3).
"""

import os
import pathlib

import pytest

from benchmarks.trainer_steps import make_assets
from benchmarks.trl_steps import DTYPES, METHODS, probe_in_subprocess, trl_step

ROUNDS = int(os.environ.get("FASTDPO_BENCH_ROUNDS", "3"))
pytest.importorskip("trl")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(pathlib.Path(tmp_path_factory.mktemp("trl_bench")))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_trl_training_step(benchmark, assets, method, dtype, tmp_path):
    benchmark.group = f"TRL DPOTrainer step, GPT-2 4x256, vocab 32000, 4 pairs x 256 tokens, {dtype} CPU"
    memory = probe_in_subprocess(method, dtype, assets, rounds=0)
    benchmark.extra_info.update(method=method, dtype=dtype, **memory)
    step = trl_step(method, dtype, assets, str(tmp_path))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
