"""xai/unified.py, the unified implicit attention (SPEC section 6), and the method
"unified_attribution" against the PyTorch port of the official code (convert/reference.py).

Checks: the SPEC 6 identities on every layer and branch of tiny random models in float64
(bimamba v2; v1 with the class token at 0; one causal branch): silu of the recomputed
pre-activation c = the captured u; the conv as a Toeplitz matrix (T x + b = c = PyTorch's
conv1d); M = diag(silu z) alpha diag(sigmoid c) T; M x plus the bias and D terms = the gated
scan output (sequential scan as oracle); the class-token rows = row cls_pos of M, and their
branch sum = the PyTorch port's official vector; triangular structure; the chunked channel
statistics of the combined matrix; out_proj of the combined matrix = the mixer output read off
the captured residual stream. Then layer/channel selection and chunking against the full
tensor; explain under jit on a 5 x 5 grid (even L), the exact mode recomposed in numpy from the
full matrices; the official mode against the port on the five sample photos with a random
full-size Vim-T, where each official ablation switch (dropping sigmoid(c), the conv, or the gate)
makes the comparison fail.

Tolerances, each with its reason:
  float64 identities ........ 1e-10 of max(1, max |expected|)  (reassociation only)
  structure .................. exactly 0                        (masked entries are never computed)
  float32 selections/chunks .. rtol 1e-5, atol 1e-7             (same maths, other chunking/order)
  float32 recomposition ...... 1e-6 of max(1, max |map|)        (same maths, other summation order)
  maps vs the PyTorch port ... 1e-5 of max |expected|           (24 float32 layers, exp of sums vs
                                                                 products of exps)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGES, assert_close

from mamba_jax import VimConfig, preprocess, ssm, vim_apply, vim_tiny
from xai.hidden_attention import branch_weight
from xai.methods import EXACT_GRADIENT, _exact_gradients, explain, forward_with_gradients
from xai.unified import (
    conv_toeplitz,
    layer_terms,
    unified_attention,
    unified_channel_reduced_matrix,
    unified_class_token_rows,
    unified_rows,
)

CFG = VimConfig(embed_dim=16, depth=3, img_size=32, patch_size=8, stride=8, num_classes=5)
GRID5 = CFG.replace(img_size=40)  # 5 x 5 patches: L = 26 (even), class token at 12
_TOL_F64 = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The PyTorch side is many small ops (the reference scans in a Python loop): intra-op
    threads only add contention on a loaded 2-core machine. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference_and_params(config, seed=0, dtype=jnp.float32):
    """A random PyTorch reference model and its converted parameters (no Flax init to compile for
    every config), with spread conv biases and D and larger dt biases (longer memory: non-trivial
    decays), so that every term of the identities matters."""
    from convert.checkpoint import load_checkpoint
    from convert.reference import VimReference

    torch.manual_seed(seed)
    ref = VimReference(config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("conv1d.bias", "conv1d_b.bias", "mixer.D", "mixer.D_b")):
                p.add_(0.5 * torch.randn_like(p))
            if name.endswith(("dt_proj.bias", "dt_proj_b.bias")):
                p.add_(1.0)
    _, params = load_checkpoint(ref.state_dict(), variant=config)
    return ref.eval(), jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def _params(config, seed=0, dtype=jnp.float32):
    return _reference_and_params(config, seed, dtype)[1]


def _images(config, n=2, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, config.img_size, config.img_size, 3), dtype)


def _np(x):
    return np.asarray(x, np.float64)


# =============================================================================
# SPEC 6 identities, float64
# =============================================================================
@functools.partial(jax.jit, static_argnums=0)
def _layer_quantities(config, params, images):
    """The full matrices (``unified_attention``) and, per layer, each branch's ``layer_terms`` (own
    order) with its alpha and the sequential-scan y (the oracle), the class-token rows and the
    clamped channel statistics: one compilation."""
    M = unified_attention(config, params, images)
    _, inter = vim_apply(config, params, images, capture=True)
    out = []
    for l in range(config.depth):
        terms = layer_terms(config, params, inter, l)
        branches = {name: dict(t, alpha=jax.vmap(ssm.hidden_attention, in_axes=(0, None, 0, 0))(
                        t["delta"], t["A"], t["B"], t["C"]),
                        y=jax.vmap(ssm.scan_sequential, in_axes=(0, 0, None, 0, 0, None))(
                        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"]))
                    for name, t in terms.items()}
        rows = [r for r in unified_rows(config, terms, config.cls_pos) if r is not None]
        stats = unified_channel_reduced_matrix(config, terms, clamp=True, budget=1)  # one channel per chunk
        out.append(dict(branches=branches, rows=jnp.stack(rows, 1), stats=stats))
    return M, out, inter["residual"]


@pytest.mark.parametrize("bimamba", ["v2", "v1", "none"])
def test_identities_float64(bimamba, x64):
    from convert.reference import causal_depthwise_conv1d, unified_cls_vectors_from_capture

    # v1 with the class token at 0: the backward row at L - 1, through the anticausal conv
    config = CFG.replace(bimamba=bimamba, depth=2, cls_token="head" if bimamba == "v1" else "middle")
    ref, params = _reference_and_params(config, dtype=jnp.float64)
    images = _images(config, dtype=jnp.float64)
    M, quantities, residual = _layer_quantities(config, params, images)
    if bimamba != "v1":  # the official code's vectors (the port covers v2 and one branch)
        with torch.no_grad():
            _, capture = ref.double()(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()), capture=True)
        official_vec = unified_cls_vectors_from_capture(capture, config.cls_pos).numpy()  # [layers, B, E, L]
    M = _np(M)                                                          # [B, layers, branches, E, L, L]
    n_branches = 1 if bimamba == "none" else 2
    L, E, K, pos = config.seq_len, config.d_inner, config.d_conv, config.cls_pos
    assert M.shape == (2, config.depth, n_branches, E, L, L) and M.dtype == np.float64
    check = lambda a, b, name: assert_close(a, b, rtol_of_max=_TOL_F64, scale_floor=1.0, name=name)  # noqa: E731
    for l, q in enumerate(quantities):
        assert sorted(q["branches"]) == sorted(("fwd", "bwd")[:n_branches])
        gated = []
        for b, name in enumerate(("fwd", "bwd")[:n_branches]):
            t = q["branches"][name]
            x, c, z, u, alpha, y = (_np(t[k]) for k in ("x", "c", "z", "u", "alpha", "y"))
            where = f"layer {l} {name}"
            # the recomputed pre-activation is the model's: silu(c) = the captured scan input u
            check(c / (1 + np.exp(-c)), u, f"{where}: silu(c) vs captured u")
            # T x + b = the causal depthwise conv (ours, and PyTorch's cross-correlation with K-1
            # left padding); v1's backward branch reads the forward conv reversed: J T J
            causal = not (bimamba == "v1" and name == "bwd")
            T = _np(conv_toeplitz(t["kernel"], L, causal=causal))                 # [E, L, L]
            Tx_b = np.einsum("ets,bse->bte", T, x) + _np(t["bias"])
            check(Tx_b, c, f"{where}: T x + b vs c")
            if causal:
                weight = torch.from_numpy(np.ascontiguousarray(_np(t["kernel"]).T[:, None, :]))
                torch_conv = causal_depthwise_conv1d(torch.from_numpy(x.copy()), weight,
                                                     torch.from_numpy(_np(t["bias"]).copy()))
                check(Tx_b, torch_conv, f"{where}: T x + b vs torch conv1d")
            # M in the branch's own order, against its defining product diag(silu z) alpha diag(sigmoid c) T
            M_own = M[:, l, b] if name == "fwd" else M[:, l, b, :, ::-1, ::-1]
            silu_z, sig_c = z / (1 + np.exp(-z)), 1 / (1 + np.exp(-c))
            check(M_own, np.einsum("bte,betj,bje,ejs->bets", silu_z, alpha, sig_c, T), f"{where}: M vs its product")
            # M x + silu(z) [alpha (sigmoid(c) b) + D u] = y silu(z), y from the sequential scan
            rest = silu_z * (np.einsum("betj,bje->bte", alpha, sig_c * _np(t["bias"])) + _np(t["D"]) * u)
            out = np.einsum("bets,bse->bte", M_own, x) + rest
            check(out, y * silu_z, f"{where}: M x + bias and D terms vs y silu(z)")
            gated.append(out if name == "fwd" else out[:, ::-1])
            # row cls_pos of M (original positions), computed without the L x L matrix
            check(q["rows"][:, b], M[:, l, b, :, pos, :], f"{where}: class-token row")
        if bimamba != "v1":  # fwd + flipped bwd rows = the PyTorch port of the official vector
            check(q["rows"].sum(1), official_vec[l], f"layer {l}: official class-token vector")
        # structure: the forward matrix is lower triangular, the backward one upper (original
        # positions); v1's backward scan reads the forward (causal) conv, so it reaches K - 1 back
        assert np.all(np.triu(M[:, l, 0], 1) == 0), f"layer {l}: forward M is not lower triangular"
        if n_branches == 2:
            below = K if bimamba == "v1" else 1
            assert np.all(np.tril(M[:, l, 1], -below) == 0), f"layer {l}: backward M is not upper triangular"
            assert bimamba != "v1" or np.any(np.tril(M[:, l, 1], -1) != 0)
        # the chunked channel statistics of max(w (M^f + J M^b J), 0) (exact mode's matrices)
        combined = np.maximum(branch_weight(config) * M[:, l].sum(1), 0.0)        # [B, E, L, L]
        for got, want, what in zip(q["stats"], (combined.mean(1), combined.min((1, 2, 3)),
                                               combined.max((1, 2, 3))), ("mean", "min", "max")):
            check(got, want, f"layer {l}: channel {what}")
        # out_proj(w (M_bi x + bias and D terms)) = the mixer output m_l = r_{l+1} - r_l
        if l + 1 < config.depth:
            m = branch_weight(config) * sum(gated) @ _np(params["layers"]["mixer"]["out_proj"]["kernel"][l])
            check(m, _np(residual[l + 1]) - _np(residual[l]), f"layer {l}: mixer output")


# =============================================================================
# selections, chunks, reductions and the exact mode, float32
# =============================================================================
@pytest.fixture(scope="module")
def tiny():
    return _params(CFG), _images(CFG, n=2)


def test_selection_and_chunking(tiny):
    params, images = tiny
    full = np.asarray(unified_attention(CFG, params, images))
    part = np.asarray(unified_attention(CFG, params, images, layers=[2, 0], channels=[3, 1], budget=1))
    assert part.shape == (2, 2, 2, 2, CFG.seq_len, CFG.seq_len)
    np.testing.assert_allclose(part[:, 0, :, 0], full[:, 2, :, 3], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(part[:, 1, :, 1], full[:, 0, :, 1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"layers \[3\] out of range"):
        unified_attention(CFG, params, images, layers=[3])
    with pytest.raises(ValueError, match="channels must be integer"):
        unified_attention(CFG, params, images, channels=[0.5])
    with pytest.raises(ValueError, match="one class token"):
        unified_class_token_rows(CFG.replace(cls_token="none"), params, images)
    with pytest.raises(ValueError, match="NCHW"):
        unified_attention(CFG, params, jnp.transpose(images, (0, 3, 1, 2)))


def _minmax(x):
    span = x.max(-1, keepdims=True) - x.min(-1, keepdims=True)
    return np.where(span > 0, (x - x.min(-1, keepdims=True)) / np.where(span > 0, span, 1), 0)


def _rollout_row(mats, pos):
    """mats [n, B, L, L] (earliest layer first) -> row pos of prod (I + A) row-normalized."""
    n, B, L, _ = mats.shape
    R = np.broadcast_to(np.eye(L), (B, L, L))
    for A in mats:
        Ml = A + np.eye(L)
        R = (Ml / Ml.sum(-1, keepdims=True)) @ R
    return R[:, pos]


# =============================================================================
# explain: jit, batches, other grids, targets
# =============================================================================
@pytest.mark.parametrize("mode", ["official", "exact"])
def test_explain_under_jit_on_another_grid(mode):
    """A 5 x 5 grid (L = 26, even; class token at 12), a batch of 3, one jitted explain with the
    target as an argument: finite maps >= 0, and the target matters (a gradient method, so the
    argument check must keep it). Batch vs single and jit vs eager: tests/test_methods.py.
    Exact mode, recomposed in numpy from the full matrices: the min-max scaled channel mean of
    max(w (M^f + J M^b J), 0), times the exact gradient relevance, in a true L x L rollout."""
    config, start = GRID5, 1
    params, images = _params(config, seed=3), _images(config, n=3, seed=4)
    top = jnp.argmax(vim_apply(config, params, images), -1)
    jitted = jax.jit(lambda p, x, t: explain(config, p, x, "unified_attribution", mode=mode, start_layer=start,
                                             target=t))
    maps = jitted(params, images, top)
    assert maps.shape == (3, 5, 5) and maps.dtype == jnp.float32
    assert np.isfinite(np.asarray(maps)).all() and float(maps.min()) >= 0 and float(maps.max()) > 0
    other = jitted(params, images, (top + 1) % config.num_classes)
    assert float(jnp.abs(other - maps).max()) > 1e-4 * float(maps.max())
    if mode != "exact":
        return
    M = np.asarray(unified_attention(config, params, images, layers=list(range(start, config.depth))), np.float64)
    combined = np.maximum(0.5 * (M[:, :, 0] + M[:, :, 1]), 0.0)                 # [B, n, E, L, L]
    lo, hi = combined.min((2, 3, 4))[..., None, None], combined.max((2, 3, 4))[..., None, None]
    scaled = (combined.mean(2) - lo) / (hi - lo)                                # [B, n, L, L]
    _, _, grads, _ = forward_with_gradients(config, params, images, top, start_layer=start)
    s = _minmax(np.maximum(np.asarray(_exact_gradients(grads, EXACT_GRADIENT), np.float64), 0).max(-1))  # [n, B, L]
    row = _rollout_row(scaled.transpose(1, 0, 2, 3) * s[:, :, None, :], config.cls_pos)
    expected = np.maximum(row[:, list(config.patch_positions)], 0).reshape(3, *config.grid)
    assert_close(maps, expected, rtol_of_max=1e-6, scale_floor=1.0, name="exact unified attribution")


# =============================================================================
# official mode vs the PyTorch port of the official code (five sample photos, Vim-T)
# =============================================================================
@pytest.fixture(scope="module")
def vim_t_on_photos():
    """A full-size random Vim-T in PyTorch and converted, the sample photos, and the reference's
    hook gradients and capture (computed once: the official mechanism, fused add + norm hooks)."""
    if not SAMPLE_IMAGES:
        pytest.skip("../shared/data/images is absent (only the development workspace has the sample photos)")
    from convert.checkpoint import load_checkpoint
    from convert.reference import VimReference, _hook_gradients_and_capture

    config = vim_tiny()
    torch.manual_seed(1)
    ref = VimReference(config).eval()
    with torch.no_grad():  # spread the parameters whose init is structured (as tests/parity does)
        for name, p in ref.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "conv1d.bias", "conv1d_b.bias", "D", "D_b")):
                p.add_(0.3 * torch.randn_like(p))
    _, params = load_checkpoint(ref.state_dict(), variant=config)
    images = np.stack([preprocess(p, config) for p in SAMPLE_IMAGES])
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    grads, capture = _hook_gradients_and_capture(ref, x, None)
    return config, params, images, grads, capture


def test_official_mode_matches_the_pytorch_port(vim_t_on_photos):
    from convert.reference import unified_map_from_capture

    config, params, images, grads, capture = vim_t_on_photos
    start = 15
    theirs = unified_map_from_capture(config, grads, capture, start).numpy()
    ours = np.asarray(explain(config, params, images, "unified_attribution", mode="official", start_layer=start))
    worst = assert_close(ours, theirs, rtol_of_max=1e-5, name="official unified attribution maps")
    # the class-token vectors themselves, layer by layer (combined: fwd + flipped bwd, no 1/2)
    # the comparison can fail: each official ablation switch (sigmoid(c), the conv, the gate) moves
    # the port's map far beyond the tolerance
    tol = 1e-5 * float(np.abs(theirs).max())
    moved = {}
    for ablate in ("act", "conv", "gate"):
        moved[ablate] = float(np.abs(unified_map_from_capture(config, grads, capture, start, (ablate,)).numpy()
                                     - ours).max())
        assert moved[ablate] > 100 * tol, f"dropping {ablate} changes the map by only {moved[ablate]:.2e}"
    print(f"\nunified official map: max |diff| {worst:.2e} (map max {float(theirs.max()):.3f}); ablations move "
          "it by " + ", ".join(f"{k} {v:.1e}" for k, v in moved.items()))


def test_port_rejects_bad_arguments():
    from convert.reference import VimReference, unified_attribution, unified_cls_vector_branch

    torch.manual_seed(0)
    x = torch.randn(1, 3, CFG.img_size, CFG.img_size)
    _, capture = VimReference(CFG)(x, capture=True)
    with pytest.raises(ValueError, match="unknown ablation"):
        unified_cls_vector_branch(capture["layers"][0]["fwd"], CFG.cls_pos, ("bias",))
    branch = {k: v for k, v in capture["layers"][0]["fwd"].items() if k != "c"}
    with pytest.raises(ValueError, match="pre-activation"):
        unified_cls_vector_branch(branch, CFG.cls_pos)
    with pytest.raises(ValueError, match="'v1'"):
        unified_attribution(VimReference(CFG.replace(bimamba="v1")), x, start_layer=0)
