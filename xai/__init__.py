"""Explainability for Vision Mamba: hidden attention, the three methods, evaluation, figures."""

from xai.app.demo import demo_model
from xai.eval.shapes import shapes_dataset
from xai.hidden_attention import channel_mean_attention, class_token_attention, hidden_attention, map_hidden_attention
from xai.methods import METHODS, MODES, default_start_layer, explain

__all__ = ["METHODS", "MODES", "channel_mean_attention", "class_token_attention", "default_start_layer",
           "demo_model", "explain", "hidden_attention", "map_hidden_attention", "shapes_dataset"]
