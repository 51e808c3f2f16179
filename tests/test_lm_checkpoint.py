"""Language-model checkpoints (convert.lm_mapping, convert.lm_checkpoint, convert.api): every
source format, every bad-checkpoint error, the hub path with a mocked download, orbax and export
round trips. Folders are written by transformers itself (``save_pretrained``) or by hand in the
state-spaces layout; no weights are ever fetched."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import export_state_dict, load_checkpoint, load_params, save_params
from convert.lm_checkpoint import export_lm
from convert.lm_mapping import (
    CheckpointError,
    expected_lm_shapes,
    infer_lm_config,
    lm_config_from_dict,
    lm_params_to_state_dict,
)
from mamba_jax import MambaLMConfig, VimConfig, init_lm_params, init_params, lm_apply, mamba_lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIELDS = dict(vocab_size=37, hidden_size=16, state_size=4, num_hidden_layers=2, time_step_rank=2)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(folder written by save_pretrained, the transformers model, its state dict as numpy)."""
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**FIELDS)).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-mamba"
    model.save_pretrained(folder)
    return folder, model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(hf):
    return load_checkpoint(str(hf[0]))


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens), use_cache=False).logits.numpy()


def test_hf_folder_config_and_logits(hf, reference):
    config, params = reference
    assert config == MambaLMConfig(**FIELDS)
    assert "lm_head" not in params  # tied: the embedding is the head
    tokens = np.arange(12).reshape(2, 6) % FIELDS["vocab_size"]
    np.testing.assert_allclose(lm_apply(config, params, tokens), _logits(hf[1], tokens), atol=1e-5)


def test_pytorch_model_bin_folder(hf, reference, tmp_path):
    """config.json + pytorch_model.bin (a state dict that keeps the tied lm_head.weight)."""
    (tmp_path / "config.json").write_text((hf[0] / "config.json").read_text())
    torch.save(hf[1].state_dict(), tmp_path / "pytorch_model.bin")
    assert "lm_head.weight" in torch.load(tmp_path / "pytorch_model.bin")
    config, params = load_checkpoint(tmp_path)
    assert config == reference[0]
    _same(params, reference[1])


def test_sharded_safetensors_folder(hf, reference, tmp_path):
    hf[1].save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config, params = load_checkpoint(tmp_path)
    _same(params, reference[1])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    next(iter(sorted(set(index["weight_map"].values()))))
    os.remove(tmp_path / sorted(set(index["weight_map"].values()))[0])
    with pytest.raises(CheckpointError, match="lists shard"):
        load_checkpoint(tmp_path)


def _state_spaces_folder(folder: Path, sd, **extra):
    """The original mamba_ssm layout: backbone.embedding, lm_head kept, its own config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): torch.from_numpy(v.copy())
          for k, v in sd.items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"].clone()
    torch.save(sd, folder / "pytorch_model.bin")
    cfg = {"d_model": 16, "n_layer": 2, "vocab_size": 33, "pad_vocab_size_multiple": 37, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True,
           "ssm_cfg": {"d_state": 4, "dt_rank": 2, "dt_min": 0.001, "use_fast_path": True}, **extra}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_state_spaces_folder_pads_the_vocabulary(hf, reference, tmp_path):
    """vocab_size 33 padded to a multiple of pad_vocab_size_multiple (37 here) = the embedding's rows."""
    folder = _state_spaces_folder(tmp_path / "ss", hf[2])
    config, params = load_checkpoint(folder)
    assert config.vocab_size == 37 and config == reference[0]
    _same(params, reference[1])
    # export back in the state-spaces layout: the same keys and values as the original file
    out = export_lm(config, params, tmp_path / "back.bin", fmt="state-spaces")
    back = torch.load(out)
    orig = torch.load(folder / "pytorch_model.bin")
    assert sorted(back) == sorted(orig)
    for k in orig:
        np.testing.assert_array_equal(back[k].numpy(), orig[k].numpy())


