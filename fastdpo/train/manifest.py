"""The manifest fastdpo writes into every directory it writes atomically (checkpoints, ``final/``).

``fastdpo_manifest.json`` lists each file of the directory with its size and sha256 digest. It has
two uses: a resume verifies every file against it before reading any (a corrupted file is named,
never loaded), and it marks the directory as fastdpo's: a directory whose manifest lists every
file in it holds nothing but what fastdpo wrote, so fastdpo may replace it; a file the manifest
does not list is someone else's and keeps the directory from being deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

MANIFEST = "fastdpo_manifest.json"
FORMAT = "fastdpo-manifest-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file at fault and why."""


def files_in(directory: str | os.PathLike) -> list[str]:
    """Every non-directory entry below ``directory`` (relative POSIX paths, sorted), the manifest
    excluded. Symbolic links are listed as entries and never followed."""
    root = pathlib.Path(directory)
    found = []
    pending = [root]
    while pending:
        for entry in pending.pop().iterdir():
            if entry.is_dir() and not entry.is_symlink():
                pending.append(entry)
            elif entry != root / MANIFEST:
                found.append(entry.relative_to(root).as_posix())
    return sorted(found)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> None:
    """List every file of ``directory`` with its size and sha256 in ``directory/fastdpo_manifest.json``."""
    directory = pathlib.Path(directory)
    files = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
        for name in files_in(directory)
    }
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")


def read_manifest(directory: str | os.PathLike) -> dict[str, dict]:
    """``{file: {"bytes", "sha256"}}`` of ``directory``'s manifest, or :class:`CheckpointError`."""
    path = pathlib.Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing (not written by fastdpo, or by a version before checkpoints had manifests)"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastdpo manifest (expected format {FORMAT!r})")
    return manifest["files"]


def verify(directory: str | os.PathLike) -> None:
    """Check every file the manifest lists: present, a regular file, same size, same sha256.

    Raises :class:`CheckpointError` naming the first file that differs.
    """
    directory = pathlib.Path(directory)
    for name, expected in read_manifest(directory).items():
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or modified)"
            )
        if sha256_of(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from {MANIFEST} (corrupted or modified)")


def foreign_entries(directory: str | os.PathLike) -> list[str]:
    """What in ``directory`` fastdpo did not write, for an error message; empty when it is all fastdpo's.

    An empty directory holds nothing foreign. A symbolic link, a file, or a directory without a
    readable manifest is foreign as a whole (named ``name/ (first files)``); otherwise each file
    its manifest does not list is named.
    """
    directory = pathlib.Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return [directory.name]
    files = files_in(directory)
    try:
        listed = read_manifest(directory)
    except CheckpointError:
        if not files and not (directory / MANIFEST).exists():
            return []
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        return [f"{directory.name}/ ({shown})" if shown else f"{directory.name}/"]
    return [f"{directory.name}/{name}" for name in files if name not in listed]
