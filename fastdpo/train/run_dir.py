"""What in an output directory is fastdpo's, and how a run writes there.

fastdpo's own entries in an output directory:

- ``checkpoint-<step>/``, ``final/`` and any other directory fastdpo wrote atomically, as long as
  its manifest lists every file in it (see :mod:`fastdpo.train.manifest`);
- the files listed in ``.fastdpo-run``, a JSON marker to which fastdpo adds each top-level file
  (the metrics log, ``training.png``) before it first writes it;
- ``.fastdpo-run`` itself, the lock ``.fastdpo.lock`` (see :mod:`fastdpo.train.run_lock`) and the
  temporaries of a write that was killed.

Everything else is foreign, and fastdpo never deletes or overwrites it:

- a run (new or resumed) into a directory holding foreign entries is refused with an error naming
  them, unless ``overwrite_output_dir`` (``--overwrite-output-dir``): then it writes next to them;
- even then, a foreign entry where fastdpo writes (``final``, ``checkpoint-<step>``, the metrics
  log, ``training.png``) is refused: it is in the way;
- a new run (not a resume) deletes what earlier fastdpo runs wrote there: their checkpoints,
  ``final/``, metrics log and plot. Everything is checked before anything is deleted, and symbolic
  links are never followed or deleted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastdpo.train import run_lock
from fastdpo.train.checkpoint import CHECKPOINT, TEMPORARY, TEMPORARY_FILE, notice, remove_stale_temporaries
from fastdpo.train.dist import rank0_outcome
from fastdpo.train.manifest import foreign_entries

RUN_MARKER = ".fastdpo-run"
PLOT = "training.png"
FINAL = "final"


class OutputDirError(ValueError):
    """The output directory holds what fastdpo did not write; the message names it."""


def listed_files(directory: str | os.PathLike) -> list[str]:
    """The top-level files that fastdpo runs wrote in ``directory`` (from ``.fastdpo-run``)."""
    path = pathlib.Path(directory) / RUN_MARKER
    if not path.is_file() or path.is_symlink():
        return []
    try:
        files = json.loads(path.read_bytes())["files"]
    except (ValueError, KeyError, TypeError):
        raise OutputDirError(
            f"{path}: not a fastdpo run marker (expected JSON with a 'files' list)"
        ) from None
    return [name for name in files if isinstance(name, str)]


def record_file(directory: str | os.PathLike, name: str) -> None:
    """Add ``name`` to ``directory``'s ``.fastdpo-run`` (call it before writing the file)."""
    directory = pathlib.Path(directory)
    files = listed_files(directory)
    if name in files:
        return
    tmp = directory / f".fastdpo-tmp-run-{os.getpid()}"
    tmp.write_text(json.dumps({"written_by": "fastdpo", "files": [*files, name]}, indent=1) + "\n")
    os.replace(tmp, directory / RUN_MARKER)


@dataclass
class Survey:
    own: list[pathlib.Path] = field(default_factory=list)  # earlier runs' outputs: a new run removes them
    foreign: list[str] = field(default_factory=list)  # what fastdpo did not write
    in_the_way: list[str] = field(default_factory=list)  # ... where fastdpo writes


def survey(directory: str | os.PathLike, metrics_file: str = "metrics.jsonl") -> Survey:
    """Sort every entry of ``directory`` into fastdpo's outputs and foreign entries (deletes nothing)."""
    directory, result = pathlib.Path(directory), Survey()
    listed = set(listed_files(directory))
    for entry in sorted(directory.iterdir()):
        name, link = entry.name, entry.is_symlink()
        is_file, is_dir = entry.is_file() and not link, entry.is_dir() and not link
        output_name = name in (FINAL, PLOT, metrics_file) or CHECKPOINT.match(name)
        if is_file and (name in (RUN_MARKER, run_lock.LOCK_FILE) or TEMPORARY_FILE.match(name)):
            continue
        if is_dir and TEMPORARY.match(name):
            continue  # a killed write's temporary: remove_stale_temporaries deletes it
        if is_file and name in listed:
            result.own.append(entry)
            continue
        if is_dir:
            problems = foreign_entries(entry)
            if not problems:  # all fastdpo's: an output (removed by a new run) or another saved model (kept)
                if name == FINAL or CHECKPOINT.match(name):
                    result.own.append(entry)
                continue
        else:
            problems = [f"{name} (symbolic link)" if link else name]
        result.foreign += problems
        if output_name:
            result.in_the_way += problems
    return result


