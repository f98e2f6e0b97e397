"""Atomic, verified checkpoints that load as plain data.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds the model and tokenizer
(``save_pretrained``), ``trainer_state.pt`` (optimizer, scheduler, step, RNG states, evaluations,
and the reference's own entries: precomputed log-probs), ``trainer_state.json`` (the same, human-readable, without
tensors), ``run_config.json`` (what a resume must match, see :mod:`fastdpo.train.run_config`) and
``fastdpo_manifest.json`` (size and sha256 of every other file, see :mod:`fastdpo.train.manifest`).

- Atomic: everything is written into ``.tmp-checkpoint-<step>-<pid>``, which nothing reads as a
  checkpoint, then renamed into place, so a run interrupted at any point leaves either the complete
  checkpoint or none.
- Plain data: RNG states are stored as tensors and numbers, so ``trainer_state.pt`` loads with
  ``torch.load(weights_only=True)``; a tampered file cannot run code, it is refused.
- Verified: a resume checks every file against the manifest first and names a corrupted one; from
  an output directory it falls back, saying why, to the newest checkpoint that is intact.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fastdpo.train import manifest
from fastdpo.train.manifest import CheckpointError

__all__ = ["CheckpointError", "open_checkpoint", "load_state", "save_state", "write_atomically"]

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What write_atomically leaves when killed: the new directory being written, or the old one moved aside.
TEMPORARY = re.compile(r"^\.(tmp|old)-(checkpoint-\d+|final)-\d+$")
# A file fastdpo is replacing (the run marker, the metrics log), written aside then renamed over it.
TEMPORARY_FILE = re.compile(r"^\.fastdpo-tmp-.+-\d+$")
STATE_FILE = "trainer_state.pt"
RUN_FILE = "run_config.json"
# What every trainer state holds; the reference's own entries (ref_logps) are its to check.
STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "evaluations")


def notice(message: str) -> None:
    """Tell the user something they should know but that is not an error (rank 0 only, on stderr)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fastdpo: {message}", file=sys.stderr, flush=True)


def write_atomically(target: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``write(tmp_dir)``, add the manifest, then rename ``tmp_dir`` to ``target``.

    An existing ``target`` is replaced only if fastdpo wrote it (its manifest lists every file in
    it) or it is empty; anything else raises ``FileExistsError`` naming what is in the way. If
    ``write`` raises, the temporary directory is removed and ``target`` is left as it was.
    """
    target = pathlib.Path(target)
    if target.is_symlink() or target.exists():
        foreign = manifest.foreign_entries(target)
        if foreign:
            raise FileExistsError(
                f"{target}: exists and holds what fastdpo did not write ({', '.join(foreign[:5])}); "
                "refusing to replace it"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        manifest.write_manifest(tmp)
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
    """Delete what a run killed while writing left (see ``TEMPORARY``, ``TEMPORARY_FILE``); nothing else."""
    for path in pathlib.Path(output_dir).iterdir():
        if path.is_symlink():
            continue
        if TEMPORARY.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif TEMPORARY_FILE.match(path.name) and path.is_file():
            path.unlink()


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory (not symbolic links), by step."""
    found = []
    for path in pathlib.Path(output_dir).iterdir():
        match = CHECKPOINT.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return sorted(found)


def last_checkpoint(output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint with the highest step that has a trainer state, or None (not verified)."""
    found = [path for _, path in checkpoints(output_dir) if (path / STATE_FILE).is_file()]
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Keep only the ``keep`` most recent of fastdpo's checkpoints (all of them when ``keep`` is None)."""
    if not keep:
        return
    own = [path for _, path in checkpoints(output_dir) if not manifest.foreign_entries(path)]
    for path in own[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers (so that it loads with ``weights_only=True``)."""
    version, keys, gauss_next = random.getstate()
    kind, np_keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["keys"].tolist()), py["gauss_next"]))
    np_keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], np_keys, npy["position"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: pathlib.Path, state: dict) -> None:
    """``trainer_state.pt`` (everything), ``trainer_state.json`` (the plain-data part) and
    ``run_config.json`` (``state["run"]``, what a resume must match)."""
    torch.save(state, directory / STATE_FILE)
    plain = {k: v for k, v in state.items() if isinstance(v, (int, float, str, list, dict, type(None)))}
    plain = {k: v for k, v in plain.items() if k not in ("optimizer", "scheduler", "rng", "ref_logps", "run")}
    (directory / "trainer_state.json").write_text(json.dumps(plain, indent=2, default=str))
    if "run" in state:
        (directory / RUN_FILE).write_text(json.dumps(state["run"], indent=2) + "\n")


def load_state(directory: str | os.PathLike) -> dict:
    """The trainer state of a checkpoint, read as tensors and plain data only (``weights_only=True``).

    Anything else in the file (a pickled object, code) is refused, never run; a missing, empty,
    truncated or foreign file is a :class:`CheckpointError` naming it.
    """
    path = pathlib.Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, EOFError, RuntimeError... for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else "empty"
        if "Weights only load failed" in first:
            reason = (
                "it holds more than tensors and plain data (tampered with, or written by an older fastdpo)"
            )
            raise CheckpointError(f"{path}: refused to load: {reason}") from None
        raise CheckpointError(f"{path}: unreadable trainer state ({type(e).__name__}: {first})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a fastdpo trainer state (no {', '.join(missing)})")
    return state


def open_checkpoint(path: str | os.PathLike, *, latest: bool) -> tuple[pathlib.Path, dict]:
    """``(checkpoint, trainer state)`` to resume from, verified against its manifest, said on stderr.

    ``latest=False``: ``path`` is the checkpoint; any fault is a :class:`CheckpointError`.
    ``latest=True``: ``path`` is an output directory; the newest checkpoint that passes is used,
    and each newer one that does not is reported, with the reason, before falling back.
    """
    path = pathlib.Path(path)
    if latest:
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such output directory to resume from")
        candidates = [p for _, p in reversed(checkpoints(path))]
        if not candidates:
            raise CheckpointError(f"{path}: no checkpoint-<step> directory to resume from")
    else:
        candidates = [path]
    reasons = []
    for i, candidate in enumerate(candidates):
        try:
            manifest.verify(candidate)
            state = load_state(candidate)
        except CheckpointError as e:
            if not latest:
                raise
            reasons.append(str(e))
            older = f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "none older"
            notice(f"{candidate.name} is unusable: {e}; {older}")
            continue
        notice(f"resuming from {candidate} (step {state['step']})")
        return candidate, state
    raise CheckpointError(f"{path}: no usable checkpoint ({'; '.join(reasons)})")


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop the lines of a metrics log after ``step`` (written by an interrupted run after its last checkpoint).

    A torn last line (the run was killed while writing it) is dropped with a notice naming file and
    line; any other line that is not a JSON object is an error naming them.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):
                notice(f"{path}:{number}: dropped a torn last line (the run was killed while writing it)")
                break
            raise ValueError(f"{path}:{number}: not a JSON object; a metrics log line must be one")
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".fastdpo-tmp-{path.name}-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


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
