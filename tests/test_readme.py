"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its runs/readme goes there, not into the checkout
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_setup_commands_install_torch_cpu_first():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    setup = [c for c in commands if "python3 -m venv" in c]
    assert len(setup) == 2
    for command in setup:
        assert command.index("pip install torch==2.13.0") < command.index("--no-build-isolation")


def test_readme_main_job_is_fastdpo_train_with_what_it_needs():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    main_job = next(c for c in commands if "python3 -m venv" in c).strip()
    assert main_job.endswith("&& fastdpo train")
    assert '-e ".[train]"' in main_job
    pyproject = (README.parent / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    train = re.search(r"^train = \[(.*)\]$", pyproject, flags=re.M).group(1)
    for package in ("transformers", "matplotlib", "safetensors"):
        assert f'"{package}' in train
    assert 'fastdpo = "fastdpo.train.cli:main"' in pyproject
    import fastdpo.train.cli  # the console script's target exists

    assert callable(fastdpo.train.cli.main)
    assert re.search(r'^fastdpo = \[.*"assets/\*".*\]$', pyproject, flags=re.M)
