"""Explainability for Vision Mamba: hidden attention, the three methods, evaluation, figures."""

from xai.hidden_attention import channel_mean_attention, class_token_attention, hidden_attention, map_hidden_attention
from xai.methods import METHODS, MODES, explain

__all__ = ["METHODS", "MODES", "channel_mean_attention", "class_token_attention", "explain", "hidden_attention",
           "map_hidden_attention"]
