"""Checkpoint conversion: round trips, every bad-checkpoint case, atomic writes, hub loading."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

import convert.checkpoint as ckpt
from convert.checkpoint import export_state_dict, load_checkpoint, save_params
from convert.mapping import CheckpointError, expected_torch_shapes, infer_config, params_to_state_dict
from mamba_jax import VimConfig, init_params, vim_apply, vim_tiny

torch = pytest.importorskip("torch")

TINY = VimConfig(embed_dim=16, depth=2, img_size=32, patch_size=8, stride=8, num_classes=7)


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def tiny():
    return TINY, init_params(TINY, jax.random.PRNGKey(0))


@pytest.fixture
def tiny_pth(tiny, tmp_path):
    config, params = tiny
    return export_state_dict(config, params, tmp_path / "tiny.pth")


def test_official_key_set_for_vim_tiny():
    shapes = expected_torch_shapes(vim_tiny())
    assert len(shapes) == 7 + 24 * 17
    assert shapes["patch_embed.proj.weight"] == (192, 3, 16, 16)
    assert shapes["pos_embed"] == (1, 197, 192)
    assert shapes["layers.23.mixer.in_proj.weight"] == (768, 192)
    assert shapes["layers.0.mixer.conv1d_b.weight"] == (384, 1, 4)
    assert shapes["layers.5.mixer.x_proj_b.weight"] == (12 + 32, 384)
    assert shapes["layers.5.mixer.dt_proj.weight"] == (384, 12)
    assert shapes["layers.5.mixer.A_b_log"] == (384, 16)
    assert shapes["layers.5.mixer.out_proj.weight"] == (192, 384)
    assert shapes["head.weight"] == (1000, 192)
    assert "layers.0.norm.bias" not in shapes and "norm_f.bias" not in shapes


@pytest.mark.parametrize("flags", [dict(), dict(bimamba="v1"), dict(bimamba="none"), dict(rms_norm=False),
                                   dict(cls_token="double"), dict(cls_token="none", abs_pos_embed=False)])
def test_round_trip_and_inference(flags, tmp_path):
    config = TINY.replace(**flags)
    params = init_params(config, jax.random.PRNGKey(1))
    path = export_state_dict(config, params, tmp_path / "m.pth")
    sd = torch.load(path, weights_only=True)["model"]
    assert set(sd) == set(expected_torch_shapes(config))
    loaded_config, loaded = load_checkpoint(path, variant=config)
    assert leaves_equal(params, loaded)
    inferred = infer_config({k: v.numpy() for k, v in sd.items()}, img_size=32)
    for field in ("embed_dim", "depth", "bimamba", "rms_norm", "cls_token", "abs_pos_embed", "grid"):
        if field == "cls_token" and config.cls_token == "head":
            continue
        assert getattr(inferred, field) == getattr(config, field), field


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_wrappers_and_safetensors(tiny, tmp_path, wrapper):
    config, params = tiny
    sd = {k: torch.from_numpy(v) for k, v in params_to_state_dict(config, params).items()}
    obj = {wrapper: sd, "epoch": 3} if wrapper else sd
    torch.save(obj, tmp_path / "w.pth")
    assert leaves_equal(params, load_checkpoint(tmp_path / "w.pth", variant=config)[1])
    st = export_state_dict(config, params, tmp_path / "w.safetensors")
    assert leaves_equal(params, load_checkpoint(st, variant=config)[1])


def _corrupt(tiny, tmp_path, edit):
    config, params = tiny
    sd = {k: torch.from_numpy(v) for k, v in params_to_state_dict(config, params).items()}
    edit(sd)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    return tmp_path / "bad.pth"


def test_missing_key_is_named(tiny, tmp_path):
    path = _corrupt(tiny, tmp_path, lambda sd: sd.pop("layers.1.mixer.dt_proj_b.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layers\.1\.mixer\.dt_proj_b\.bias"):
        load_checkpoint(path, variant=TINY)


def test_unexpected_key_is_named(tiny, tmp_path):
    path = _corrupt(tiny, tmp_path, lambda sd: sd.__setitem__("layers.0.mixer.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): layers\.0\.mixer\.extra"):
        load_checkpoint(path, variant=TINY)


def test_wrong_shape_is_named(tiny, tmp_path):
    path = _corrupt(tiny, tmp_path, lambda sd: sd.__setitem__("layers.1.mixer.A_log", torch.zeros(32, 8)))
    with pytest.raises(CheckpointError, match=r"wrong shape for layers\.1\.mixer\.A_log: checkpoint \[32, 8\], "
                                              r"model expects \[32, 16\]"):
        load_checkpoint(path, variant=TINY)


def test_wrong_variant_is_named(tiny_pth):
    with pytest.raises(CheckpointError, match=r"wrong shape for cls_token.*\n.*model expects"):
        load_checkpoint(tiny_pth, variant="vim_tiny")


def test_non_checkpoint_files(tmp_path):
    (tmp_path / "notes.pth").write_text("hello, not a pickle")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Vim checkpoint: key 'patch_embed.proj.weight' is missing"):
        load_checkpoint(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_checkpoint(tmp_path / "missing" / "file.pth")


def test_save_restore_orbax_and_atomicity(tiny, tmp_path, monkeypatch):
    config, params = tiny
    out = save_params(tmp_path / "converted", config, params)
    loaded_config, loaded = load_checkpoint(out)
    assert loaded_config == config and leaves_equal(params, loaded)
    with pytest.raises(FileExistsError):
        save_params(out, config, params)

    # a write that dies half way leaves neither a final folder nor a temporary one behind
    import orbax.checkpoint as ocp

    def explode(self, path, *a, **k):
        Path(path).mkdir(parents=True)
        (Path(path) / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_params(tmp_path / "never", config, params)
    assert sorted(os.listdir(tmp_path)) == ["converted"]
    # ... and an overwrite that dies keeps the old checkpoint intact
    with pytest.raises(OSError, match="disk full"):
        save_params(out, config, params, overwrite=True)
    assert leaves_equal(params, load_checkpoint(out)[1])


def test_export_is_atomic(tiny, tmp_path, monkeypatch):
    config, params = tiny

    def explode(obj, f, *a, **k):  # export writes through mamba_jax.files.atomic_write's file object
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        export_state_dict(config, params, tmp_path / "x.pth")
    assert os.listdir(tmp_path) == []


def test_hub_id_uses_huggingface_download(tiny_pth, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tiny_pth)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    config, _ = load_checkpoint("hustvl/Vim-tiny-midclstok", variant=TINY)
    assert calls == [("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")]
    load_checkpoint("someone/my-vim:weights/best.pth", variant=TINY)
    assert calls[-1] == ("someone/my-vim", "weights/best.pth")
    with pytest.raises(ValueError, match="no default file known"):
        ckpt.hub_download("someone/unknown")


def test_hub_offline_mode_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import importlib

    import huggingface_hub
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(Exception, match="(?i)offline|cache|connect"):
            load_checkpoint("hustvl/Vim-tiny-midclstok")
    finally:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        importlib.reload(huggingface_hub.constants)


def test_converted_model_runs(tiny):
    config, params = tiny
    sd = params_to_state_dict(config, params)
    _, params2 = load_checkpoint(sd, variant=config)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
    np.testing.assert_array_equal(vim_apply(config, params, x), vim_apply(config, params2, x))


def test_bad_images_are_named(tiny):
    config, params = tiny
    with pytest.raises(ValueError, match="looks like NCHW"):
        vim_apply(config, params, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        vim_apply(config, params, np.zeros((1, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="expected 32 x 32 pixels"):
        vim_apply(config, params, np.zeros((1, 48, 48, 3), np.float32))
    with pytest.raises(ValueError, match=r"batch \[B, H, W, C\]"):
        vim_apply(config, params, np.zeros((32, 32, 3), np.float32))


def test_inference_refuses_an_image_size_it_cannot_know(tiny):
    config, params = tiny  # 32 x 32 images: with the default img_size=224 the grid cannot fit
    sd = params_to_state_dict(config, params)
    with pytest.raises(CheckpointError, match="pass the model's VimConfig as variant"):
        load_checkpoint(sd)
    assert infer_config(sd, img_size=32).grid == config.grid


def test_command_line_convert_and_validate(tiny, tmp_path, capsys):
    from convert.__main__ import main

    config, params = tiny
    src = export_state_dict(config, params, tmp_path / "t.pth")
    out = tmp_path / "conv"
    # the .pth of a 32-pixel model does not say its image size: the error says what to do
    assert main([str(src), str(out)]) == 2
    assert "pass the model's VimConfig" in capsys.readouterr().err
    save_params(tmp_path / "folder", config, params)
    assert main(["validate", str(tmp_path / "folder"), "--json", str(tmp_path / "r.json")]) == 0
    report = capsys.readouterr().out
    assert "top-5 set agreement 100%" in report and "layer  1:" in report
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["logits_rel_to_max"] < 1e-5 and len(r["layers"]) == config.depth


def test_command_line_converts_official_variant(tmp_path, capsys):
    from convert.__main__ import main

    config = vim_tiny().replace(depth=2, name="")
    params = init_params(config, jax.random.PRNGKey(0))
    src = export_state_dict(config, params, tmp_path / "v.pth")
    assert main([str(src), str(tmp_path / "out")]) == 0
    loaded_config, loaded = load_checkpoint(tmp_path / "out")
    assert loaded_config.embed_dim == 192 and loaded_config.depth == 2 and leaves_equal(params, loaded)