def test_state_dict_and_bare_file_infer_the_config(hf, reference, tmp_path):
    config, params = load_checkpoint(hf[2])  # in-memory state dict, config from the shapes
    assert config == reference[0].replace(time_step_rank=2)
    _same(params, reference[1])
    from safetensors.numpy import save_file

    save_file({k: v for k, v in hf[2].items() if k != "lm_head.weight"}, str(tmp_path / "w.safetensors"))
    assert load_checkpoint(tmp_path / "w.safetensors")[0] == config
    assert infer_lm_config(hf[2]) == config


def test_untied_head_and_biases_inferred():
    config = MambaLMConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, state_size=2, use_bias=True,
                           use_conv_bias=False, tie_word_embeddings=False, conv_kernel=3, expand=3)
    params = init_lm_params(config, jax.random.PRNGKey(0))
    sd = lm_params_to_state_dict(config, params)
    assert "lm_head.weight" in sd and "backbone.layers.0.mixer.conv1d.bias" not in sd
    assert infer_lm_config(sd) == config.replace(time_step_rank=config.rank)
    loaded, p2 = load_checkpoint(sd)
    _same(p2, params)


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("backbone.layers.1.mixer.x_proj.weight"),
     "missing keys \\(1\\): backbone.layers.1.mixer.x_proj"),
    (lambda sd: sd.update({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}),
     "unexpected keys \\(1\\): backbone.layers.0.mixer.extra"),
    (lambda sd: sd.update({"backbone.layers.0.mixer.D": np.zeros(5, np.float32)}),
     "wrong shape for backbone.layers.0.mixer.D: checkpoint \\[5\\], model expects \\[32\\]"),
    (lambda sd: sd.update({"lm_head.weight": sd["backbone.embeddings.weight"] + 1}),
     "lm_head.weight differs from backbone.embeddings.weight, but the config ties them"),
    (lambda sd: sd.update({"backbone.norm_f.weight": np.full(16, np.nan, np.float32)}),
     "'backbone.norm_f.weight' holds 16 non-finite"),
])
def test_bad_checkpoints_are_named(hf, damage, message):
    sd = {k: v.copy() for k, v in hf[2].items()}
    damage(sd)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(sd, MambaLMConfig(**FIELDS))


