"""The tiled hidden-attention kernels (mamba_jax/pallas_attention.py) in Pallas interpret mode on
the CPU against the XLA formulas (ssm.hidden_attention, the oracle of xai.hidden_attention):
the channel statistics of the combined matrix (mean, min, max; with and without the clamp),
the full matrices, one-branch models, odd lengths (37, 197, 21), a small-block case whose
diagonal tiles take the direct fallback (large delta * |A|, where a factorization without the
shift would overflow), and the wiring into xai.hidden_attention on a tiny model.

Tolerances (float32): 2e-6 of the largest |value| of the reference (max |M| for the mean, the
min and the max; max |alpha| for the matrices). Same mathematics; the kernel factors each
exponential into two (an extra rounding of ~1 ulp of each factor) and sums in another order;
measured here up to 3e-7 of the maximum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from mamba_jax import VimConfig, init_params, ssm, vim_apply
from mamba_jax.pallas_attention import RMAX, combined_alpha, combined_stats, resolve_attention
from xai.hidden_attention import DEFAULT_BUDGET, _layer_alpha, channel_reduced_matrix, hidden_attention, layer_A

TOL = 2e-6


def make_inputs(seed, Bsz, L, E, N, shift):
    """Both branches' (delta, B, C, A); delta = softplus(normal + shift) > 0, A = -exp(normal)."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.normal(size=s).astype(np.float32)
    out = []
    for _ in range(2):
        delta = np.logaddexp(0.0, normal(Bsz, L, E) + shift).astype(np.float32)
        out += [delta, normal(Bsz, L, N), normal(Bsz, L, N), -np.exp(normal(E, N))]
    return out


def reference(delta_f, B_f, C_f, A_f, delta_b=None, B_b=None, C_b=None, A_b=None, *, weight=1.0):
    """alpha of each branch (backward flipped to original positions) and M = w (alpha_f + alpha_b)."""
    alpha = jax.vmap(ssm.hidden_attention, in_axes=(0, None, 0, 0))
    fwd = alpha(delta_f, A_f, B_f, C_f)
    if delta_b is None:
        return [fwd], fwd
    bwd = jnp.flip(alpha(delta_b, A_b, B_b, C_b), axis=(-1, -2))
    return [fwd, bwd], weight * (fwd + bwd)


def check_stats(args, *, weight, block, clamp):
    _, M = reference(*args, weight=weight)
    if clamp:
        M = jnp.maximum(M, 0.0)
    mean, lo, hi = combined_stats(*args, weight=weight, clamp=clamp, block=block, interpret=True)
    scale = float(jnp.abs(M).max())
    assert_close(mean, M.mean(1), atol=TOL * scale, name="channel mean")
    assert_close(lo, M.min(axis=(1, 2, 3)), atol=TOL * scale, name="min")
    assert_close(hi, M.max(axis=(1, 2, 3)), atol=TOL * scale, name="max")


@pytest.mark.parametrize("L,E,N,block,shift,clamps", [
    (37, 6, 16, 16, -2.0, (True,)),        # three blocks, the last one partial
    (197, 3, 16, 64, -2.0, (True,)),       # Vim's length: 4 blocks of 64, 59 padded positions
    (21, 5, 5, 32, 0.0, (False,)),         # one partial block only; N padded to 16
])
def test_stats_match_xla(L, E, N, block, shift, clamps):
    args = make_inputs(L * 10 + E, 2, L, E, N, shift)
    for clamp in clamps:
        check_stats(args, weight=0.5, block=block, clamp=clamp)


def test_large_delta_takes_the_guarded_path():
    """delta ~ 4, |A| up to ~20: block totals * |A| reach thousands, far past float32's exp range
    (88), so exp(-A rv) of a factorization around the block start would overflow; the kernel's
    shifted factorization is used where max |A| tot <= RMAX and the direct formula elsewhere."""
    L, E, N, block = 37, 6, 16, 16
    args = make_inputs(5, 2, L, E, N, 3.5)
    delta, A = args[0], args[3]
    tot = np.pad(delta, ((0, 0), (0, 48 - L), (0, 0))).reshape(2, 3, block, E).sum(2)  # [B, blocks, E]
    R = tot[..., None] * np.abs(A)[None, None]  # [B, blocks, E, N]
    assert R.max() > 2 * 88.7, "a factorization without the shift would overflow"
    per_channel = R.max(-1)
    assert (per_channel > RMAX).any() and (per_channel <= RMAX).any(), "both diagonal paths are exercised"
    check_stats(args, weight=0.5, block=block, clamp=True)
    # the sum alone (what the exact rollout asks for): the same mean, no min / max
    _, M = reference(*args, weight=0.5)
    mean, lo, hi = combined_stats(*args, weight=0.5, clamp=True, extremes=False, block=block, interpret=True)
    assert lo is None and hi is None
    assert_close(mean, jnp.maximum(M, 0.0).mean(1), atol=TOL * float(jnp.abs(M).max()), name="mean without extremes")
    alphas, _ = reference(*args)
    got = combined_alpha(*args, block=block, interpret=True)
    for r in range(2):
        assert_close(got[:, r], alphas[r], atol=TOL * float(jnp.abs(alphas[r]).max()), name=f"alpha branch {r}")


