"""Files written whole or not at all: the one atomic writer of the project.

``atomic_write`` writes through a temporary file in the target's folder and renames it into
place, so a reader never sees a half-written file and a failure (or Ctrl-C) leaves the old
file, or none. ``OUTPUT_MARKER`` names the file with which the command lines (``mamba-jax``,
``python -m convert``) mark the folders they wrote, so that ``--overwrite`` replaces those and
nothing else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

OUTPUT_MARKER = ".mamba-jax-output.json"


def is_temporary(name: str) -> bool:
    """True for the name of one of ``atomic_write``'s temporary files."""
    return name.startswith(".") and ".tmp-" in name


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it to ``path``.

    Readers never see a half-written file; on failure the temporary file is removed and
    ``path`` is left as it was. The file gets the usual permissions (0666 less the umask).
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))
