"""The numerics of a forward pass, as one frozen (hashable, jit-static) object.

Every layer needs the same four choices (compute dtype, matmul precision, selective-scan
method, rematerialization); they travel together as one ``Options`` from the public
functions (``vim_apply``, ``xai.explain``, ``xai.eval.evaluate``) down to the Flax modules, and
are a single static argument under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from mamba_jax.ssm import SCAN_METHODS, ScanMethod

PRECISIONS = (None, "default", "high", "highest")
LRP_RULES = ("norm", "silu", "ssm", "gate")  # MambaLRP's four rules (mamba_jax.mixer, SPEC section 7)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """How a model computes, not what it computes (every choice keeps the mathematics).

    Attributes:
      dtype: compute dtype of the projections (``jnp.bfloat16`` for the fast path); None is
        float32. The residual stream, the norms and the scan always stay float32.
      precision: matmul precision: "highest" (true float32, no TF32: the parity default),
        "high", "default" or None (the backend's default; TF32 on recent GPUs).
      scan_method: the selective scan: "auto" (``ssm.resolve_scan``), "pallas" (fused GPU
        kernel; interpret mode elsewhere, for tests), "associative" or "sequential" (oracle).
      remat: under a gradient, recompute each captured layer in the backward pass
        (``jax.checkpoint``) instead of keeping its internals: less memory, one more forward
        pass of those layers.
      lrp_rules: MambaLRP rules, any of ``LRP_RULES`` (``mamba_jax.mixer``): they hold some
        factors constant under differentiation, so the values are unchanged and only the
        gradient differs (input x gradient then conserves relevance). Empty: the plain gradient.
    """

    dtype: Any = None
    precision: str | None = "highest"
    scan_method: ScanMethod = "auto"
    remat: bool = False
    lrp_rules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scan_method not in SCAN_METHODS:
            raise ValueError(f"unknown scan method {self.scan_method!r}; expected one of {SCAN_METHODS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown matmul precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.dtype is not None:  # one hashable spelling per dtype: jnp.bfloat16 == "bfloat16"
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "remat", bool(self.remat))
        if isinstance(self.lrp_rules, str):
            raise ValueError(f"lrp_rules must be a collection of rule names, got the string {self.lrp_rules!r}")
        unknown = [r for r in self.lrp_rules if r not in LRP_RULES]
        if unknown:
            raise ValueError(f"unknown LRP rule(s) {unknown}; expected any of {LRP_RULES}")
        # one hashable spelling per set of rules, in the canonical order
        object.__setattr__(self, "lrp_rules", tuple(r for r in LRP_RULES if r in set(self.lrp_rules)))

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)


DEFAULT = Options()
