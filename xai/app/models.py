"""Model loading, method lists and numerics for the command lines: one loader, one parser each.

``load_model("demo")`` is the embedded demo Vim; anything else goes to
``convert.load_checkpoint`` (a local file or folder, or a hub id). ``add_numerics_arguments``
and ``numerics_options`` are the fast-path flags (``--bf16``, ``--scan-method``, ``--remat``)
of every command that runs the model, and the ``Options`` they stand for.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from mamba_jax.config import VimConfig
from mamba_jax.options import Options
from mamba_jax.ssm import SCAN_METHODS
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


def add_numerics_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--bf16``, ``--scan-method`` and ``--remat`` (``numerics_options`` reads them)."""
    g = parser.add_argument_group("numerics", "how the model computes (mamba_jax.options.Options); the default is "
                                              "float32 at matmul precision 'highest'")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16 projections (scan, norms and residual stream stay float32; maps move by ~1%%)")
    g.add_argument("--scan-method", choices=SCAN_METHODS, default="auto",
                   help="selective scan: auto (default: on a GPU the fused Pallas kernel from batch 8 on and the "
                        "associative scan below, on a CPU the sequential scan; mamba_jax.ssm.resolve_scan), pallas, "
                        "associative or sequential")
    g.add_argument("--remat", action="store_true",
                   help="Mamba-Attribution: recompute each layer in the backward pass instead of keeping it "
                        "(about half the memory on large batches, a few %% more time)")


def numerics_options(args: argparse.Namespace) -> Options:
    """The ``Options`` of the flags ``add_numerics_arguments`` added."""
    return Options(dtype=jnp.bfloat16 if args.bf16 else None, scan_method=args.scan_method, remat=args.remat)
