"""Model loading and method lists for the command lines: one loader, one parser.

``load_model("demo")`` is the embedded demo Vim; anything else goes to
``convert.load_checkpoint`` (a local file or folder, or a hub id).
"""

from __future__ import annotations

import argparse

from mamba_jax.config import VimConfig
from xai.methods import METHODS

DEMO = "demo"


def load_model(checkpoint: str, variant: str | None = None) -> tuple[VimConfig, dict]:
    """(config, params) of ``checkpoint``: "demo" or a ``convert.load_checkpoint`` source."""
    if checkpoint == DEMO:
        if variant is not None:
            raise ValueError("--variant does not apply to the demo model")
        from xai.app.demo import demo_model

        return demo_model()
    from convert.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, variant)


class MethodListError(argparse.ArgumentTypeError, ValueError):
    """An unknown method name: a usage error as an argparse ``type=``, a ValueError elsewhere."""


def parse_methods(text: str) -> tuple[str, ...]:
    """"all" or a comma-separated list of method names -> the methods, in order, once each.
    Raises ``MethodListError`` naming the unknown ones."""
    if text.strip() == "all":
        return METHODS
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MethodListError(f"unknown method {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"valid: all or a comma-separated list of {', '.join(METHODS)}")
    return tuple(dict.fromkeys(methods))
