"""The table between Mamba language-model checkpoints and Flax parameter paths, and their configs.

Two PyTorch layouts hold the same weights:

    transformers ("hf")       backbone.embeddings.weight, backbone.layers.{i}.{norm, mixer.*},
                              backbone.norm_f.weight, lm_head.weight (left out when tied);
                              config.json of ``MambaConfig`` (hidden_size, num_hidden_layers, ...)
    state-spaces (mamba_ssm)  backbone.embedding.weight, the rest as above (lm_head.weight kept,
                              equal to the embedding); config.json with d_model, n_layer,
                              vocab_size (padded up to pad_vocab_size_multiple), ssm_cfg, ...

Every Flax leaf has exactly one key (``LM_GLOBAL_TABLE``, ``LM_LAYER_TABLE``); per-layer keys are
stacked along the leading axis of ``params["layers"]``; layouts as in ``convert.mapping``
(``linear`` transposes, ``conv1d`` [E, 1, K] -> [K, E]). A tied head has no Flax leaf of its
own: a checkpoint's ``lm_head.weight`` must then equal the embedding.

Config fields are read from an explicit whitelist: the fields that set the architecture
(``_HF_FIELDS``, ``_SS_FIELDS``), cross-checked duplicates, fields that must hold one value
(``hidden_act`` "silu", no attention layers or MLPs in a state-spaces config), and fields that
do not change the forward pass (initialization, training, generation, bookkeeping). Any other
field is a ``CheckpointError`` naming it: a config this converter does not understand is not
silently half-read.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import jax
import numpy as np

from convert.mapping import CheckpointError, Table, key_report
from mamba_jax.config import MambaLMConfig
from mamba_jax.lm import init_lm_params

HF, STATE_SPACES = "hf", "state-spaces"
FORMATS = (HF, STATE_SPACES)
EMBEDDING_KEY = {HF: "backbone.embeddings.weight", STATE_SPACES: "backbone.embedding.weight"}

# (key template in the transformers layout, Flax path, layout); "{i}" marks a per-layer key.
_LM_GLOBAL = [
    ("backbone.embeddings.weight", ("embeddings", "embedding"), "same"),
    ("backbone.norm_f.weight", ("norm_f", "weight"), "same"),
    ("backbone.norm_f.bias", ("norm_f", "bias"), "same"),  # LayerNorm models only
    ("lm_head.weight", ("lm_head", "kernel"), "linear"),  # untied heads only
]
_LM_LAYER = [
    ("backbone.layers.{i}.norm.weight", ("norm", "weight"), "same"),
    ("backbone.layers.{i}.norm.bias", ("norm", "bias"), "same"),  # LayerNorm models only
    ("backbone.layers.{i}.mixer.in_proj.weight", ("mixer", "in_proj", "kernel"), "linear"),
    ("backbone.layers.{i}.mixer.in_proj.bias", ("mixer", "in_proj", "bias"), "same"),  # use_bias only
    ("backbone.layers.{i}.mixer.conv1d.weight", ("mixer", "conv1d", "kernel"), "conv1d"),
    ("backbone.layers.{i}.mixer.conv1d.bias", ("mixer", "conv1d", "bias"), "same"),  # use_conv_bias only
    ("backbone.layers.{i}.mixer.x_proj.weight", ("mixer", "x_proj", "kernel"), "linear"),
    ("backbone.layers.{i}.mixer.dt_proj.weight", ("mixer", "dt_proj", "kernel"), "linear"),
    ("backbone.layers.{i}.mixer.dt_proj.bias", ("mixer", "dt_proj", "bias"), "same"),
    ("backbone.layers.{i}.mixer.A_log", ("mixer", "A_log"), "same"),
    ("backbone.layers.{i}.mixer.D", ("mixer", "D"), "same"),
    ("backbone.layers.{i}.mixer.out_proj.weight", ("mixer", "out_proj", "kernel"), "linear"),
    ("backbone.layers.{i}.mixer.out_proj.bias", ("mixer", "out_proj", "bias"), "same"),  # use_bias only
]
LM_GLOBAL_TABLE = {path: (key, layout) for key, path, layout in _LM_GLOBAL}
LM_LAYER_TABLE = {path: (key, layout) for key, path, layout in _LM_LAYER}
TIED_HEAD_KEY = "lm_head.weight"


# ------------------------------------------------------------------ the table
@functools.lru_cache(maxsize=64)
def lm_param_shapes(config: MambaLMConfig) -> dict:
    """The Flax parameter tree of ``config`` as shapes, without allocating anything."""
    shapes = jax.eval_shape(lambda key: init_lm_params(config, key), jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def _rename(key: str, fmt: str) -> str:
    """A transformers-layout key in ``fmt``'s layout (only the embedding's name differs)."""
    return EMBEDDING_KEY[fmt] if key == EMBEDDING_KEY[HF] else key


@functools.lru_cache(maxsize=4)
def _table(fmt: str) -> Table:
    return Table(LM_GLOBAL_TABLE, LM_LAYER_TABLE, functools.partial(_rename, fmt=fmt))


def _entries(config: MambaLMConfig, fmt: str = HF):
    """(Flax path, key, layout, torch shape, layer or None) for every parameter of ``config``."""
    return _table(fmt).entries(lm_param_shapes(config), config.depth)


def expected_lm_shapes(config: MambaLMConfig, fmt: str = HF) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of ``config`` in layout ``fmt`` with its torch shape (a tied head's
    ``lm_head.weight`` is optional and not listed)."""
    return {key: tuple(shape) for _, key, _, shape, _ in _entries(config, fmt)}