@pytest.mark.parametrize("change, message", [
    ({"foo_bar": 1}, "unknown config field\\(s\\) \\['foo_bar'\\]"),
    ({"model_type": "mamba2"}, "model_type 'mamba2' is not 'mamba'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"intermediate_size": 40}, "intermediate_size=40 is not expand x hidden_size = 32"),
    ({"num_hidden_layers": 3}, "missing keys \\(10\\): backbone.layers.2"),
    ({"hidden_size": "16"}, "'hidden_size' must be an integer"),
    ({"n_layer": 5}, "n_layer=5 contradicts num_hidden_layers=2"),
])
def test_bad_hf_configs_are_named(hf, tmp_path, change, message):
    cfg = json.loads((hf[0] / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(hf[0] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"attn_layer_idx": [1]}, "attention layers"),
    ({"d_intermediate": 64}, "d_intermediate=64"),
    ({"ssm_cfg": {"layer": "Mamba2"}}, "only Mamba1"),
    ({"ssm_cfg": {"d_state": 4, "dt_rank": 2, "mystery": 1}}, "ssm_cfg.mystery"),
])
def test_bad_state_spaces_configs_are_named(hf, tmp_path, change, message):
    folder = _state_spaces_folder(tmp_path / "ss", hf[2], **change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_every_transformers_config_field_is_understood():
    """The whitelist covers everything transformers writes for a MambaConfig."""
    cfg = transformers.MambaConfig(**FIELDS).to_dict()
    assert lm_config_from_dict(cfg) == MambaLMConfig(**FIELDS)


def _mock_hub(monkeypatch, files: dict[str, Path]):
    """huggingface_hub.hf_hub_download serving ``files`` (name -> local path); others 'not in the repo'."""
    import huggingface_hub
    from huggingface_hub import errors

    calls = []

    def fake(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if filename not in files:
            raise errors.EntryNotFoundError(f"404: {filename} is not in {repo_id}")
        return str(files[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls


def test_hub_id_downloads_config_then_weights(hf, reference, monkeypatch, tmp_path):
    torch.save(hf[1].state_dict(), tmp_path / "pytorch_model.bin")
    calls = _mock_hub(monkeypatch, {"config.json": hf[0] / "config.json",
                                    "pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    config, params = load_checkpoint("someone/tiny-mamba-hf")
    assert calls == [("someone/tiny-mamba-hf", f) for f in ("config.json", "model.safetensors",
                                                            "model.safetensors.index.json", "pytorch_model.bin")]
    assert config == reference[0]
    _same(params, reference[1])


def test_hub_errors(monkeypatch, hf):
    _mock_hub(monkeypatch, {})
    with pytest.raises(CheckpointError, match="has no config.json: not a Hugging Face or state-spaces"):
        load_checkpoint("someone/vim-elsewhere")
    _mock_hub(monkeypatch, {"config.json": hf[0] / "config.json"})
    with pytest.raises(CheckpointError, match="has config.json but none of model.safetensors"):
        load_checkpoint("someone/empty")
    import huggingface_hub
    from huggingface_hub import errors

    def offline(repo_id, filename, **kwargs):
        raise errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="offline or no connection"):
        load_checkpoint("state-spaces/mamba-130m-hf")


def test_orbax_round_trip_and_cli(hf, reference, tmp_path):
    config, params = reference
    out = save_params(tmp_path / "conv", config, params)
    c2, p2 = load_params(out)
    assert c2 == config
    _same(p2, params)
    c3, _ = load_checkpoint(out)  # a converted folder, recognized by its config.json
    assert c3 == config
    with pytest.raises(FileExistsError):
        save_params(out, config, params)
    save_params(out, config, params, overwrite=True)
    from convert.__main__ import main

    assert main([str(hf[0]), str(tmp_path / "cli")]) == 0
    _same(load_checkpoint(tmp_path / "cli")[1], params)


def test_export_to_a_folder_transformers_loads(reference, tmp_path):
    config, params = reference
    params = jax.tree.map(lambda a: a + 0.01 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), params)  # new values
    folder = export_state_dict(config, params, tmp_path / "exported")
    model = transformers.MambaForCausalLM.from_pretrained(folder).eval()
    tokens = np.arange(10).reshape(2, 5)
    np.testing.assert_allclose(_logits(model, tokens), lm_apply(config, params, tokens), atol=1e-5)
    f = export_state_dict(config, params, tmp_path / "w.safetensors")
    _same(load_checkpoint(f)[1], params)
    with pytest.raises(FileExistsError):
        export_state_dict(config, params, f)


def test_vim_still_loads_through_the_same_entry_point(tmp_path):
    cfg = VimConfig(embed_dim=16, depth=2, img_size=32, patch_size=8, stride=8, num_classes=5)
    params = init_params(cfg, jax.random.PRNGKey(0))
    export_state_dict(cfg, params, tmp_path / "vim.pth")
    config, p2 = load_checkpoint(tmp_path / "vim.pth", cfg)
    assert isinstance(config, VimConfig)
    _same(p2, params)


def test_published_configs():
    c = mamba_lm("state-spaces/mamba-130m-hf")
    assert (c.hidden_size, c.depth, c.rank, c.d_inner, c.vocab_size) == (768, 24, 48, 1536, 50280)
    shapes = expected_lm_shapes(c)
    assert shapes["backbone.embeddings.weight"] == (50280, 768)
    assert shapes["backbone.layers.23.mixer.x_proj.weight"] == (48 + 32, 1536)
    assert sum(np.prod(s) for s in shapes.values()) == 129_135_360  # mamba-130m's parameter count
    with pytest.raises(KeyError, match="unknown Mamba language model"):
        mamba_lm("mamba-7b")
