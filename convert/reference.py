"""Pure-PyTorch reference Vision Mamba ("Vim") and the official explainability methods.

This file is the independent oracle for the JAX model: it imports nothing from
``mamba_jax`` except the config, runs on CPU without custom kernels, in float32
or float64 (``model.double()``), and its ``state_dict()`` has exactly the keys
and shapes of the official hustvl/Vim checkpoints (SPEC section 1), so
``model.load_state_dict(official_sd, strict=True)`` works.  Clarity over speed:
the selective scan is an explicit loop over time.

Glossary (code name -> paper symbol; shapes with Bt = batch, L = tokens,
D = model width, E = inner width, N = state size, R = delta rank):

    tokens, residual   residual stream r_l entering layer l's norm      [Bt, L, D]
    h                  normed residual RMSNorm_l(r_l)                    [Bt, L, D]
    x, z               the two halves of in_proj(h)                     [Bt, L, E]
    u                  silu(causal conv(x)), the scan input u_t          [Bt, L, E]
    dt_low             the rank-R delta projection input                 [Bt, L, R]
    delta              Delta_t = softplus(W_dt dt_low + b_dt)            [Bt, L, E]
    A                  A = -exp(A_log)                                   [E, N]
    B, C               input / output matrices B_t, C_t                  [Bt, L, N]
    D                  skip D                                            [E]
    h_state            SSM state h_t                                     [Bt, E, N]
    y                  scan output y_t (before the silu(z) gate)         [Bt, L, E]
    alpha              hidden attention alpha[d, t, j]                   [Bt, E, L, L]
    cls vector         official truncated class-token row of alpha       [Bt, E, L]
    c                  conv(x) + conv bias, the pre-activation (u = silu(c))  [Bt, L, E]
    unified vector     row cls of the unified implicit attention
                       diag(silu(z)) alpha diag(sigmoid(c)) T (SPEC section 6)  [Bt, E, L]

Deliberate deviations from the official code are marked ``# deviation:``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba_jax.config import VimConfig

__all__ = [
    "VimReference",
    "attention_rollout",
    "causal_depthwise_conv1d",
    "cls_vector_branch",
    "cls_vectors_from_capture",
    "full_attention_from_capture",
    "hidden_attention",
    "hook_gradients",
    "mamba_attribution",
    "official_cls_vector",
    "official_full_attention",
    "raw_attention",
    "residual_gradients",
    "rollout",
    "selective_scan",
    "unified_attribution",
    "unified_cls_vector_branch",
    "unified_cls_vectors_from_capture",
    "unified_map_from_capture",
]


# =============================================================================
# Pure SSM mathematics (token-major tensors, batch first)
# =============================================================================
def causal_depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise convolution with left zero padding K-1.

    out[b, t, e] = bias[e] + sum_{k<K} weight[e, 0, k] * x[b, t - (K-1) + k, e]
    (x at negative times is 0).  x: [Bt, L, E]; weight: [E, 1, K]; returns [Bt, L, E].
    """
    k = weight.shape[-1]
    xt = F.pad(x.transpose(1, 2), (k - 1, 0))                    # [Bt, E, L + K - 1]
    out = F.conv1d(xt, weight, bias, groups=weight.shape[0])     # [Bt, E, L]
    return out.transpose(1, 2)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """The selective scan as an explicit loop over time.

        h_t = exp(delta_t * A) * h_{t-1} + (delta_t * B_t) * u_t,   h_{-1} = 0
        y_t = h_t @ C_t + D * u_t

    u, delta: [Bt, L, E]; A: [E, N]; B, C: [Bt, L, N]; D: [E].  Returns y: [Bt, L, E].
    """
    bt, length, e = u.shape
    h_state = u.new_zeros(bt, e, A.shape[-1])
    ys = []
    for t in range(length):
        d_t = delta[:, t, :, None]                                # [Bt, E, 1]
        A_bar = torch.exp(d_t * A)                                # [Bt, E, N]
        B_bar_u = d_t * B[:, t, None, :] * u[:, t, :, None]       # [Bt, E, N]
        h_state = A_bar * h_state + B_bar_u
        ys.append((h_state * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, dim=1)


def hidden_attention(delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Exact hidden attention of one branch, in that branch's own order (SPEC section 3).

        alpha[b, d, t, j] = sum_n C_t[n] exp(A[d, n] (S_t - S_j)) delta_j[d] B_j[n]   (j <= t, else 0)

    with S_t - S_j = sum_{k=j+1}^{t} delta_k (summed directly, no cumsum difference).
    delta: [Bt, L, E]; A: [E, N]; B, C: [Bt, L, N].  Returns [Bt, E, L, L], lower triangular,
    so that y = alpha @ u + D * u.
    """
    bt, length, e = delta.shape
    rows = []
    for t in range(length):
        d = delta[:, : t + 1]                                     # [Bt, t+1, E]
        # seg[:, j] = sum_{k=j+1}^{t} delta_k  (0 for j = t)
        seg = torch.cat([d[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(d[:, :1])], dim=1)
        decay = torch.exp(seg[..., None] * A)                     # [Bt, t+1, E, N]
        row = torch.einsum("bn,bjdn,bjd,bjn->bdj", C[:, t], decay, d, B[:, : t + 1])
        rows.append(F.pad(row, (0, length - t - 1)))              # [Bt, E, L]
    return torch.stack(rows, dim=2)


def cls_vector_branch(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, cls_pos: int) -> Tensor:
    """Official truncated class-token vector of one branch, in that branch's own order.

        v[b, d, j] = sum_n C_c[n] * prod_{k=j+1}^{c-1} exp(delta_k[d] A[d, n]) * delta_j[d] B_j[n]   for j < c
        v[b, d, j] = 0                                                                              for j >= c

    with c = cls_pos.  The product stops at c-1 (it omits exp(delta_c A), which the exact
    alpha[d, c, j] contains) and the diagonal j = c is never computed (SPEC section 3).
    delta: [Bt, L, E]; A: [E, N]; B, C: [Bt, L, N].  Returns [Bt, E, L].
    """
    bt, length, e = delta.shape
    C_c = C[:, cls_pos, None, :]                                  # [Bt, 1, N]
    prod = delta.new_ones(bt, e, A.shape[-1])                     # empty product for j = c-1
    cols = [delta.new_zeros(bt, e)] * length
    for j in range(cls_pos - 1, -1, -1):
        d_j = delta[:, j, :, None]                                # [Bt, E, 1]
        cols[j] = (C_c * prod * d_j * B[:, j, None, :]).sum(-1)
        prod = prod * torch.exp(d_j * A)                          # now prod_{k=j}^{c-1}
    return torch.stack(cols, dim=-1)


# =============================================================================
# Modules (parameter names = official state-dict keys)
# =============================================================================
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(cfg: VimConfig) -> nn.Module:
    if cfg.rms_norm:
        return RMSNorm(cfg.embed_dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)


class _PatchEmbed(nn.Module):
    """Conv2d(channels -> D, kernel patch_size, stride), flattened row-major."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.channels, cfg.embed_dim, cfg.patch_size, cfg.stride)

    def forward(self, x: Tensor) -> Tensor:                       # [Bt, C, H, W] -> [Bt, M, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class Mixer(nn.Module):
    """The bidirectional Mamba mixer of Vim (bimamba "v2", "v1" or "none")."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        d, e, n, r, k = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.out_proj = nn.Linear(e, d, bias=False)

        def conv():
            return nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=True)

        def s4d_real_a_log():
            return nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))

        self.conv1d = conv()
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = s4d_real_a_log()
        self.D = nn.Parameter(torch.ones(e))
        if cfg.bimamba in ("v1", "v2"):
            self.A_b_log = s4d_real_a_log()
        if cfg.bimamba == "v2":
            self.conv1d_b = conv()
            self.x_proj_b = nn.Linear(e, r + 2 * n, bias=False)
            self.dt_proj_b = nn.Linear(r, e, bias=True)
            self.D_b = nn.Parameter(torch.ones(e))
        self._init_dt()

    @torch.no_grad()
    def _init_dt(self):
        """Official-style dt init: bias = softplus^{-1}(dt), dt log-uniform in [1e-3, 1e-1]."""
        for dt_proj in [self.dt_proj] + ([self.dt_proj_b] if self.cfg.bimamba == "v2" else []):
            nn.init.uniform_(dt_proj.weight, -self.cfg.rank ** -0.5, self.cfg.rank ** -0.5)
            dt = torch.exp(torch.rand(self.cfg.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _ssm_inputs(self, x: Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear):
        """x: [Bt, L, E] -> u, delta [Bt, L, E]; B, C [Bt, L, N]; c [Bt, L, E] (conv pre-activation)."""
        n, r = self.cfg.d_state, self.cfg.rank
        c = causal_depthwise_conv1d(x, conv.weight, conv.bias)
        u = F.silu(c)
        dt_low, B, C = torch.split(x_proj(u), [r, n, n], dim=-1)
        delta = F.softplus(dt_proj(dt_low))                       # softplus(W_dt dt_low + b_dt)
        return u, delta, B, C, c

    @staticmethod
    def _scan(u, delta, A, B, C, D, z, capture: dict | None, key: str) -> Tensor:
        """Runs the scan and gates: returns y * silu(z) [Bt, L, E]; records the branch."""
        y = selective_scan(u, delta, A, B, C, D)
        if capture is not None:
            capture[key] = dict(u=u, delta=delta, B=B, C=C, z=z, y=y, A=A, D=D)
        return y * F.silu(z)

    def forward(self, h: Tensor, capture: dict | None = None) -> Tensor:
        """h: [Bt, L, D] -> [Bt, L, D].  With ``capture`` (a dict), fills capture["fwd"] and
        (bimamba v1/v2) capture["bwd"], the latter in the backward branch's flipped order."""
        x, z = self.in_proj(h).chunk(2, dim=-1)                   # [Bt, L, E] each
        u, delta, B, C, c = self._ssm_inputs(x, self.conv1d, self.x_proj, self.dt_proj)
        A = -torch.exp(self.A_log)
        out = self._scan(u, delta, A, B, C, self.D, z, capture, "fwd")
        if capture is not None:  # what the unified attention adds: the conv's pre-activation and kernel
            capture["fwd"].update(c=c, conv_weight=self.conv1d.weight)
        bimamba = self.cfg.bimamba
        if bimamba == "v2":
            x_b, z_b = x.flip(1), z.flip(1)
            u_b, delta_b, B_b, C_b, c_b = self._ssm_inputs(x_b, self.conv1d_b, self.x_proj_b, self.dt_proj_b)
            A_b = -torch.exp(self.A_b_log)
            out_b = self._scan(u_b, delta_b, A_b, B_b, C_b, self.D_b, z_b, capture, "bwd")
            if capture is not None:
                capture["bwd"].update(c=c_b, conv_weight=self.conv1d_b.weight)
            out = out + out_b.flip(1)
            if self.cfg.divide_out:
                out = out / 2
        elif bimamba == "v1":
            # official bimamba_inner_fn: conv / x_proj / dt_proj computed once, backward scan on the
            # flipped tensors with its own A_b and the SAME D; the sum is never divided.
            A_b = -torch.exp(self.A_b_log)
            out_b = self._scan(u.flip(1), delta.flip(1), A_b, B.flip(1), C.flip(1), self.D, z.flip(1),
                               capture, "bwd")
            out = out + out_b.flip(1)
        return self.out_proj(out)


def _apply_norm(norm: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``norm``'s function with explicit parameters (RMSNorm or LayerNorm)."""
    if isinstance(norm, RMSNorm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * weight
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


class _FusedAddNorm(torch.autograd.Function):
    """The official fused add + norm (mamba_ssm's ``rms_norm_fn`` / ``layer_norm_fn`` with
    ``prenorm=True``) as ONE autograd op with two outputs: (norm(r), r), r = residual + hidden.

    This is what decides which gradient the official Block's hook sees. The hook is registered
    on the second output r; autograd hands a tensor hook only the gradient arriving at that
    tensor from its own consumers, and r's only consumer is the next block's add (or the final
    add + norm_f). The gradient that flows through this block's norm and mixer goes to the op's
    first output and, inside ``backward``, into the op's inputs, never past the hook. So the
    hook of layer l holds d logit / d r_{l+1}, not d logit / d r_l (SPEC section 4).
    """

    @staticmethod
    def forward(ctx, hidden, residual, weight, bias, norm):
        r = hidden if residual is None else residual + hidden
        ctx.norm, ctx.has_residual = norm, residual is not None
        ctx.save_for_backward(r, weight, bias)
        return _apply_norm(norm, r, weight, bias), r

    @staticmethod
    def backward(ctx, grad_normed, grad_r):
        r, weight, bias = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (r, weight, bias)]
        with torch.enable_grad():
            normed = _apply_norm(ctx.norm, *leaves)
            wanted = [t for t in leaves if t is not None]
            grads = list(torch.autograd.grad(normed, wanted, grad_normed))
        g_r = grads.pop(0) + grad_r  # total gradient of r: through this norm and through r's consumers
        g_weight = grads.pop(0)
        g_bias = grads.pop(0) if bias is not None else None
        return g_r, (g_r if ctx.has_residual else None), g_weight, g_bias, None


class Block(nn.Module):
    """One official Block: add + norm, mixer; returns (mixer output, residual).

    With ``cfg.fused_add_norm`` (every official model) the add and the norm are one autograd op
    with two outputs (``_FusedAddNorm``); without it they are separate ops and the returned
    residual also feeds this block's norm. As the official Block does, a gradient hook is
    registered on the returned residual and stores what it receives in ``self.gradients``.
    """

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.fused_add_norm = cfg.fused_add_norm
        self.norm = _norm(cfg)
        self.mixer = Mixer(cfg)
        self.gradients: Tensor | None = None

    def save_gradients(self, grad: Tensor) -> None:
        self.gradients = grad

    def forward(self, hidden: Tensor, residual: Tensor | None, capture: dict | None = None,
                probe: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """hidden: the previous mixer output (the embedded tokens for the first block);
        residual: the previous residual (None for the first block). ``probe`` (zeros) is added
        to the new residual r_l: its gradient is the total d out / d r_l."""
        if probe is not None:
            hidden = hidden + probe
        if self.fused_add_norm:
            normed, residual = _FusedAddNorm.apply(hidden, residual, self.norm.weight,
                                                   getattr(self.norm, "bias", None), self.norm)
        else:
            residual = hidden if residual is None else residual + hidden
            normed = self.norm(residual)
        out = self.mixer(normed, capture)
        if residual.requires_grad:
            residual.register_hook(self.save_gradients)
        return out, residual


class VimReference(nn.Module):
    """Vision Mamba classifier; ``state_dict()`` = the official keys and shapes.

    ``forward(x, capture=False, residual_probes=None)``:
      x: [Bt, channels, H, W] (NCHW, converted to the module's dtype).
      Returns logits [Bt, classes] ([Bt, L, classes] for final_pool="all" without a class
      token) or, with capture=True, ``(logits, capture)`` where capture is

        {"residual": [r_0, ..., r_{depth-1}]   each [Bt, L, D], r_l entering layer l's norm
                                               (in the autograd graph; includes the probe),
         "layers":   [{"fwd": branch, "bwd": branch}, ...]   one dict per layer; "bwd" absent
                                               for bimamba "none",
         "final":    [Bt, L, D]                norm_f(r_{depth-1} + m_{depth-1})}

      and a branch is {"u", "delta", "z", "y": [Bt, L, E], "B", "C": [Bt, L, N],
      "A": [E, N] (= -exp(A_log)), "D": [E]}, the backward branch's tensors in its own
      (flipped) order: its position i is original position L-1-i. Branches with their own conv
      (bimamba v2 and none) also hold "c" [Bt, L, E] (the conv's pre-activation, u = silu(c))
      and "conv_weight" [E, 1, K], for the unified attention.
      ``residual_probes``: optional sequence of depth (or depth + 1) tensors [Bt, L, D]
      (zeros) added to r_l (entry depth: to r_depth, the residual stream entering norm_f);
      the gradient of a logit w.r.t. probe l is the total d logit / d r_l.
      After a backward pass, ``layers[l].gradients`` holds what the official Block's hook
      receives (``hook_gradients``).
    """

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = _PatchEmbed(cfg)
        if cfg.cls_token == "double":
            self.cls_token_head = nn.Parameter(torch.zeros(1, 1, d))
            self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, d))
        elif cfg.cls_token in ("head", "middle"):
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, d))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_f = _norm(cfg)
        self.head = nn.Linear(d, cfg.num_classes)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith(("cls_token", "pos_embed")):
                    nn.init.trunc_normal_(p, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding, class token(s), position embedding: [Bt, C, H, W] -> [Bt, L, D]."""
        cfg = self.cfg
        t = self.patch_embed(x.to(self.dtype))                    # [Bt, M, D]
        bt, m = t.shape[:2]
        if cfg.cls_token == "middle":
            t = torch.cat([t[:, : m // 2], self.cls_token.expand(bt, -1, -1), t[:, m // 2:]], dim=1)
        elif cfg.cls_token == "head":
            t = torch.cat([self.cls_token.expand(bt, -1, -1), t], dim=1)
        elif cfg.cls_token == "double":
            t = torch.cat([self.cls_token_head.expand(bt, -1, -1), t,
                           self.cls_token_tail.expand(bt, -1, -1)], dim=1)
        if cfg.abs_pos_embed:
            t = t + self.pos_embed
        return t

    def pool_and_head(self, final: Tensor) -> Tensor:
        """final: [Bt, L, D] (normed) -> logits."""
        cfg = self.cfg
        pos = cfg.cls_positions
        if len(pos) == 1:
            return self.head(final[:, pos[0]])
        if len(pos) == 2:
            return self.head((final[:, pos[0]] + final[:, pos[1]]) / 2)
        # deviation: the official code also applies final_pool="max" after a class token
        # (a max over classes); here final_pool only matters without a class token.
        if cfg.final_pool == "none":
            return self.head(final[:, -1])
        if cfg.final_pool == "mean":
            return self.head(final.mean(1))
        if cfg.final_pool == "max":
            return self.head(final).amax(1)
        return self.head(final)                                   # "all": [Bt, L, classes]

    def forward(self, x: Tensor, capture: bool = False,
                residual_probes: Sequence[Tensor] | None = None):
        hidden = self.embed(x)
        residual = None
        cap: dict = {"residual": [], "layers": []}
        for i, layer in enumerate(self.layers):
            branches: dict | None = {} if capture else None
            probe = None if residual_probes is None else residual_probes[i]
            hidden, residual = layer(hidden, residual, branches, probe)
            if capture:
                cap["residual"].append(residual)
                cap["layers"].append(branches)
        r_final = residual + hidden   # r_depth: the official final add + norm_f (prenorm=False)
        if residual_probes is not None and len(residual_probes) > self.cfg.depth:
            r_final = r_final + residual_probes[self.cfg.depth]
        final = self.norm_f(r_final)
        logits = self.pool_and_head(final)
        if not capture:
            return logits
        cap["final"] = final
        return logits, cap


# =============================================================================
# Official explainability quantities (SPEC sections 3 and 4)
# =============================================================================
def cls_vectors_from_capture(capture: dict, cls_pos: int) -> Tensor:
    """Combined official class-token vectors of every captured layer: [depth, Bt, E, L].

    Positions 0..cls_pos-1 come from the forward branch (``cls_vector_branch`` with c = cls_pos),
    position cls_pos is 0, positions cls_pos+1..L-1 from the backward branch.

    Backward-branch index convention: the backward branch's tensors are in reversed order
    (index i = original position L-1-i).  Its class token sits at c_b = L-1-cls_pos there
    (= cls_pos for a middle token when L is odd, as in every official model), the vector is
    ``cls_vector_branch(..., c_b)`` in reversed order (nonzero for i < c_b) and is flipped
    back, so in original positions p > cls_pos it reads

        v[d, p] = sum_n C^b_cls[n] * prod_{k=cls_pos+1}^{p-1} exp(delta^b_k[d] A_b[d, n])
                  * delta^b_p[d] * B^b_p[n]

    (all backward tensors re-indexed to original positions).  The two supports are disjoint.
    Without a backward branch (bimamba "none") positions after cls_pos are 0.
    """
    out = []
    for branches in capture["layers"]:
        f = {k: v.detach() for k, v in branches["fwd"].items()}
        v = cls_vector_branch(f["delta"], f["A"], f["B"], f["C"], cls_pos)
        if "bwd" in branches:
            b = {k: t.detach() for k, t in branches["bwd"].items()}
            length = b["delta"].shape[1]
            v = v + cls_vector_branch(b["delta"], b["A"], b["B"], b["C"], length - 1 - cls_pos).flip(-1)
        out.append(v)
    return torch.stack(out)


@torch.no_grad()
def official_cls_vector(model: VimReference, x: Tensor) -> Tensor:
    """Official truncated class-token vectors, one per layer: [depth, Bt, E, L].

    See ``cls_vectors_from_capture`` for the index conventions.  x: [Bt, C, H, W].
    """
    _, capture = model(x, capture=True)
    return cls_vectors_from_capture(capture, model.cfg.cls_pos)


def full_attention_from_capture(capture: dict, layer: int) -> tuple[Tensor, Tensor | None]:
    """Exact alpha of one captured layer in original positions: (fwd, bwd), each [Bt, E, L, L].

    fwd is lower triangular; bwd is computed on the reversed sequence and flipped on both
    axes (upper triangular), None for bimamba "none".  y_fwd = fwd @ u + D u and
    flip(y_bwd) = bwd @ flip(u_bwd) + D_b flip(u_bwd).
    """
    branches = capture["layers"][layer]
    f = branches["fwd"]
    fwd = hidden_attention(f["delta"], f["A"], f["B"], f["C"])
    bwd = None
    if "bwd" in branches:
        b = branches["bwd"]
        bwd = hidden_attention(b["delta"], b["A"], b["B"], b["C"]).flip(-1, -2)
    return fwd, bwd


@torch.no_grad()
def official_full_attention(model: VimReference, x: Tensor, layer: int,
                            dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
    """Exact alpha matrices of ``layer`` (the official attention-matrix figure): (fwd, bwd),
    each [Bt, E, L, L] in ``dtype`` (computed in the model's dtype).

    # deviation: the official code computes these in float16; the default here is float32.
    """
    _, capture = model(x, capture=True)
    fwd, bwd = full_attention_from_capture(capture, layer)
    return fwd.to(dtype), None if bwd is None else bwd.to(dtype)


def _minmax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(x - min) / (max - min) over ``dims`` (no epsilon, as the official code: a constant
    tensor gives NaN)."""
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo)


def rollout(a: Tensor) -> Tensor:
    """The official rank-one rollout.  a: [n_layers, Bt, L] (earliest layer first).

    M_l = I + 1 a_l^T (every row i is e_i + a_l), each row divided by its sum;
    R = M_{n-1} ... M_1 M_0 (later layers on the left).  Returns R: [Bt, L, L].
    """
    length = a.shape[-1]
    eye = torch.eye(length, dtype=a.dtype, device=a.device)
    joint = None
    for a_l in a:
        m = eye + a_l[:, None, :]                                 # [Bt, L, L]
        m = m / m.sum(-1, keepdim=True)
        joint = m if joint is None else m @ joint
    return joint


def _to_map(row: Tensor, cfg: VimConfig) -> Tensor:
    """[Bt, L] -> [Bt, grid_h, grid_w]: drop the class position(s), clamp(min=0), row-major."""
    idx = torch.tensor(cfg.patch_positions, device=row.device)
    return row[:, idx].clamp(min=0).reshape(row.shape[0], *cfg.grid)


def _check_start(cfg: VimConfig, start_layer: int):
    if not 0 <= start_layer < cfg.depth:
        raise ValueError(f"start_layer must be in [0, {cfg.depth}), got {start_layer}")


def _target_index(logits: Tensor, target: int | Sequence[int] | Tensor | None) -> Tensor:
    """Per-image class index [Bt]: argmax (None), one int for all, or one per image."""
    bt = logits.shape[0]
    if target is None:
        return logits.argmax(-1)
    if isinstance(target, int):
        return torch.full((bt,), target, dtype=torch.long, device=logits.device)
    t = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if t.shape[0] != bt:
        raise ValueError(f"target has {t.shape[0]} entries for a batch of {bt}")
    return t


def _gradients_and_capture(model: VimReference, x: Tensor, target) -> tuple[Tensor, dict]:
    """One forward with capture and zero probes: d logit_target / d r_l for l = 0..depth."""
    cfg = model.cfg
    bt = x.shape[0]
    probes = [torch.zeros(bt, cfg.seq_len, cfg.embed_dim, dtype=model.dtype, device=x.device,
                          requires_grad=True) for _ in range(cfg.depth + 1)]
    with torch.enable_grad():
        logits, capture = model(x, capture=True, residual_probes=probes)
        selected = _selected_logits(logits, target)
        grads = torch.autograd.grad(selected, probes)
    return torch.stack(grads), capture


def _selected_logits(logits: Tensor, target) -> Tensor:
    """The sum over the batch of each image's target logit (images are independent, so its
    gradient is each image's own gradient)."""
    if logits.ndim != 2:
        raise ValueError("attribution needs logits [Bt, classes] (final_pool='all' has per-token logits)")
    idx = _target_index(logits, target)
    return logits.gather(1, idx[:, None]).sum()


def residual_gradients(model: VimReference, x: Tensor,
                       target: int | Sequence[int] | Tensor | None = None) -> Tensor:
    """The total derivatives d logit_target / d r_l for l = 0..depth: [depth + 1, Bt, L, D]
    (r_l enters layer l's norm; r_depth enters norm_f), from zero probes added to the stream.

    target: None = argmax per image, an int for all images, or one index per image.
    """
    return _gradients_and_capture(model, x, target)[0]


def _hook_gradients_and_capture(model: VimReference, x: Tensor, target) -> tuple[Tensor, dict]:
    """The official mechanism: forward, ``zero_grad``, backward of the target logit, then read
    every Block's hook (``Block.gradients``)."""
    for layer in model.layers:
        layer.gradients = None
    with torch.enable_grad():
        x = x.to(model.dtype).requires_grad_(True)   # as the official ``image.requires_grad_()``
        logits, capture = model(x, capture=True)
        selected = _selected_logits(logits, target)
        model.zero_grad()
        selected.backward()
    model.zero_grad()
    return torch.stack([layer.gradients for layer in model.layers]), capture


def hook_gradients(model: VimReference, x: Tensor,
                   target: int | Sequence[int] | Tensor | None = None) -> Tensor:
    """g_l as the official Mamba-Attribution reads it: what each Block's gradient hook on its
    returned residual receives after ``backward`` of the target logit: [depth, Bt, L, D].

    With ``cfg.fused_add_norm`` (every official model) this is d logit / d r_{l+1} (r_depth:
    the residual stream entering norm_f); without it, d logit / d r_l (see ``_FusedAddNorm``).
    """
    return _hook_gradients_and_capture(model, x, target)[0]


@torch.no_grad()
def raw_attention(model: VimReference, x: Tensor, start_layer: int = 15) -> Tensor:
    """Raw-Attention (official): per layer min-max normalize the CLS vector over [E, L] of each
    image, mean over channels; mean over layers >= start_layer; drop cls; clamp(min=0).
    Returns [Bt, grid_h, grid_w]."""
    cfg = model.cfg
    _check_start(cfg, start_layer)
    v = official_cls_vector(model, x)[start_layer:]               # [n, Bt, E, L]
    a = _minmax(v, (-2, -1)).mean(-2)                             # [n, Bt, L]
    return _to_map(a.mean(0), cfg)


@torch.no_grad()
def attention_rollout(model: VimReference, x: Tensor, start_layer: int = 15) -> Tensor:
    """Attn-Rollout (official): a_l = channel mean of the un-normalized CLS vector, rank-one
    rollout from start_layer, row cls_pos, drop cls, clamp(min=0).  Returns [Bt, grid_h, grid_w]."""
    cfg = model.cfg
    _check_start(cfg, start_layer)
    a = official_cls_vector(model, x)[start_layer:].mean(-2)      # [n, Bt, L]
    return _to_map(rollout(a)[:, cfg.cls_pos], cfg)


def mamba_attribution(model: VimReference, x: Tensor,
                      target: int | Sequence[int] | Tensor | None = None,
                      start_layer: int = 15) -> Tensor:
    """Mamba-Attribution (official):
        s_l = minmax_L(max_features clamp(g_l, min=0)),  g_l = ``hook_gradients`` (the Block hook)
        a_l = mean_E(minmax_{E,L}(clamp(CLS vector_l, min=0)))
        f_l = a_l * s_l; rank-one rollout from start_layer; row cls_pos; drop cls; clamp(min=0).
    Returns [Bt, grid_h, grid_w]."""
    cfg = model.cfg
    _check_start(cfg, start_layer)
    grads, capture = _hook_gradients_and_capture(model, x, target)
    with torch.no_grad():
        s = _minmax(grads[start_layer:].clamp(min=0).amax(-1), (-1,))          # [n, Bt, L]
        v = cls_vectors_from_capture(capture, cfg.cls_pos)[start_layer:]       # [n, Bt, E, L]
        a = _minmax(v.clamp(min=0), (-2, -1)).mean(-2)                         # [n, Bt, L]
        return _to_map(rollout(a * s)[:, cfg.cls_pos], cfg)


# =============================================================================
# Unified implicit attention (SPEC section 6; official: Itamarzimm/UnifiedImplicitAttnRepr)
# =============================================================================
UNIFIED_ABLATIONS = ("act", "conv", "gate")


def unified_cls_vector_branch(branch: dict, cls_pos: int, ablate: Sequence[str] = ()) -> Tensor:
    """The official unified class-token vector of one branch, in that branch's own order: [Bt, E, L].

    Port of the official ``compute_last_attn_vector(..., numlines=1)`` and the lines after it
    (mamba_ssm/ops/selective_scan_interface.py of the official repository), with c = cls_pos:

        a_j    = sum_n C_c[n] * prod_{k=j+1}^{c} exp(delta_k A) * delta_j B_j[n]   for j <= c, else 0
                 (row c of the exact alpha: diagonal included, decay up to c)
        temp_j = a_j * sigmoid(c_j)                  (c_j: the conv's pre-activation)
        v[j]   = silu(z_c) * sum_{s<K} temp_{j+s} w[K-1-s]   (the conv as a matrix, applied to the row)

    which is row c of diag(silu(z)) alpha diag(sigmoid(c)) T. ``ablate``: the official code's
    switches, each removing one factor: "act" (sigmoid(c)), "conv" (T), "gate" (silu(z_c)).
    branch: a captured branch (``VimReference(..., capture=True)``), with "c" and "conv_weight".
    """
    unknown = [a for a in ablate if a not in UNIFIED_ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; expected any of {UNIFIED_ABLATIONS}")
    if "c" not in branch:
        raise ValueError("the branch has no conv pre-activation 'c': the official unified attention covers "
                         "bimamba 'v2' and 'none' (bimamba 'v1' shares one conv between the scans)")
    delta, A, B, C = branch["delta"], branch["A"], branch["B"], branch["C"]
    bt, length, e = delta.shape
    dA = torch.exp(delta[..., None] * A)                          # [Bt, L, E, N]
    dB = delta[..., None] * B[:, :, None, :]                      # [Bt, L, E, N]
    C_c = C[:, cls_pos, None, :]                                  # [Bt, 1, N]
    attn = delta.new_zeros(bt, e, length)
    # deviation: the official code recomputes each product prod_{k=j+1}^{c} with a cumprod (O(L^2));
    # a running product from the class token back gives the same products in O(L)
    prod = torch.ones_like(dA[:, 0])                              # empty product for j = c
    for j in range(cls_pos, -1, -1):
        attn[:, :, j] = (C_c * prod * dB[:, j]).sum(-1)
        prod = prod * dA[:, j]                                    # now prod_{k=j}^{c}
    temp = attn if "act" in ablate else attn * torch.sigmoid(branch["c"].transpose(1, 2))
    weight = branch["conv_weight"]                                # [E, 1, K]
    k = weight.shape[-1]
    if "conv" in ablate:
        conv = temp
    else:
        # official: padding=4 and [..., 4:L+4], i.e. K for Vim's K = 4
        conv = F.conv1d(temp, weight.flip(-1).to(temp.dtype), groups=e, padding=k)[..., k:length + k]
    if "gate" in ablate:
        return conv
    gate = F.silu(branch["z"][:, cls_pos])                        # [Bt, E]
    return gate[..., None] * conv


def unified_cls_vectors_from_capture(capture: dict, cls_pos: int, layers: Sequence[int] | None = None,
                                     ablate: Sequence[str] = ()) -> Tensor:
    """The official combined unified class-token vectors, [n_layers, Bt, E, L] (all layers by default):
    vec = vec_fwd + flip(vec_bwd), no 1/2, no out_proj, as the official Mamba mixer stores it.

    The backward vector is computed on the reversed sequence at L - 1 - cls_pos.
    # deviation: the official code hard-codes 98 in both orders (the class token's reversed
    # position only for odd L with the token in the middle, as in every official model).
    Then, as the official segmentation script does, positions after cls_pos are overwritten with
    the backward vector alone (a no-op: the forward vector is 0 there).
    """
    all_layers = capture["layers"]
    out = []
    for i in range(len(all_layers)) if layers is None else layers:
        branches = {name: {k: v.detach() for k, v in br.items()} for name, br in all_layers[i].items()}
        v = unified_cls_vector_branch(branches["fwd"], cls_pos, ablate)
        if "bwd" in branches:
            length = v.shape[-1]
            v_b = unified_cls_vector_branch(branches["bwd"], length - 1 - cls_pos, ablate).flip(-1)
            v = v + v_b
            v[..., cls_pos + 1:] = v_b[..., cls_pos + 1:]
        out.append(v)
    return torch.stack(out)


def unified_map_from_capture(cfg: VimConfig, grads: Tensor, capture: dict, start_layer: int = 15,
                             ablate: Sequence[str] = ()) -> Tensor:
    """The official unified explanation map from a captured forward and the hooks' gradients
    (``grads`` [depth, Bt, L, D], ``hook_gradients``): per layer l >= start_layer

        v_l = clamp(combined unified vector_l, min=0)                       [Bt, E, L]
        s_l = minmax_L(max_features clamp(g_l, min=0))
        a_l = minmax_L(mean_E(v_l) * s_l)

    rank-one rollout, row cls_pos, drop cls, clamp(min=0) (official imagenet_seg_eval.py,
    ``generate_ours``). Returns [Bt, grid_h, grid_w]. ``ablate``: see ``unified_cls_vector_branch``.
    """
    _check_start(cfg, start_layer)
    layers = range(start_layer, cfg.depth)
    with torch.no_grad():
        v = unified_cls_vectors_from_capture(capture, cfg.cls_pos, layers, ablate).clamp(min=0)  # [n, Bt, E, L]
        s = _minmax(grads[start_layer:].clamp(min=0).amax(-1), (-1,))                           # [n, Bt, L]
        a = _minmax(v.sum(-2) / v.shape[-2] * s, (-1,))                                         # [n, Bt, L]
        return _to_map(rollout(a)[:, cfg.cls_pos], cfg)


def unified_attribution(model: VimReference, x: Tensor,
                        target: int | Sequence[int] | Tensor | None = None,
                        start_layer: int = 15) -> Tensor:
    """The official unified-attention attribution (SPEC section 6): ``unified_map_from_capture``
    with the gradients of the official Block hooks after ``backward`` of the target logit.

    # deviation: the official backward of its fused branch returns partly uninitialized memory
    # (SPEC section 6); the exact autograd gradient is used, with the fused-hook semantics.
    Returns [Bt, grid_h, grid_w].
    """
    cfg = model.cfg
    _check_start(cfg, start_layer)
    if cfg.bimamba == "v1":
        raise ValueError("the official unified attention covers bimamba 'v2' and 'none', not 'v1'")
    grads, capture = _hook_gradients_and_capture(model, x, target)
    return unified_map_from_capture(cfg, grads, capture, start_layer)
