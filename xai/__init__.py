"""Explainability for Vision Mamba: hidden attention, the three methods, evaluation, figures."""

from xai.hidden_attention import hidden_attention
from xai.methods import METHODS, MODES, explain

__all__ = ["METHODS", "MODES", "explain", "hidden_attention"]
