"""One DPO training step: ``fastdpo.trl.DPOTrainer`` against TRL 1.16's ``DPOTrainer`` on CPU,
the same model, data and ``DPOConfig``, side by side, in float32 and under bfloat16 autocast.

    pytest benchmarks/test_trl_step.py --benchmark-only [--bench-size full]

The set-up and what is measured are benchmarks/trl_steps.py's (``python -m benchmarks.trl_steps
compare`` prints the same with the ratios). The step time is timed here (median of rounds after a
warm-up); the step's peak resident memory and the process's peak are measured in a fresh
subprocess per trainer and go into ``extra_info``. No timing asserts. The sizes are
``trainer_steps.SETUPS[--bench-size]``.
"""

import pathlib

import pytest

from benchmarks.conftest import bench_size, timing
from benchmarks.trainer_steps import SETUPS, make_assets
from benchmarks.trl_steps import DTYPES, METHODS, make_step, probe_in_subprocess

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, request):
    setup = SETUPS[bench_size(request.config)]
    return make_assets(pathlib.Path(tmp_path_factory.mktemp("trl_bench")), setup), setup


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_trl_training_step(benchmark, assets, method, dtype, tmp_path, request):
    directory, s = assets
    benchmark.group = (
        f"TRL DPOTrainer step, GPT-2 {s.n_layer}x{s.n_embd}, vocab {s.vocab}, "
        f"{s.batch} pairs x {s.max_length} tokens, {dtype} CPU"
    )
    memory = probe_in_subprocess(method, dtype, directory, rounds=0)
    benchmark.extra_info.update(method=method, dtype=dtype, **memory)
    step = make_step(method, dtype, directory, str(tmp_path))
    benchmark.pedantic(step, iterations=1, **dict(timing(request.config), warmup_rounds=2))