def state_dict_format(sd: Mapping[str, np.ndarray]) -> str | None:
    """"hf", "state-spaces", or None when ``sd`` is not a Mamba language model's state dict
    (no ``backbone.*`` key)."""
    if EMBEDDING_KEY[STATE_SPACES] in sd and EMBEDDING_KEY[HF] not in sd:
        return STATE_SPACES
    if any(k.startswith("backbone.") for k in sd):
        return HF
    return None


def check_lm_state_dict(config: MambaLMConfig, sd: Mapping[str, np.ndarray], fmt: str = HF) -> None:
    """Raise CheckpointError listing every missing, unexpected and misshaped key, and a tied head
    that differs from the embedding."""
    want_optional = {TIED_HEAD_KEY: (config.vocab_size, config.embed_dim)} if config.tie_word_embeddings else {}
    lines = key_report(expected_lm_shapes(config, fmt), sd, want_optional)
    if not lines and TIED_HEAD_KEY in want_optional and TIED_HEAD_KEY in sd:
        embedding = np.asarray(sd[EMBEDDING_KEY[fmt]])
        if not np.array_equal(np.asarray(sd[TIED_HEAD_KEY]), embedding):
            lines.append(f"  {TIED_HEAD_KEY} differs from {EMBEDDING_KEY[fmt]}, but the config ties them "
                         "(tie_word_embeddings): pass an untied config")
    if lines:
        raise CheckpointError("\n".join([f"checkpoint does not match the language model "
                                         f"{config.name or _describe(config)}:"] + lines))


def _describe(config: MambaLMConfig) -> str:
    return (f"MambaLMConfig(hidden_size={config.hidden_size}, num_hidden_layers={config.depth}, "
            f"vocab_size={config.vocab_size}, state_size={config.state_size})")


def lm_state_dict_to_params(config: MambaLMConfig, sd: Mapping[str, np.ndarray], fmt: str | None = None,
                            dtype=np.float32) -> dict:
    """A language model's state dict (numpy values, either layout) -> Flax params, after
    ``check_lm_state_dict``."""
    fmt = fmt or state_dict_format(sd) or HF
    check_lm_state_dict(config, sd, fmt)
    return _table(fmt).to_params(lm_param_shapes(config), config.depth, sd, dtype)


def lm_params_to_state_dict(config: MambaLMConfig, params, fmt: str = HF) -> dict[str, np.ndarray]:
    """Flax params -> a state dict in layout ``fmt`` (numpy values), the inverse of
    ``lm_state_dict_to_params``. A tied head is written as ``lm_head.weight`` too in the
    state-spaces layout (as mamba_ssm saves it), and left out in transformers' (as it saves it)."""
    sd = _table(fmt).to_state_dict(params, config.depth)
    if config.tie_word_embeddings and fmt == STATE_SPACES:
        sd[TIED_HEAD_KEY] = sd[EMBEDDING_KEY[fmt]].copy()
    return sd


