"""Configuration of a Vision Mamba ("Vim") classifier.

One frozen dataclass covers every constructor flag of the official
``VisionMamba`` (hustvl/Vim, ``vim/models_mamba.py``) that changes inference.
Derived quantities (token grid, class-token positions, sequence length) are
properties, so no code elsewhere hard-codes ``14 x 14`` or ``cls_pos = 98``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Bimamba = Literal["none", "v1", "v2"]
ClsToken = Literal["none", "head", "middle", "double"]
FinalPool = Literal["none", "mean", "max", "all"]

_BIMAMBA = ("none", "v1", "v2")
_CLS = ("none", "head", "middle", "double")
_POOL = ("none", "mean", "max", "all")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VimConfig:
    """Architecture of a Vim classifier.

    Attributes:
      embed_dim: model width D (``d_model``).
      depth: number of Mamba blocks.
      patch_size: side of the square patch-embedding convolution kernel.
      stride: stride of that convolution (16 = non-overlapping, 8 = overlapping).
      img_size: side of the square input image.
      channels: input image channels.
      num_classes: classifier outputs.
      d_state: SSM state size N.
      d_conv: causal depthwise convolution width.
      expand: inner width factor, E = expand * D.
      dt_rank: rank R of the delta projection; ``None`` means ceil(D / 16).
      rms_norm: RMSNorm (True, weight only) or LayerNorm (False, weight and bias).
      norm_eps: epsilon of every norm.
      residual_in_fp32: keep the residual stream in float32 (always true here:
        the JAX model computes the residual stream in float32 regardless).
      fused_add_norm: the official Block's fused add + norm (True for every official
        variant). It does not change the forward pass; it changes which gradient the
        official gradient hook sees (SPEC section 4): with the fused op, the residual
        the Block returns is an output of that op, so the hook gets only the gradient
        from the next block, d logit / d r_{l+1}; without it, d logit / d r_l.
      bimamba: "v2" = separate backward branch parameters (official Vim),
        "v1" = backward scan shares conv/projections, only ``A_b_log`` is its own,
        "none" = a plain causal Mamba.
      divide_out: for bimamba v2, average instead of summing the two branches.
      cls_token: "middle" (official), "head" (position 0), "double" (first and
        last position, averaged at the output) or "none".
      final_pool: used only without a class token: "none" = last token,
        "mean", "max" (max over per-token logits), "all" (per-token logits).
      abs_pos_embed: add a learned absolute position embedding.
      rope: rotary position embedding; no published checkpoint uses it.
      name: the official registered name, when the config is an official variant.
    """

    embed_dim: int = 192
    depth: int = 24
    patch_size: int = 16
    stride: int = 16
    img_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    rms_norm: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    bimamba: Bimamba = "v2"
    divide_out: bool = True
    cls_token: ClsToken = "middle"
    final_pool: FinalPool = "mean"
    abs_pos_embed: bool = True
    rope: bool = False
    name: str = ""

    def __post_init__(self):
        if self.bimamba not in _BIMAMBA:
            raise ValueError(f"bimamba must be one of {_BIMAMBA}, got {self.bimamba!r}")
        if self.cls_token not in _CLS:
            raise ValueError(f"cls_token must be one of {_CLS}, got {self.cls_token!r}")
        if self.final_pool not in _POOL:
            raise ValueError(f"final_pool must be one of {_POOL}, got {self.final_pool!r}")
        if self.rope:
            raise NotImplementedError("rope=True: no published Vim checkpoint uses rotary embeddings")
        if self.img_size < self.patch_size:
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        for field in ("embed_dim", "depth", "patch_size", "stride", "channels", "num_classes",
                      "d_state", "d_conv", "expand"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")

    # ---- derived quantities -------------------------------------------------
    @property
    def d_inner(self) -> int:
        """E, the inner (SSM channel) width."""
        return self.expand * self.embed_dim

    @property
    def conv_bias(self) -> bool:
        """The causal conv has a bias (every Vim does)."""
        return True

    @property
    def proj_bias(self) -> bool:
        """in_proj and out_proj have biases (no Vim does)."""
        return False

    @property
    def rank(self) -> int:
        """R, the delta projection rank (``dt_rank``, resolved)."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        n = (self.img_size - self.patch_size) // self.stride + 1
        return (n, n)

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def num_cls_tokens(self) -> int:
        return {"none": 0, "head": 1, "middle": 1, "double": 2}[self.cls_token]

    @property
    def seq_len(self) -> int:
        """L, tokens entering the Mamba blocks (patches + class tokens)."""
        return self.num_patches + self.num_cls_tokens

    @property
    def cls_positions(self) -> tuple[int, ...]:
        """Sequence positions of the class token(s); empty without one."""
        m = self.num_patches
        return {"none": (), "head": (0,), "middle": (m // 2,), "double": (0, m + 1)}[self.cls_token]

    @property
    def cls_pos(self) -> int:
        """The single class-token position used by the explanation methods."""
        if len(self.cls_positions) != 1:
            raise ValueError(
                f"the explanation methods need exactly one class token; cls_token={self.cls_token!r}")
        return self.cls_positions[0]

    @property
    def patch_positions(self) -> tuple[int, ...]:
        """Sequence positions of the patch tokens, in row-major grid order."""
        cls = set(self.cls_positions)
        return tuple(i for i in range(self.seq_len) if i not in cls)

    def replace(self, **changes) -> VimConfig:
        return dataclasses.replace(self, **changes)


# ---- the official variants (SPEC section 1) ---------------------------------
_OFFICIAL = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (192, 16),
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (192, 8),
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (384, 16),
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (384, 8),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": (768, 16),
}

OFFICIAL_NAMES: tuple[str, ...] = tuple(_OFFICIAL)


def official(name: str) -> VimConfig:
    """The config of an official registered model name (or a short alias:
    ``vim_tiny``, ``vim_tiny_stride8``, ``vim_small``, ``vim_small_stride8``, ``vim_base``)."""
    full = _ALIASES.get(name, name)
    if full not in _OFFICIAL:
        raise KeyError(f"unknown Vim variant {name!r}; known: {sorted(_ALIASES)} or {OFFICIAL_NAMES}")
    dim, stride = _OFFICIAL[full]
    return VimConfig(embed_dim=dim, depth=24, patch_size=16, stride=stride, name=full)


_ALIASES = {
    "vim_tiny": OFFICIAL_NAMES[0],
    "vim_tiny_stride8": OFFICIAL_NAMES[1],
    "vim_small": OFFICIAL_NAMES[2],
    "vim_small_stride8": OFFICIAL_NAMES[3],
    "vim_base": OFFICIAL_NAMES[4],
}


def vim_tiny(stride: int = 16) -> VimConfig:
    return official("vim_tiny" if stride == 16 else "vim_tiny_stride8")


def vim_small(stride: int = 16) -> VimConfig:
    return official("vim_small" if stride == 16 else "vim_small_stride8")


def vim_base() -> VimConfig:
    return official("vim_base")


# ---- the Mamba language model ------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaLMConfig:
    """Architecture of a Mamba-1 language model (state-spaces/mamba, transformers' MambaForCausalLM).

    Field names follow transformers' ``MambaConfig``; the properties below give the names the
    shared block (``mamba_jax.mixer``) reads, so Vim and the language model run the same code.

    Attributes:
      vocab_size: rows of the embedding matrix V (transformers' ``vocab_size``; for a state-spaces
        checkpoint the padded size, a multiple of ``pad_vocab_size_multiple``).
      hidden_size: model width D (``d_model``).
      state_size: SSM state size N (``d_state``).
      num_hidden_layers: number of Mamba blocks (``n_layer``).
      expand: inner width factor, E = expand * D (``intermediate_size``).
      conv_kernel: causal depthwise convolution width K (``d_conv``).
      time_step_rank: rank R of the delta projection; ``None`` (or "auto") means ceil(D / 16).
      layer_norm_epsilon: epsilon of every norm.
      use_bias: in_proj and out_proj have biases (``bias`` in state-spaces' ``ssm_cfg``).
      use_conv_bias: the causal conv has a bias (``conv_bias``).
      rms_norm: RMSNorm (True, every published checkpoint) or LayerNorm (weight and bias).
      tie_word_embeddings: the output head is the embedding matrix (True for every published
        checkpoint); False adds its own ``lm_head`` kernel [D, V].
      fused_add_norm: the official Block's fused add + norm; as for ``VimConfig`` it changes only
        which gradient the official-mode Mamba-Attribution reads (d logit / d r_{l+1}).
      residual_in_fp32: the residual stream is float32 (always, as for ``VimConfig``).
      name: a published model's name, when the config is one.
    """

    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 24
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | None = None
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    rms_norm: bool = True
    tie_word_embeddings: bool = True
    fused_add_norm: bool = True
    residual_in_fp32: bool = True
    name: str = ""

    def __post_init__(self):
        if self.time_step_rank == "auto":  # transformers' spelling of the default
            object.__setattr__(self, "time_step_rank", None)
        for field in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
                      "time_step_rank"):
            value = getattr(self, field)
            if value is None and field == "time_step_rank":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{field} must be positive, got {value}")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ValueError(f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")

    # ---- the names the shared block reads (mamba_jax.mixer) -------------------
    @property
    def embed_dim(self) -> int:
        """D, the model width (``hidden_size``)."""
        return self.hidden_size

    @property
    def depth(self) -> int:
        return self.num_hidden_layers

    @property
    def d_state(self) -> int:
        return self.state_size

    @property
    def d_conv(self) -> int:
        return self.conv_kernel

    @property
    def d_inner(self) -> int:
        """E, the inner (SSM channel) width (transformers' ``intermediate_size``)."""
        return self.expand * self.hidden_size

    @property
    def rank(self) -> int:
        """R, the delta projection rank (``time_step_rank``, resolved)."""
        return self.time_step_rank if self.time_step_rank is not None else math.ceil(self.hidden_size / 16)

    @property
    def conv_bias(self) -> bool:
        return self.use_conv_bias

    @property
    def proj_bias(self) -> bool:
        return self.use_bias

    @property
    def norm_eps(self) -> float:
        return self.layer_norm_epsilon

    @property
    def bimamba(self) -> str:
        """"none": one causal branch."""
        return "none"

    @property
    def divide_out(self) -> bool:
        return False

    @property
    def num_classes(self) -> int:
        """The outputs per position (the vocabulary)."""
        return self.vocab_size

    def replace(self, **changes) -> MambaLMConfig:
        return dataclasses.replace(self, **changes)


