"""Tests of convert/reference.py against independent oracles.

The oracles never call the reference's own SSM code: the scan and the forward pass are
re-derived in numpy float64 from SPEC's closed form (hidden attention), the official class
token vector is a literal loop transcription of SPEC section 3, and the methods of SPEC
section 4 are recomposed in numpy from explicit L x L matrices.

Tolerances (float64 everywhere unless stated), each of max(1, max |expected|)
(conftest.assert_close with scale_floor=1.0):
  _TOL_F64 = 1e-10  same maths, different summation order (sequential vs closed form)
  _TOL_FD  = 1e-6   central finite difference with step 1e-5 (truncation ~ step^2)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_close

from convert.reference import (
    VimReference,
    attention_rollout,
    cls_vectors_from_capture,
    full_attention_from_capture,
    hidden_attention,
    hook_gradients,
    mamba_attribution,
    official_cls_vector,
    official_full_attention,
    raw_attention,
    residual_gradients,
    rollout,
    selective_scan,
)
from mamba_jax.config import VimConfig, official

_TOL_F64 = 1e-10
_TOL_FD = 1e-6

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny models are thousands of small ops: intra-op threads only add contention
    (x10 slower on a loaded 2-core machine).  Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = VimConfig(embed_dim=12, depth=3, img_size=32, patch_size=8, stride=8, num_classes=5,
                 d_state=4, dt_rank=2)


def make_model(cfg: VimConfig, seed: int = 0) -> VimReference:
    """A float64 reference model with every parameter randomly perturbed (so D, A, the norm
    weights, the class token and pos_embed all differ from their structured init)."""
    torch.manual_seed(seed)
    model = VimReference(cfg).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith(("A_log", "A_b_log", "cls_token", "pos_embed")) else 0.2
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def images(cfg: VimConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, cfg.channels, cfg.img_size, cfg.img_size, generator=gen, dtype=torch.float64)


def np_sd(model: VimReference) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


# =============================================================================
# numpy float64 oracle of SPEC sections 2 and 3 (closed form, no recurrence)
# =============================================================================
def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_alpha(delta, A, B, C):
    """SPEC's closed form: alpha[d, t, j] = sum_n C_t[n] exp(A[d,n](S_t - S_j)) delta_j[d] B_j[n], j <= t.
    delta: [L, E]; A: [E, N]; B, C: [L, N] -> [E, L, L]."""
    length = delta.shape[0]
    S = np.cumsum(delta, axis=0)                                   # [L, E]
    mask = np.tril(np.ones((length, length), dtype=bool))          # [t, j]
    diff = np.where(mask[..., None], S[:, None, :] - S[None, :, :], 0.0)   # [t, j, E]
    decay = np.exp(diff[..., None] * A)                            # [t, j, E, N]
    alpha = np.einsum("tn,tjen,je,jn->etj", C, decay, delta, B)
    return alpha * mask


def np_scan(u, delta, A, B, C, D):
    """y_t = sum_{j<=t} alpha[:, t, j] u_j + D u_t (unbatched, [L, E])."""
    return np.einsum("etj,je->te", np_alpha(delta, A, B, C), u) + D * u


def np_norm(x, sd, prefix, cfg):
    w = sd[prefix + ".weight"]
    if cfg.rms_norm:
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * w + sd[prefix + ".bias"]


def np_tokens(sd, cfg, img):
    """Patch embedding by explicit patch dot products, class token(s), pos_embed. img: [C, H, W]."""
    w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    p, s = cfg.patch_size, cfg.stride
    gh, gw = cfg.grid
    toks = [np.tensordot(w, img[:, r * s:r * s + p, c * s:c * s + p], axes=3) + b
            for r in range(gh) for c in range(gw)]
    m = len(toks)
    if cfg.cls_token == "middle":
        toks = toks[: m // 2] + [sd["cls_token"][0, 0]] + toks[m // 2:]
    elif cfg.cls_token == "head":
        toks = [sd["cls_token"][0, 0]] + toks
    elif cfg.cls_token == "double":
        toks = [sd["cls_token_head"][0, 0]] + toks + [sd["cls_token_tail"][0, 0]]
    t = np.stack(toks)
    if cfg.abs_pos_embed:
        t = t + sd["pos_embed"][0]
    return t


def np_mixer(h, sd, i, cfg):
    P = f"layers.{i}.mixer."
    E, N, R, K = cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
    length = h.shape[0]
    xz = h @ sd[P + "in_proj.weight"].T
    x, z = xz[:, :E], xz[:, E:]

    def ssm_inputs(x, sfx):
        w, b = sd[P + f"conv1d{sfx}.weight"][:, 0, :], sd[P + f"conv1d{sfx}.bias"]
        xp = np.concatenate([np.zeros((K - 1, E)), x])
        conv = np.stack([sum(w[:, k] * xp[t + k] for k in range(K)) + b for t in range(length)])
        u = np_silu(conv)
        dbl = u @ sd[P + f"x_proj{sfx}.weight"].T
        dt_low, Bm, Cm = dbl[:, :R], dbl[:, R:R + N], dbl[:, R + N:]
        delta = np.logaddexp(0.0, dt_low @ sd[P + f"dt_proj{sfx}.weight"].T + sd[P + f"dt_proj{sfx}.bias"])
        return u, delta, Bm, Cm

    u, delta, Bm, Cm = ssm_inputs(x, "")
    A = -np.exp(sd[P + "A_log"])
    out = np_scan(u, delta, A, Bm, Cm, sd[P + "D"]) * np_silu(z)
    if cfg.bimamba == "v2":
        ub, db, Bb, Cb = ssm_inputs(x[::-1], "_b")
        out_b = np_scan(ub, db, -np.exp(sd[P + "A_b_log"]), Bb, Cb, sd[P + "D_b"]) * np_silu(z[::-1])
        out = out + out_b[::-1]
        if cfg.divide_out:
            out = out / 2
    elif cfg.bimamba == "v1":
        out_b = np_scan(u[::-1], delta[::-1], -np.exp(sd[P + "A_b_log"]), Bm[::-1], Cm[::-1],
                        sd[P + "D"]) * np_silu(z[::-1])
        out = out + out_b[::-1]
    return out @ sd[P + "out_proj.weight"].T


def np_head(sd, cfg, final):
    def head(v):
        return v @ sd["head.weight"].T + sd["head.bias"]
    pos = cfg.cls_positions
    if len(pos) == 1:
        return head(final[pos[0]])
    if len(pos) == 2:
        return head((final[pos[0]] + final[pos[1]]) / 2)
    return {"none": lambda: head(final[-1]), "mean": lambda: head(final.mean(0)),
            "max": lambda: head(final).max(0), "all": lambda: head(final)}[cfg.final_pool]()


def np_forward(sd, cfg, img):
    hidden = np_tokens(sd, cfg, img)
    residual = None
    for i in range(cfg.depth):
        residual = hidden if residual is None else residual + hidden
        hidden = np_mixer(np_norm(residual, sd, f"layers.{i}.norm", cfg), sd, i, cfg)
    return np_head(sd, cfg, np_norm(residual + hidden, sd, "norm_f", cfg))


# =============================================================================
# SSM math
# =============================================================================
def test_sequential_scan_matches_closed_form():
    rng = np.random.default_rng(0)
    bt, length, E, N = 2, 13, 5, 3
    u = rng.normal(size=(bt, length, E))
    delta = np.logaddexp(0, rng.normal(size=(bt, length, E)))
    A = -np.exp(rng.normal(size=(E, N)))
    B, C = rng.normal(size=(bt, length, N)), rng.normal(size=(bt, length, N))
    D = rng.normal(size=E)
    t = torch.from_numpy
    y = selective_scan(t(u), t(delta), t(A), t(B), t(C), t(D))
    expected = np.stack([np_scan(u[b], delta[b], A, B[b], C[b], D) for b in range(bt)])
    assert_close(y, expected, rtol_of_max=_TOL_F64, scale_floor=1.0, name="scan")
    alpha = hidden_attention(t(delta), t(A), t(B), t(C))
    assert_close(alpha, np.stack([np_alpha(delta[b], A, B[b], C[b]) for b in range(bt)]),
                 rtol_of_max=_TOL_F64, scale_floor=1.0, name="alpha")


@pytest.mark.parametrize("bimamba", ["v2", "v1", "none"])
def test_hidden_attention_identity_on_captured_branches(bimamba):
    """y = alpha u + D u, both branches, in original positions (bwd flipped on both axes)."""
    cfg = TINY.replace(bimamba=bimamba)
    model = make_model(cfg)
    _, cap = model(images(cfg), capture=True)
    for layer in range(cfg.depth):
        fwd, bwd = full_attention_from_capture(cap, layer)
        f = cap["layers"][layer]["fwd"]
        assert_close(f["y"], torch.einsum("bdtj,bjd->btd", fwd, f["u"]) + f["D"] * f["u"],
                     rtol_of_max=_TOL_F64, scale_floor=1.0, name="fwd")
        assert torch.all(fwd.triu(1) == 0)
        if bimamba == "none":
            assert bwd is None and "bwd" not in cap["layers"][layer]
            continue
        b = cap["layers"][layer]["bwd"]
        u_orig = b["u"].flip(1)
        y_orig = torch.einsum("bdtj,bjd->btd", bwd, u_orig) + b["D"] * u_orig
        assert_close(b["y"].flip(1), y_orig, rtol_of_max=_TOL_F64, scale_floor=1.0, name="bwd")
        assert torch.all(bwd.tril(-1) == 0)


def test_official_full_attention_dtype_and_shape():
    model = make_model(TINY)
    fwd, bwd = official_full_attention(model, images(TINY), layer=1)
    L, E = TINY.seq_len, TINY.d_inner
    assert fwd.dtype == bwd.dtype == torch.float32
    assert fwd.shape == bwd.shape == (2, E, L, L)


# =============================================================================
# forward pass
# =============================================================================
FLAG_COMBOS = [
    dict(),
    dict(divide_out=False),
    dict(bimamba="v1"),
    dict(bimamba="none"),
    dict(cls_token="head", rms_norm=False),
    dict(cls_token="double"),
    dict(cls_token="none", final_pool="none"),
    dict(cls_token="none", final_pool="mean", rms_norm=False),
    dict(cls_token="none", final_pool="max"),
    dict(cls_token="none", final_pool="all"),
    dict(abs_pos_embed=False),
    dict(img_size=24),                                   # 3 x 3 grid: L = 10 even, cls at 4
    dict(stride=4, depth=2),                             # overlapping patches: 7 x 7 grid
    dict(d_conv=2, expand=1, d_state=3, dt_rank=None, bimamba="v1", cls_token="head"),
]


def _flag_id(flags):
    return ",".join(f"{k}={v}" for k, v in flags.items()) or "default"


@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=_flag_id)
def test_forward_matches_numpy_oracle(flags):
    cfg = TINY.replace(**flags)
    model = make_model(cfg, seed=3)
    x = images(cfg)
    logits, cap = model(x, capture=True)
    sd = np_sd(model)
    expected = np.stack([np_forward(sd, cfg, img) for img in x.numpy()])
    assert_close(logits, expected, rtol_of_max=_TOL_F64, scale_floor=1.0, name=f"logits {flags}")
    assert_close(model(x), logits, atol=0.0, name="capture does not change logits")
    L, D = cfg.seq_len, cfg.embed_dim
    assert len(cap["residual"]) == len(cap["layers"]) == cfg.depth
    assert all(r.shape == (2, L, D) for r in cap["residual"])
    tokens = np.stack([np_tokens(sd, cfg, img) for img in x.numpy()])
    assert_close(cap["residual"][0], tokens, rtol_of_max=_TOL_F64, scale_floor=1.0, name="r_0")


@pytest.mark.parametrize("cls_token,pool", [("middle", "mean"), ("head", "mean"), ("double", "mean"),
                                            ("none", "none"), ("none", "mean"), ("none", "max")])
def test_zero_out_proj_logits_are_head_of_normed_tokens(cls_token, pool):
    """With out_proj = 0 every mixer outputs 0, so logits = head(norm_f(tokens)) at the class token."""
    cfg = TINY.replace(cls_token=cls_token, final_pool=pool)
    model = make_model(cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.zero_()
    x = images(cfg)
    sd = np_sd(model)
    out = []
    for img in x.numpy():
        t = np_tokens(sd, cfg, img)
        final = t / np.sqrt((t ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * sd["norm_f.weight"]
        logits_tok = final @ sd["head.weight"].T + sd["head.bias"]       # head is affine
        if cls_token in ("middle", "head"):
            out.append(logits_tok[cfg.cls_pos])
        elif cls_token == "double":
            out.append((logits_tok[0] + logits_tok[-1]) / 2)
        else:
            out.append({"none": logits_tok[-1], "mean": logits_tok.mean(0), "max": logits_tok.max(0)}[pool])
    assert_close(model(x), np.stack(out), rtol_of_max=_TOL_F64, scale_floor=1.0, name="zero mixer")


# =============================================================================
# state dict
# =============================================================================
def spec_vim_tiny_shapes():
    """SPEC section 1, Vim-tiny: D=192, E=384, N=16, R=12, L=197, 24 layers."""
    shapes = {
        "patch_embed.proj.weight": (192, 3, 16, 16), "patch_embed.proj.bias": (192,),
        "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192),
        "head.weight": (1000, 192), "head.bias": (1000,), "norm_f.weight": (192,),
    }
    for i in range(24):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (192,)
        shapes[p + "mixer.in_proj.weight"] = (768, 192)
        shapes[p + "mixer.out_proj.weight"] = (192, 384)
        for sfx in ("", "_b"):
            shapes[p + f"mixer.conv1d{sfx}.weight"] = (384, 1, 4)
            shapes[p + f"mixer.conv1d{sfx}.bias"] = (384,)
            shapes[p + f"mixer.x_proj{sfx}.weight"] = (44, 384)
            shapes[p + f"mixer.dt_proj{sfx}.weight"] = (384, 12)
            shapes[p + f"mixer.dt_proj{sfx}.bias"] = (384,)
        shapes[p + "mixer.A_log"] = shapes[p + "mixer.A_b_log"] = (384, 16)
        shapes[p + "mixer.D"] = shapes[p + "mixer.D_b"] = (384,)
    return shapes


def test_state_dict_matches_spec_vim_tiny():
    sd = VimReference(official("vim_tiny")).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_vim_tiny_shapes()
    sd8 = VimReference(official("vim_tiny_stride8")).state_dict()
    assert sd8["pos_embed"].shape == (1, 730, 192)


def test_state_dict_variants():
    def keys(**flags):
        return set(VimReference(TINY.replace(**flags)).state_dict())
    base = keys()
    mixer_b = {k for k in base if "_b." in k or k.endswith(("A_b_log", "D_b"))}
    assert len(mixer_b) == TINY.depth * 7   # conv1d_b w+b, x_proj_b, dt_proj_b w+b, A_b_log, D_b
    assert keys(bimamba="none") == base - mixer_b
    assert keys(bimamba="v1") == (base - mixer_b) | {f"layers.{i}.mixer.A_b_log" for i in range(TINY.depth)}
    ln = keys(rms_norm=False)
    assert ln - base == {f"layers.{i}.norm.bias" for i in range(TINY.depth)} | {"norm_f.bias"}
    assert keys(cls_token="double") == (base - {"cls_token"}) | {"cls_token_head", "cls_token_tail"}
    assert keys(cls_token="none") == base - {"cls_token"}
    assert keys(abs_pos_embed=False) == base - {"pos_embed"}
    double = VimReference(TINY.replace(cls_token="double")).state_dict()
    assert double["pos_embed"].shape[1] == TINY.seq_len + 1


def test_strict_load_round_trip():
    cfg = TINY.replace(bimamba="v1", rms_norm=False)
    src = make_model(cfg, seed=1)
    dst = VimReference(cfg).double()
    dst.load_state_dict(src.state_dict(), strict=True)
    x = images(cfg)
    assert_close(dst(x), src(x), atol=0.0, name="round trip")
    bad = dict(src.state_dict())
    del bad["layers.0.mixer.A_b_log"]
    with pytest.raises(RuntimeError, match="layers.0.mixer.A_b_log"):
        dst.load_state_dict(bad, strict=True)


def test_float32_runs():
    model = VimReference(TINY)
    logits = model(images(TINY).float())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# =============================================================================
# official class-token vector: literal transcription of SPEC section 3
# =============================================================================
def np_cls_vector_literal(fwd, bwd, cls_pos):
    """Loops over (b, d, j, n) and the product index k, as written in SPEC.
    bwd tensors are first re-indexed to ORIGINAL positions (array[::-1]); the backward vector
    at p > cls is sum_n Cb_cls[n] prod_{k=cls+1}^{p-1} exp(Db_k A_b) Db_p Bb_p[n]."""
    delta, A, B, C = (fwd[k].detach().numpy() for k in ("delta", "A", "B", "C"))
    bt, length, E = delta.shape
    N = A.shape[1]
    v = np.zeros((bt, E, length))
    for b in range(bt):
        for d in range(E):
            for j in range(cls_pos):
                total = 0.0
                for n in range(N):
                    prod = 1.0
                    for k in range(j + 1, cls_pos):
                        prod *= math.exp(delta[b, k, d] * A[d, n])
                    total += C[b, cls_pos, n] * prod * delta[b, j, d] * B[b, j, n]
                v[b, d, j] = total
    if bwd is None:
        return v
    Db, Ab = bwd["delta"].detach().numpy()[:, ::-1], bwd["A"].detach().numpy()
    Bb, Cb = bwd["B"].detach().numpy()[:, ::-1], bwd["C"].detach().numpy()[:, ::-1]
    for b in range(bt):
        for d in range(E):
            for p in range(cls_pos + 1, length):
                total = 0.0
                for n in range(N):
                    prod = 1.0
                    for k in range(cls_pos + 1, p):
                        prod *= math.exp(Db[b, k, d] * Ab[d, n])
                    total += Cb[b, cls_pos, n] * prod * Db[b, p, d] * Bb[b, p, n]
                v[b, d, p] = total
    return v


@pytest.mark.parametrize("flags", [dict(), dict(img_size=24), dict(cls_token="head"),
                                   dict(bimamba="v1"), dict(bimamba="none")],
                         ids=["middle-oddL", "middle-evenL", "head", "v1", "none"])
def test_official_cls_vector_brute_force(flags):
    cfg = TINY.replace(depth=2, embed_dim=8, d_state=3, **flags)
    model = make_model(cfg, seed=5)
    x = images(cfg)
    v = official_cls_vector(model, x)
    _, cap = model(x, capture=True)
    assert v.shape == (cfg.depth, 2, cfg.d_inner, cfg.seq_len)
    for layer, branches in enumerate(cap["layers"]):
        expected = np_cls_vector_literal(branches["fwd"], branches.get("bwd"), cfg.cls_pos)
        assert_close(v[layer], expected, rtol_of_max=_TOL_F64, scale_floor=1.0, name=f"cls vector layer {layer}")
        assert torch.all(v[layer][..., cfg.cls_pos] == 0)


def test_cls_vector_differs_from_exact_alpha_only_by_the_cls_factor():
    """Sanity link to the exact alpha: with delta_cls -> 0 the omitted factor exp(delta_cls A) -> 1."""
    model = make_model(TINY)
    x = images(TINY)
    c = TINY.cls_pos
    with torch.no_grad():
        _, cap = model(x, capture=True)
        f = cap["layers"][0]["fwd"]
        f["delta"][:, c] = 0.0
        v = cls_vectors_from_capture({"layers": [{"fwd": f}]}, c)[0]
        alpha = hidden_attention(f["delta"], f["A"], f["B"], f["C"])
    assert_close(v[..., :c], alpha[:, :, c, :c], rtol_of_max=_TOL_F64, scale_floor=1.0, name="fwd row cls")


# =============================================================================
# rollout and the three methods
# =============================================================================
def test_rollout_rank_one_hand_example():
    # a_0 = [1, 0, 0]: M_0 = rows [2,0,0]/2, [1,1,0]/2, [1,0,1]/2
    # a_1 = [0, 0, 1]: M_1 = rows [1,0,1]/2, [0,1,1]/2, [0,0,2]/2
    # R = M_1 M_0 (later layer on the left)
    a = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]], dtype=torch.float64)
    expected = np.array([[0.75, 0.0, 0.25], [0.5, 0.25, 0.25], [0.5, 0.0, 0.5]])
    assert_close(rollout(a)[0], expected, rtol_of_max=_TOL_F64, scale_floor=1.0, name="rollout")
    # a single layer with a = [0.1, 0.2, 0.3]: rows (e_i + a) / 1.6
    one = rollout(torch.tensor([[[0.1, 0.2, 0.3]]], dtype=torch.float64))[0]
    assert_close(one, np.array([[1.1, 0.2, 0.3], [0.1, 1.2, 0.3], [0.1, 0.2, 1.3]]) / 1.6,
                 rtol_of_max=_TOL_F64, scale_floor=1.0, name="one")


def np_minmax(x):
    return (x - x.min()) / (x.max() - x.min())


def np_rollout_row(a_layers, cls_pos):
    length = a_layers[0].shape[0]
    R = np.eye(length)
    for a in a_layers:
        M = np.eye(length) + np.ones((length, 1)) * a[None, :]
        M = M / M.sum(1, keepdims=True)
        R = M @ R
    return R[cls_pos]


def np_to_map(row, cfg):
    return np.clip(np.delete(row, cfg.cls_pos), 0, None).reshape(cfg.grid)


@pytest.mark.parametrize("flags", [dict(), dict(cls_token="head", img_size=24), dict(bimamba="v1")])
def test_methods_match_numpy_recomposition(flags):
    cfg = TINY.replace(depth=4, **flags)
    start = 1
    model = make_model(cfg, seed=7)
    x = images(cfg, n=3)
    v = official_cls_vector(model, x).numpy()                   # [depth, Bt, E, L]
    # the official hook of layer l sees d logit / d r_{l+1} (fused add + norm, SPEC section 4),
    # taken here from the probes, a mechanism independent of the hooks the reference uses
    g = residual_gradients(model, x).numpy()[1:]                # [depth, Bt, L, D]
    raw, roll, attr = (m(model, x, start_layer=start).numpy()
                       for m in (raw_attention, attention_rollout, mamba_attribution))
    for b in range(x.shape[0]):
        layers = range(start, cfg.depth)
        raw_row = np.mean([np_minmax(v[i, b]).mean(0) for i in layers], axis=0)
        assert_close(raw[b], np_to_map(raw_row, cfg), rtol_of_max=_TOL_F64, scale_floor=1.0, name="raw")
        roll_row = np_rollout_row([v[i, b].mean(0) for i in layers], cfg.cls_pos)
        assert_close(roll[b], np_to_map(roll_row, cfg), rtol_of_max=_TOL_F64, scale_floor=1.0, name="rollout")
        f = [np_minmax(np.clip(v[i, b], 0, None)).mean(0) * np_minmax(np.clip(g[i, b], 0, None).max(-1))
             for i in layers]
        assert_close(attr[b], np_to_map(np_rollout_row(f, cfg.cls_pos), cfg),
                     rtol_of_max=_TOL_F64, scale_floor=1.0, name="attribution")


def test_residual_gradients_finite_difference():
    cfg = TINY
    model = make_model(cfg, seed=2)
    x = images(cfg)
    target = [1, 3]
    g = residual_gradients(model, x, target=target)
    assert g.shape == (cfg.depth + 1, 2, cfg.seq_len, cfg.embed_dim)
    gen = torch.Generator().manual_seed(9)
    eps = 1e-5
    for layer in range(cfg.depth + 1):  # r_0 .. r_depth (the last enters norm_f)
        V = torch.randn(2, cfg.seq_len, cfg.embed_dim, generator=gen, dtype=torch.float64)

        def logit(s, layer=layer, V=V):
            probes = [s * V if i == layer else torch.zeros_like(V) for i in range(cfg.depth + 1)]
            out = model(x, residual_probes=probes)
            return out[torch.arange(2), torch.tensor(target)]

        with torch.no_grad():
            fd = (logit(eps) - logit(-eps)) / (2 * eps)
        assert_close((g[layer] * V).sum((1, 2)), fd,
                     rtol_of_max=_TOL_FD, scale_floor=1.0, name=f"d logit / d r_{layer}")


def test_target_int_and_default_argmax():
    model = make_model(TINY)
    x = images(TINY)
    top = model(x).argmax(-1)
    assert_close(residual_gradients(model, x), residual_gradients(model, x, target=top), atol=0.0, name="argmax")
    g2 = residual_gradients(model, x, target=2)
    assert_close(g2, residual_gradients(model, x, target=[2, 2]), atol=0.0, name="int")
    with pytest.raises(ValueError):
        residual_gradients(model, x, target=[0, 1, 2])


@pytest.mark.parametrize("fused", [True, False])
def test_hook_sees_next_residual_gradient_when_fused(fused):
    """The official Block's hook on the residual it returns: with the fused add + norm (one op,
    two outputs) it receives d logit / d r_{l+1}; with separate ops, d logit / d r_l. The probe
    gradients (total derivatives, finite-difference checked above) are the oracle."""
    cfg = TINY.replace(fused_add_norm=fused)
    model = make_model(cfg, seed=3)
    x = images(cfg)
    hooks = hook_gradients(model, x, target=[1, 3])
    total = residual_gradients(model, x, target=[1, 3])
    expected = total[1:] if fused else total[:-1]
    for layer in range(cfg.depth):
        assert_close(hooks[layer], expected[layer],
                     rtol_of_max=_TOL_F64, scale_floor=1.0, name=f"hook of layer {layer}")
    # the two readings differ on this model, so the check above can tell them apart
    other = total[:-1] if fused else total[1:]
    assert float((hooks - other).abs().max()) > 1e-3 * float(other.abs().max())


@pytest.mark.parametrize("rms_norm", [True, False])
def test_fused_add_norm_keeps_the_forward_and_parameter_gradients(rms_norm):
    """The fused op changes what the hook sees, nothing else: same logits, same weight grads."""
    cfg = TINY.replace(rms_norm=rms_norm)
    fused, plain = make_model(cfg, seed=5), make_model(cfg.replace(fused_add_norm=False), seed=5)
    x = images(cfg)
    out_f, out_p = fused(x), plain(x)
    assert_close(out_f, out_p, rtol_of_max=_TOL_F64, scale_floor=1.0, name="logits")
    out_f[:, 1].sum().backward()
    out_p[:, 1].sum().backward()
    for (name, p_f), (_, p_p) in zip(fused.named_parameters(), plain.named_parameters()):
        assert_close(p_f.grad, p_p.grad, rtol_of_max=_TOL_F64, scale_floor=1.0, name=f"grad of {name}")


@pytest.mark.parametrize("method", [raw_attention, attention_rollout, mamba_attribution])
def test_maps_per_image_equal_batch_of_one(method):
    cfg = TINY.replace(depth=3)
    model = make_model(cfg, seed=4)
    x = images(cfg, n=3)
    maps = method(model, x, start_layer=1)
    assert maps.shape == (3, *cfg.grid)
    assert torch.all(maps >= 0)
    for i in range(3):
        single = method(model, x[i:i + 1], start_layer=1)[0]
        assert_close(maps[i], single, rtol_of_max=_TOL_F64, scale_floor=1.0, name=f"{method.__name__} image {i}")


def test_start_layer_validated():
    model = make_model(TINY)
    with pytest.raises(ValueError, match="start_layer"):
        raw_attention(model, images(TINY), start_layer=TINY.depth)