def infer_lm_config(sd: Mapping[str, np.ndarray]) -> MambaLMConfig:
    """The MambaLMConfig that a state dict's keys and shapes describe (for a file without its
    config.json). What shapes cannot tell is taken from the published models: epsilon 1e-5."""
    fmt = state_dict_format(sd)
    if fmt is None:
        raise CheckpointError(f"not a Mamba language model checkpoint: no 'backbone.*' keys "
                              f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})")

    def shape(key):
        if key not in sd:
            raise CheckpointError(f"not a Mamba language model checkpoint: key {key!r} is missing "
                                  f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})")
        return tuple(np.shape(sd[key]))

    V, D = shape(EMBEDDING_KEY[fmt])
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise CheckpointError("not a Mamba language model checkpoint: no 'backbone.layers.{i}.*' keys")
    two_E, _ = shape("backbone.layers.0.mixer.in_proj.weight")
    E, N = shape("backbone.layers.0.mixer.A_log")
    _, R = shape("backbone.layers.0.mixer.dt_proj.weight")
    K = shape("backbone.layers.0.mixer.conv1d.weight")[-1]
    if two_E % (2 * D) or E != two_E // 2:
        raise CheckpointError(f"in_proj.weight of shape {[two_E, D]} does not fit d_inner {E} (A_log) and "
                              f"hidden size {D} (the embedding)")
    head = sd.get(TIED_HEAD_KEY)
    tied = head is None or (tuple(np.shape(head)) == (V, D)
                            and np.array_equal(np.asarray(head), np.asarray(sd[EMBEDDING_KEY[fmt]])))
    return MambaLMConfig(vocab_size=V, hidden_size=D, state_size=N, num_hidden_layers=max(layer_ids) + 1,
                         expand=two_E // (2 * D), conv_kernel=K, time_step_rank=R,
                         use_bias="backbone.layers.0.mixer.in_proj.bias" in sd,
                         use_conv_bias="backbone.layers.0.mixer.conv1d.bias" in sd,
                         rms_norm="backbone.norm_f.bias" not in sd, tie_word_embeddings=tied)


# ------------------------------------------------------------------- configs
# transformers' MambaConfig: field -> MambaLMConfig field (the same name unless given)
_HF_FIELDS = ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
              "time_step_rank", "layer_norm_epsilon", "use_bias", "use_conv_bias", "tie_word_embeddings",
              "residual_in_fp32", "rms_norm", "fused_add_norm")
# duplicates some configs carry (the -hf repos converted from state-spaces keep the original names)
_HF_ALIASES = {"d_model": "hidden_size", "n_layer": "num_hidden_layers"}
# fields that do not change the forward pass: initialization, training, generation, bookkeeping
# (the generic transformers PretrainedConfig attributes of 4.x and 5.x included)
_NO_EFFECT = frozenset("""
    initializer_range rescale_prenorm_residual time_step_scale time_step_min time_step_max
    time_step_init_scheme time_step_floor use_cache use_mambapy use_associative_scan
    pad_vocab_size_multiple _name_or_path architectures dtype torch_dtype transformers_version
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    output_attentions output_hidden_states return_dict torchscript use_bfloat16 tf_legacy_loss
    pruned_heads tie_encoder_decoder is_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size chunk_size_feed_forward id2label label2id problem_type
    finetuning_task task_specific_params tokenizer_class prefix max_length min_length do_sample
    early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
    repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens _attn_implementation_autoset _commit_hash
""".split())
# state-spaces MambaConfig (mamba_ssm/models/config_mamba.py): top level and ssm_cfg
_SS_NO_EFFECT = frozenset({"pad_vocab_size_multiple", "residual_in_fp32"})
_SS_SSM_FIELDS = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "dt_rank": "time_step_rank",
                  "conv_bias": "use_conv_bias", "bias": "use_bias"}
_SS_SSM_NO_EFFECT = frozenset({"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path",
                               "layer_idx", "device", "dtype"})


def config_format(cfg: Mapping) -> str:
    """"hf" for a transformers MambaConfig (``hidden_size`` / ``model_type``), "state-spaces" for
    mamba_ssm's (``d_model`` without ``hidden_size``)."""
    if "hidden_size" in cfg or cfg.get("model_type") == "mamba":
        return HF
    if "d_model" in cfg:
        return STATE_SPACES
    raise CheckpointError(f"not a Mamba language model config: neither 'hidden_size' (transformers) nor 'd_model' "
                          f"(state-spaces) among its fields {sorted(cfg)[:12]}")


def _unknown(fields, where: str):
    if fields:
        raise CheckpointError(f"{where}: unknown config field(s) {sorted(fields)}: this converter does not know "
                              "what they change in the model (supported: Mamba-1 language models)")