# The published Mamba-1 language models (state-spaces/mamba-*; the "-hf" repos hold the same
# weights in transformers' layout): (hidden_size, num_hidden_layers); vocabulary 50280 (50277
# padded to a multiple of 8), N = 16, expand 2, K = 4, R = ceil(D / 16), RMSNorm, tied head.
_MAMBA_LMS = {
    "mamba-130m": (768, 24),
    "mamba-370m": (1024, 48),
    "mamba-790m": (1536, 48),
    "mamba-1.4b": (2048, 48),
    "mamba-2.8b": (2560, 64),
}
MAMBA_LM_NAMES: tuple[str, ...] = tuple(_MAMBA_LMS)


def mamba_lm(name: str) -> MambaLMConfig:
    """The config of a published Mamba language model: ``mamba-130m`` .. ``mamba-2.8b`` (also
    with the hub prefix ``state-spaces/`` and the ``-hf`` suffix)."""
    short = name.removeprefix("state-spaces/").removesuffix("-hf")
    if short not in _MAMBA_LMS:
        raise KeyError(f"unknown Mamba language model {name!r}; known: {MAMBA_LM_NAMES}")
    hidden, layers = _MAMBA_LMS[short]
    return MambaLMConfig(hidden_size=hidden, num_hidden_layers=layers, name=short)
