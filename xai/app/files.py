"""Output folders of the command lines: checked before any work, marked, replaced only by
``--overwrite`` and only where this program wrote them.

The command lines write into a folder that is new or empty; the marker file
(``mamba_jax.files.OUTPUT_MARKER``) lists what they wrote there, so that ``--overwrite``
replaces an earlier run's results and nothing else. Its first line is JSON ({"command": ...}),
then one file name per line, appended before each file is written (appending keeps a long
run's bookkeeping linear in its number of files).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from mamba_jax.files import OUTPUT_MARKER, atomic_write, is_temporary


class OutputDirError(ValueError):
    """An output folder that cannot be used; the message says why and what to do instead."""


def _read_marker(out: Path) -> dict | None:
    """{"command", "files"} of a folder's marker; None without a readable one."""
    import json

    try:
        lines = (out / OUTPUT_MARKER).read_text().splitlines()
        head = json.loads(lines[0]) if lines else None
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict) or "command" not in head:
        return None
    return {"command": head["command"], "files": [n for n in lines[1:] if n.strip()]}


def listing(names: Sequence[str], n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_output_dir(path: str | os.PathLike, *, command: str, overwrite: bool = False, inputs=(),
                     option: str = "--out") -> Path:
    """Check an output folder before any work starts; nothing is created or changed.

    The folder must be new or empty. With ``overwrite`` it may instead hold the results of an
    earlier run of ``mamba-jax <command>`` (the files its marker lists) and nothing else. It must
    never hold one of ``inputs``, nor lie under a file. Raises ``OutputDirError`` naming the problem.
    """
    out = Path(path)
    what = f"{option} {out}"
    for existing in (out, *out.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise OutputDirError(f"{what}: {existing} is a file, not a folder" if existing != out
                             else f"{what} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"{what}: cannot write in {existing} (permission denied)")
    if existing != out:
        return out  # created when the first result is written
    held = [str(f) for f in map(Path, inputs) if out.resolve() in Path(f).resolve().parents]
    if held:
        raise OutputDirError(f"{what} holds the input image(s) {listing(held)}: the results would be written "
                             "among (and could replace) them; choose another output folder")
    entries = [e.name for e in os.scandir(out)]
    if not entries:
        return out
    usage = (f"choose a new or empty folder (--overwrite replaces only the results of an earlier "
             f"`mamba-jax {command}` run)")
    if not overwrite:
        raise OutputDirError(f"{what} is not empty ({listing(entries)}): {usage}")
    marker = _read_marker(out)
    ours = set(marker["files"]) if marker is not None and marker.get("command") == command else set()
    foreign = [n for n in entries if n != OUTPUT_MARKER and n not in ours and not is_temporary(n)]
    if marker is None or marker.get("command") != command or foreign:
        raise OutputDirError(f"{what} holds files that mamba-jax {command} did not write "
                             f"({listing(foreign or entries)}): --overwrite replaces only the results of an "
                             f"earlier `mamba-jax {command}` run; choose another folder")
    return out


def open_output_dir(path: str | os.PathLike, *, command: str, overwrite: bool = False) -> Path:
    """Create the folder checked by ``check_output_dir`` and start its marker; under ``overwrite``
    first remove the files the earlier run listed in its marker (and its temporary files)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(out)
    if overwrite and marker is not None and marker.get("command") == command:
        for name in marker["files"]:
            target = out / name
            if name and Path(name).name == name and target.is_file():  # plain names in this folder only
                target.unlink()
        for name in os.listdir(out):
            if is_temporary(name):
                (out / name).unlink(missing_ok=True)
    record_outputs(out, command, (), replace=True)
    return out


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, command: str, overwrite: bool = False):
    """``open_output_dir`` for a block that writes the results: if the block fails before any
    result was recorded, the marker (and the folder, if this created it) is removed again, so a
    failed run does not leave a folder that a rerun would have to ``--overwrite``."""
    out = Path(path)
    created = not out.exists()
    out = open_output_dir(out, command=command, overwrite=overwrite)
    try:
        yield out
    except BaseException:
        marker = _read_marker(out)
        if marker is not None and not any((out / n).exists() for n in marker["files"]):
            (out / OUTPUT_MARKER).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise


def record_outputs(out: str | os.PathLike, command: str, names: Sequence[str], *, replace: bool = False) -> None:
    """Add ``names`` (files about to be written in ``out``) to its marker; ``replace`` starts a new one."""
    import json

    marker = Path(out) / OUTPUT_MARKER
    if replace or not marker.exists():
        header = json.dumps({"command": command}) + "\n"
        atomic_write(marker, lambda f: f.write(header.encode()))
    if names:
        with open(marker, "a") as f:
            f.write("".join(f"{n}\n" for n in names))