def _check_type(name, value, kind):
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CheckpointError(f"config field {name!r} must be an integer, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise CheckpointError(f"config field {name!r} must be true or false, got {value!r}")


def lm_config_from_dict(cfg: Mapping, *, name: str = "", where: str = "config.json") -> MambaLMConfig:
    """A MambaLMConfig from a checkpoint's config.json (either format); unknown fields and
    unsupported values are a CheckpointError naming them."""
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{where}: not a JSON object")
    fmt = config_format(cfg)
    fields = {}
    if fmt == HF:
        if cfg.get("model_type", "mamba") != "mamba":
            raise CheckpointError(f"{where}: model_type {cfg['model_type']!r} is not 'mamba' (Mamba-1); "
                                  "Mamba-2 and hybrid models are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r}: the Mamba mixer here uses silu")
        _unknown(set(cfg) - set(_HF_FIELDS) - set(_HF_ALIASES) - _NO_EFFECT
                 - {"model_type", "hidden_act", "intermediate_size", "ssm_cfg", "d_inner"}, where)
        fields = {k: cfg[k] for k in _HF_FIELDS if k in cfg}
        for alias, field in _HF_ALIASES.items():
            if alias in cfg and field in cfg and cfg[alias] != cfg[field]:
                raise CheckpointError(f"{where}: {alias}={cfg[alias]!r} contradicts {field}={cfg[field]!r}")
            if alias in cfg:
                fields.setdefault(field, cfg[alias])
        if cfg.get("ssm_cfg"):
            raise CheckpointError(f"{where}: ssm_cfg {cfg['ssm_cfg']!r} beside transformers' fields: "
                                  "which one holds is unclear")
    else:
        _unknown(set(cfg) - {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "fused_add_norm",
                             "tie_embeddings", "d_intermediate", "attn_layer_idx", "attn_cfg"} - _SS_NO_EFFECT, where)
        if cfg.get("d_intermediate", 0):
            raise CheckpointError(f"{where}: d_intermediate={cfg['d_intermediate']} (an MLP after each mixer) is not "
                                  "supported: only pure Mamba-1 language models")
        if cfg.get("attn_layer_idx") or cfg.get("attn_cfg"):
            raise CheckpointError(f"{where}: attention layers (attn_layer_idx) are not supported: only pure Mamba-1 "
                                  "language models")
        ssm = cfg.get("ssm_cfg") or {}
        if not isinstance(ssm, Mapping):
            raise CheckpointError(f"{where}: ssm_cfg must be an object, got {ssm!r}")
        if ssm.get("layer", "Mamba1") != "Mamba1":
            raise CheckpointError(f"{where}: ssm_cfg.layer {ssm['layer']!r}: only Mamba1 layers are supported")
        _unknown({f"ssm_cfg.{k}" for k in set(ssm) - set(_SS_SSM_FIELDS) - _SS_SSM_NO_EFFECT - {"layer"}}, where)
        vocab = cfg.get("vocab_size", 50277)
        multiple = cfg.get("pad_vocab_size_multiple", 8)
        _check_type("vocab_size", vocab, int)
        _check_type("pad_vocab_size_multiple", multiple, int)
        if multiple > 1 and vocab % multiple:
            vocab += multiple - vocab % multiple  # mamba_ssm pads the embedding rows so
        fields = dict(hidden_size=cfg["d_model"], num_hidden_layers=cfg.get("n_layer", 64), vocab_size=vocab)
        for k in ("rms_norm", "fused_add_norm"):
            if k in cfg:
                fields[k] = cfg[k]
        if "tie_embeddings" in cfg:
            fields["tie_word_embeddings"] = cfg["tie_embeddings"]
        fields.update({_SS_SSM_FIELDS[k]: v for k, v in ssm.items() if k in _SS_SSM_FIELDS})
    for k, v in fields.items():
        if k == "time_step_rank" and v == "auto":
            continue
        if k == "layer_norm_epsilon":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise CheckpointError(f"config field {k!r} must be a positive number, got {v!r}")
            continue
        _check_type(k, v, bool if k in ("use_bias", "use_conv_bias", "tie_word_embeddings", "residual_in_fp32",
                                        "rms_norm", "fused_add_norm") else int)
    try:
        config = MambaLMConfig(**fields, name=name)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    for field, value in (("intermediate_size", config.d_inner), ("d_inner", config.d_inner)):
        if field in cfg and cfg[field] != value:
            raise CheckpointError(f"{where}: {field}={cfg[field]!r} is not expand x hidden_size = {value}")
    return config


def lm_config_to_dict(config: MambaLMConfig) -> dict:
    """transformers' config.json for ``config`` (what ``MambaConfig.from_dict`` reads)."""
    if not config.rms_norm:
        raise CheckpointError("transformers' Mamba has RMSNorm only: a LayerNorm model (rms_norm=False) has no "
                              "transformers config; export its state dict instead")
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "state_size": config.state_size,
            "num_hidden_layers": config.num_hidden_layers, "expand": config.expand,
            "intermediate_size": config.d_inner, "conv_kernel": config.conv_kernel, "time_step_rank": config.rank,
            "layer_norm_epsilon": config.layer_norm_epsilon, "use_bias": config.use_bias,
            "use_conv_bias": config.use_conv_bias, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_word_embeddings, "residual_in_fp32": True}
