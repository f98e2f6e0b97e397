"""Atomic checkpoints: write everything into a temporary directory, then rename it into place.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds the model and tokenizer
(``save_pretrained``), ``trainer_state.pt`` (optimizer, scheduler, step, RNG states, precomputed
reference log-probs, evaluations) and ``trainer_state.json`` (the same, human-readable, without
tensors). Until the rename, the directory is named ``.tmp-checkpoint-...``, which nothing reads
as a checkpoint, so a run interrupted at any point leaves either the complete checkpoint or none.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"


def write_atomically(target: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``write(tmp_dir)``, then rename ``tmp_dir`` to ``target`` (replacing an older ``target``).

    If ``write`` raises, the temporary directory is removed and ``target`` is left as it was.
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():  # move the old one aside first: a directory cannot be renamed over another
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    return target


def remove_stale_temporaries(output_dir: str | os.PathLike) -> None:
    """Delete temporary directories left by a run that was killed while writing."""
    for path in pathlib.Path(output_dir).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def last_checkpoint(output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    found = []
    for path in pathlib.Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Keep only the ``keep`` most recent checkpoints (all of them when ``keep`` is None)."""
    if not keep:
        return
    steps = sorted(
        (int(m.group(1)), p) for p in pathlib.Path(output_dir).iterdir() if (m := CHECKPOINT.match(p.name))
    )
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: pathlib.Path, state: dict) -> None:
    """``trainer_state.pt`` (everything) and ``trainer_state.json`` (the plain-data part)."""
    torch.save(state, directory / STATE_FILE)
    plain = {k: v for k, v in state.items() if isinstance(v, (int, float, str, list, dict, type(None)))}
    plain = {k: v for k, v in plain.items() if k not in ("optimizer", "scheduler", "rng", "ref_logps")}
    (directory / "trainer_state.json").write_text(json.dumps(plain, indent=2, default=str))


def load_state(directory: str | os.PathLike) -> dict:
    # The state holds RNG states (numpy arrays, Python tuples), so it is not a weights-only pickle;
    # it is only ever read from checkpoints this trainer wrote.
    return torch.load(pathlib.Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def load_model_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load ``save_pretrained`` safetensors (one file or shards) from ``directory`` into ``model``.

    Keys ``save_pretrained`` leaves out because they are tied to another parameter (an LM head
    tied to the input embeddings) may be missing; any other missing or unexpected key is an error.
    """
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(directory / name, device="cpu"))
    result = model.load_state_dict(state, strict=False)
    names_by_tensor: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(param), set()).add(name)
    loaded = set(state)
    untied = [k for k in result.missing_keys if not (names_by_tensor.get(id(_get(model, k)), set()) & loaded)]
    if untied or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {directory} does not match the model: missing {untied[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _get(model: nn.Module, name: str):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)
