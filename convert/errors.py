"""One-line errors for the command lines (``python -m convert``, ``mamba-jax``).

``reported_errors`` turns a user error (bad input, a missing or damaged file, a checkpoint
problem) into one line on stderr with exit status 2, Ctrl-C or SIGTERM into one line with
status 130 after the temporary files are cleaned up, and lets the traceback through with
``--debug``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import warnings

USER_ERRORS = (ValueError, OSError, KeyError, ImportError)  # bad input, files, checkpoints, missing extras


def one_line(err: BaseException) -> str:
    """An exception's message on one line (KeyError's quotes dropped)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporary files are removed on the way out


@contextlib.contextmanager
def reported_errors(prog: str, debug: bool):
    """Run a command: user errors become one line on stderr (exit 2), Ctrl-C / SIGTERM one line
    (exit 130) after the cleanup of temporary files; ``debug`` lets the traceback through.
    Yields a one-element list that receives the exit status when an error was reported."""
    status: list[int] = []
    old_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"{prog}: warning: {message}\n"
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted (temporary files removed; every file written is complete)", file=sys.stderr)
        status.append(130)
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into one line
        if debug:
            raise
        hint = "" if isinstance(err, USER_ERRORS) else \
            f" (an internal error, {type(err).__name__}: rerun with --debug for the traceback and report it)"
        print(f"{prog}: error: {one_line(err)}{hint}", file=sys.stderr)
        status.append(2)
    finally:
        warnings.formatwarning = old_format
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
