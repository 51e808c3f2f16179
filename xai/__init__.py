"""Explainability for Vision Mamba and Mamba language models: hidden and unified attention, the methods,
evaluation, figures.

``hidden_attention``, ``unified_attention`` and ``lrp_relevance`` take either family: a
``MambaLMConfig`` with token ids [B, T], or a ``VimConfig`` with images (``xai.tokens``).
"""

from xai.app.demo import demo_model
from xai.app.lm_demo import demo_lm
from xai.eval.shapes import shapes_dataset
from xai.hidden_attention import channel_mean_attention, class_token_attention, map_hidden_attention
from xai.methods import METHODS, MODES, default_start_layer, explain
from xai.tokens import (
    TOKEN_METHODS,
    explain_tokens,
    hidden_attention,
    lm_hidden_attention,
    lm_lrp_relevance,
    lm_unified_attention,
    lrp_relevance,
    unified_attention,
)
from xai.unified import unified_class_token_rows

__all__ = ["METHODS", "MODES", "channel_mean_attention", "class_token_attention", "default_start_layer",
           "demo_model", "explain", "hidden_attention", "lrp_relevance", "map_hidden_attention", "shapes_dataset",
           "unified_attention", "unified_class_token_rows",
           "TOKEN_METHODS", "demo_lm", "explain_tokens", "lm_hidden_attention", "lm_lrp_relevance",
           "lm_unified_attention"]