@pytest.mark.parametrize("L,block", [(37, 16)])
def test_alpha_matches_xla(L, block):
    args = make_inputs(L, 2, L, 4, 16, -1.0)
    alphas, _ = reference(*args)
    got = combined_alpha(*args, block=block, interpret=True)
    assert got.shape == (2, 2, 4, L, L)
    for r in range(2):
        assert_close(got[:, r], alphas[r], atol=TOL * float(jnp.abs(alphas[r]).max()), name=f"alpha branch {r}")
    assert np.all(np.triu(np.asarray(got[:, 0]), 1) == 0) and np.all(np.tril(np.asarray(got[:, 1]), -1) == 0)


def test_one_branch():
    """Without a backward branch the zeros above the diagonal belong to the tensor (min/max)."""
    args = make_inputs(3, 2, 37, 4, 16, -1.0)[:4]
    check_stats(args, weight=1.0, block=16, clamp=False)
    alphas, _ = reference(*args)
    got = combined_alpha(*args, block=16, interpret=True)
    assert got.shape == (2, 1, 4, 37, 37)
    assert_close(got[:, 0], alphas[0], atol=TOL * float(jnp.abs(alphas[0]).max()), name="alpha")


def test_split_prefetch_unroll_and_bad_arguments():
    """One program for all channels of a tile (split=1; the small cases above split them all),
    two channels per iteration with the next loads issued first; large delta, so that the
    diagonal tiles' fallback runs inside the pipelined loop too."""
    args = make_inputs(9, 1, 37, 6, 16, 3.5)
    _, M = reference(*args, weight=0.5)
    mean, lo, hi = combined_stats(*args, weight=0.5, block=16, split=1, unroll=2, prefetch=True, interpret=True)
    scale = float(jnp.abs(M).max())
    assert_close(mean, M.mean(1), atol=TOL * scale, name="channel mean")
    assert_close(lo, M.min(axis=(1, 2, 3)), atol=TOL * scale, name="min")
    assert_close(hi, M.max(axis=(1, 2, 3)), atol=TOL * scale, name="max")
    with pytest.raises(ValueError, match="divide"):
        combined_stats(*args, weight=0.5, block=16, split=4, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        combined_stats(*args, weight=0.5, block=24, interpret=True)
    with pytest.raises(ValueError, match="unknown hidden-attention method"):
        resolve_attention("cuda")
    assert resolve_attention("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")


CFG = VimConfig(embed_dim=16, depth=2, img_size=32, patch_size=8, stride=8, num_classes=5)


def test_wired_into_hidden_attention():
    """channel_reduced_matrix and the per-layer matrices of hidden_attention and
    map_hidden_attention: the same numbers with method="pallas" (interpret mode here) as with the
    XLA formulas, on a tiny model's layer."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    params["layers"]["mixer"]["dt_proj"]["bias"] = params["layers"]["mixer"]["dt_proj"]["bias"] + 1.0
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    _, inter = vim_apply(CFG, params, images, capture=True)
    br = {n: {k: v[1] for k, v in inter[n].items()} for n in ("fwd", "bwd")}
    A_f, A_b = layer_A(CFG, params, 1)
    ref = channel_reduced_matrix(CFG, br, A_f, A_b, clamp=True, method="xla")
    got = channel_reduced_matrix(CFG, br, A_f, A_b, clamp=True, method="pallas")
    scale = float(jnp.abs(ref[2]).max())
    for g, r, name in zip(got, ref, ("mean", "min", "max")):
        assert_close(g, r, atol=TOL * scale, name=name)
    with pytest.raises(ValueError, match="unknown hidden-attention method"):
        hidden_attention(CFG, params, images, method="triton")
    channels = jnp.asarray([5, 2, 7])
    ref = _layer_alpha(CFG, params, inter, 1, channels, DEFAULT_BUDGET, method="xla")
    got = _layer_alpha(CFG, params, inter, 1, channels, DEFAULT_BUDGET, method="pallas")
    assert got.shape == (2, 2, 3, 17, 17)
    assert_close(got, ref, atol=TOL * float(jnp.abs(ref).max()), name="one layer's alpha")
