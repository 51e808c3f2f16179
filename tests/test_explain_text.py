"""``mamba-jax explain-text`` and ``mamba-jax demo-text`` as a user runs them: the demo LM with its
character vocabulary, a Hugging Face folder with a tokenizer built here (no download), token ids
without a tokenizer, and the one-line errors."""

import json

import jax
import numpy as np
import pytest

from xai.__main__ import main
from xai.tokens import explain_tokens

TEXT = "c0_g1_e6___d5_?c"  # the demo's recall format: the answer is "0"


def test_demo_text_explained(tmp_path, capsys):
    out = tmp_path / "x"
    rc = main(["explain-text", TEXT, "--methods", "mamba_lrp,rollout", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "predicted '0'" in printed and "\x1b[" not in printed  # not a terminal: no colour codes
    data = json.loads((out / "relevance.json").read_text())
    assert data["tokens"] == list(TEXT) and data["predicted"] == data["target"] == 10  # "0"
    from xai.app.lm_demo import demo_lm

    config, params = demo_lm()
    want = np.asarray(explain_tokens(config, params, np.array([data["token_ids"]]), "mamba_lrp"))[0]
    np.testing.assert_allclose(data["relevance"]["mamba_lrp"], want, rtol=1e-6, atol=1e-7)
    assert int(np.argmax(want)) == 1  # the value "0" after the queried key "c"
    html = (out / "explanation.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<tr>") == 2 and "title=" in html
    assert (out / "explanation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun into the same folder needs --overwrite, which replaces only these files
    assert main(["explain-text", TEXT, "--methods", "rollout", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["explain-text", TEXT, "--methods", "rollout", "--out", str(out), "--overwrite", "--color",
                 "always"]) == 0
    assert "\x1b[38;2;0;0;0;48;2;" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["c0_X?c"], "characters ['X'] are not in the demo vocabulary"),
    ([TEXT, "--position", "16"], "position 16 is outside the sequence of 16 tokens"),
    ([TEXT, "--target", "18"], "target 18 is outside the vocabulary"),
])
def test_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["explain-text", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mamba-jax explain-text: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:  # a usage error, from argparse
        main(["explain-text", TEXT, "--methods", "gradcam"])
    assert e.value.code == 2 and "unknown method 'gradcam'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random tiny transformers Mamba and a word-level tokenizer over its vocabulary, in one folder."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("lm") / "tiny"
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=8, hidden_size=16, state_size=4,
                                                                   num_hidden_layers=2))
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_hf_folder_with_its_tokenizer(hf_folder, tmp_path):
    out = tmp_path / "hf"
    assert main(["explain-text", "the cat sat on the", "--checkpoint", str(hf_folder), "--methods",
                 "raw_attention", "--mode", "both", "--out", str(out)]) == 0
    data = json.loads((out / "relevance.json").read_text())
    assert data["tokens"] == ["the", "cat", "sat", "on", "the"] and data["token_ids"] == [1, 2, 3, 4, 1]
    assert sorted(data["relevance"]) == ["raw_attention (exact)", "raw_attention (official)"]


def test_token_ids_without_a_tokenizer(hf_folder, tmp_path, capsys):
    from convert import export_state_dict, load_checkpoint

    config, params = load_checkpoint(str(hf_folder))
    weights = export_state_dict(config, params, tmp_path / "w.safetensors")  # a bare file: no tokenizer beside it
    out = tmp_path / "ids"
    assert main(["explain-text", "1 2 3", "--checkpoint", str(weights), "--methods", "mamba_attribution",
                 "--position", "1", "--out", str(out)]) == 0
    data = json.loads((out / "relevance.json").read_text())
    assert data["token_ids"] == [1, 2, 3] and data["position"] == 1
    assert data["relevance"]["mamba_attribution"][2] == 0.0  # after the explained position
    assert main(["explain-text", "the cat", "--checkpoint", str(weights), "--out", str(tmp_path / "e")]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_vim_checkpoint_is_refused(tmp_path, capsys):
    from convert import save_params
    from mamba_jax import VimConfig, init_params

    cfg = VimConfig(embed_dim=16, depth=1, img_size=32, patch_size=16, stride=16, num_classes=3)
    folder = save_params(tmp_path / "vim", cfg, init_params(cfg, jax.random.PRNGKey(0)))
    assert main(["explain-text", "1 2", "--checkpoint", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "not a language model" in capsys.readouterr().err


def test_demo_text_evaluation_rows():
    """The demo's evaluation, cut down to one method (the full job: ``pytest -m slow``)."""
    from xai.app.lm_demo import evaluate_lm_demo, markdown_table

    res = evaluate_lm_demo(16, batch_size=16, methods=("mamba_lrp",), modes=("exact",), progress=False)
    assert list(res["rows"]) == ["mamba_lrp/-", "random/baseline", "recency/baseline"]
    assert res["accuracy"] == 100.0 and res["rows"]["mamba_lrp/-"]["evidence_hit_rate"] >= 90
    assert "| mamba_lrp | - |" in markdown_table(res["rows"])


@pytest.mark.slow
def test_demo_text_job(tmp_path):
    res = main(["demo-text", "--n-eval", "64", "--out", str(tmp_path / "d"), "--no-progress"])
    assert res == 0
    data = json.loads((tmp_path / "d" / "results.json").read_text())
    assert len(data["rows"]) == 12 and (tmp_path / "d" / "samples.png").is_file()