def _names(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def check(directory: str | os.PathLike, metrics_file: str, overwrite: bool) -> Survey:
    """:func:`survey`, refusing foreign entries (see the module docstring) with :class:`OutputDirError`."""
    found = survey(directory, metrics_file)
    in_the_way = f"{_names(found.in_the_way)}: where fastdpo writes its outputs" if found.in_the_way else ""
    if found.foreign and not overwrite:
        raise OutputDirError(
            f"{directory} holds files fastdpo did not write: {_names(found.foreign)}; fastdpo never deletes "
            "them: choose another output directory, or pass --overwrite-output-dir (overwrite_output_dir=True) "
            "to write next to them" + (f" after moving {in_the_way}" if in_the_way else "")
        )
    if found.in_the_way:
        raise OutputDirError(
            f"{directory}: {in_the_way}, but not written by fastdpo, so never replaced; move it away or "
            "choose another output directory"
        )
    return found


class RunDir:
    """A trainer's output directory: locked while written, checked whenever this process takes the
    lock, cleared of earlier runs' outputs when a new run starts. Not ``enabled`` (the ranks other
    than 0, which write nothing), it only learns in :meth:`writing` whether rank 0 refused it."""

    def __init__(
        self,
        directory: str | os.PathLike,
        metrics_file: str = "metrics.jsonl",
        overwrite: bool = False,
        enabled: bool = True,
    ) -> None:
        self.directory = pathlib.Path(directory)
        self.metrics_file, self.overwrite, self.enabled = metrics_file, overwrite, enabled
        self.started = False
        self.metrics_start: int | None = None  # size of the metrics log before this trainer's first line
        self.depth = 0  # writing() blocks this process is in

    @classmethod
    def for_config(cls, config, enabled: bool = True) -> RunDir:
        """The output directory of a ``DPOConfig`` (its ``output_dir``, ``metrics_file``, ``overwrite_output_dir``)."""
        return cls(config.output_dir, config.metrics_file, config.overwrite_output_dir, enabled=enabled)

    @contextlib.contextmanager
    def writing(self, every_rank: bool = True) -> Iterator[None]:
        """Hold the directory for the ``with`` block: lock it, and check it when this process takes the lock.

        ``every_rank`` (the default): every rank of a process group calls it at this point, and
        when rank 0 refuses the directory (only it checks, as only it writes) every rank raises
        its error, so that none goes on without it; the outermost call exchanges the outcome.
        False: the code runs on rank 0 alone, which must then hold the directory already or run
        without a process group.
        """
        with contextlib.ExitStack() as held:
            error = None
            if self.enabled:
                try:
                    held.enter_context(self._held())
                except Exception as refused:  # every rank raises it, below
                    error = refused
            if every_rank and self.depth == 0:
                error = rank0_outcome(error)
            if error is not None:
                raise error
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        if self.directory.exists() and not self.directory.is_dir():
            raise OutputDirError(f"{self.directory}: the output directory is a file")
        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            with run_lock.hold(self.directory) as first:
                if first:
                    check(self.directory, self.metrics_file, self.overwrite)
                yield
        finally:  # a run that failed before writing anything leaves no empty directory behind
            if created and not any(self.directory.iterdir()):
                self.directory.rmdir()

    def start_run(self, resume: bool) -> None:
        """At the trainer's first ``train()``: remove stale temporaries and, for a new run, the
        outputs of earlier runs (keeping the metrics lines this trainer wrote already)."""
        if not self.enabled or self.started:
            return
        with self.writing(every_rank=False):  # rank 0 alone, within train()'s hold
            self.started = True
            remove_stale_temporaries(self.directory)
            if resume:
                return
            removed = []
            for path in survey(self.directory, self.metrics_file).own:
                if path.name == self.metrics_file and self.metrics_start is not None:
                    if self.metrics_start:  # evaluate() wrote this run's first lines after older ones
                        tmp = self.directory / f".fastdpo-tmp-{path.name}-{os.getpid()}"
                        tmp.write_bytes(path.read_bytes()[self.metrics_start :])
                        os.replace(tmp, path)
                        self.metrics_start = 0
                        removed.append(f"{path.name} (its earlier lines)")
                    continue
                removed.append(path.name + ("/" if path.is_dir() else ""))
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if removed:
                notice(
                    f"new run in {self.directory}: removed what an earlier run wrote there "
                    f"({_names(removed)}); resume to continue a run instead"
                )

    def append_metrics(self, record: dict) -> None:
        """One JSON line in the metrics log (listed in ``.fastdpo-run`` before its first line)."""
        if not self.enabled or not self.metrics_file:
            return
        with self.writing(every_rank=False):  # rank 0 alone
            path = self.directory / self.metrics_file
            if self.metrics_start is None:
                record_file(self.directory, self.metrics_file)
                self.metrics_start = path.stat().st_size if path.is_file() else 0
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")


def writes_output_dir(method):
    """For ``DPOTrainer`` methods that write into the output directory: hold ``self.run_dir`` for
    the call (every rank calls them, so every rank learns whether rank 0 may write there)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.run_dir.writing():
            return method(self, *args, **kwargs)

    return wrapper
