"""The persistent compilation cache of the command lines: a second run starts in seconds.

Compiling the model and the explanation methods takes most of a command's start-up (on an
H200 about 10-15 s per function at batch 128). ``enable_compilation_cache`` turns on JAX's
persistent compilation cache (``jax_compilation_cache_dir``) so that a later process with the
same model, batch size, methods and options loads the compiled programs from disk instead.

    MAMBA_JAX_CACHE unset or empty   $XDG_CACHE_HOME/mamba-jax/jax (default ~/.cache/mamba-jax/jax)
    MAMBA_JAX_CACHE=DIR              that folder
    MAMBA_JAX_CACHE=off              no persistent cache (also 0, false, no, none)

A cache folder set through JAX itself (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update("jax_compilation_cache_dir", ...)``) is left as it is, and so is a
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` in the environment (else programs that compile in
under ``MIN_COMPILE_SECS`` are not kept). The cache holds
programs that will be executed: keep it where only you can write. A folder that cannot be
created is reported as a warning and the command runs without the cache.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

CACHE_ENV = "MAMBA_JAX_CACHE"
OFF = ("0", "off", "false", "no", "none")
MIN_COMPILE_SECS = 0.5  # programs that compile faster are not worth a file (JAX's default is 1 s)
MIN_SECS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"  # JAX's own setting, when given, wins

HELP = (f"Compiled programs are kept in a persistent cache, so that a second run with the same model, batch "
        f"size and options starts in seconds: ${CACHE_ENV} names its folder (default "
        f"~/.cache/mamba-jax/jax, under $XDG_CACHE_HOME if set); {CACHE_ENV}=off turns it off.")


def cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The cache folder that ``environ`` (default ``os.environ``) asks for, or None for off."""
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "mamba-jax" / "jax"


def enable_compilation_cache(environ: Mapping[str, str] | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``cache_dir(environ)``; returns the folder
    in use (one set through JAX itself wins), or None when it is off or cannot be created.
    Call it before the first compilation of the process."""
    import jax

    environ = os.environ if environ is None else environ
    already = jax.config.jax_compilation_cache_dir
    if already:
        return Path(already)
    path = cache_dir(environ)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        warnings.warn(f"no compilation cache: cannot create {path} ({err}); set {CACHE_ENV} to another folder "
                      f"or to off", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if MIN_SECS_ENV not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return path
