"""Token-level faithfulness (xai/eval/tokens.py) by hand, the recall task (xai/eval/recall.py), and
the embedded demo language model (xai/app/lm_demo.py): it answers every held-out query, and
MambaLRP finds the evidence that the random and recency baselines miss."""

import numpy as np
import pytest

from xai.eval.recall import FILLER_ID, SEQ_LEN, decode, encode, query_positions, recall_dataset
from xai.eval.tokens import (
    TokenFaithfulness,
    auc,
    candidate_mask,
    deleted_tokens,
    deletion_order,
    evidence_hits,
    random_relevance,
    recency_relevance,
)


def test_deletion_by_hand():
    rel = np.array([[0.1, 0.9, 0.5, 0.0, 7.0]])
    cand = candidate_mask(5, position=4)  # the explained token itself is not a candidate
    assert cand.tolist() == [True, True, True, True, False]
    assert deletion_order(rel, cand).tolist() == [[1, 2, 0, 3]]
    assert deletion_order(rel, cand, most_relevant_first=False).tolist() == [[3, 0, 2, 1]]
    out = deleted_tokens(np.array([[5, 6, 7, 8, 9]]), deletion_order(rel, cand), (0.0, 0.5, 0.9), fill_token=0)
    # k = round(f * 4): 0, 2, 4 (round(3.6) = 4: every candidate)
    assert out[:, 0].tolist() == [[5, 6, 7, 8, 9], [5, 0, 0, 8, 9], [0, 0, 0, 0, 9]]
    assert auc([100, 100, 0]) == pytest.approx(0.1 * (100 + 50))


def test_ties_and_evidence():
    rel = np.zeros((200, 6))
    orders = deletion_order(rel, candidate_mask(6, 5))
    assert len({tuple(o) for o in orders}) > 50, "ties are broken in a random order, not by position"
    np.testing.assert_array_equal(orders, deletion_order(rel, candidate_mask(6, 5)))  # the same order every call
    rel = np.array([[0, 3, 3, 1, 0, 9.0], [0, 1, 5, 1, 0, 0]])
    np.testing.assert_allclose(evidence_hits(rel, [2, 2], position=5), [0.5, 1.0])  # a tie for the top: 1/2
    assert evidence_hits(recency_relevance((1, 6)), [4], position=5).tolist() == [1.0]
    assert random_relevance((2, 3), seed=1).shape == (2, 3)


def test_recall_items():
    d = recall_dataset(50, seed=3)
    assert d["tokens"].shape == (50, SEQ_LEN)
    for t, a, e, s in zip(d["tokens"], d["answer"], d["evidence"], d["support"]):
        text = "".join(decode(t))
        assert text[-2] == "?" and text[s] == text[-1] and e == s + 1 and decode([a]) == [text[e]]
        assert sorted(text[:-2].replace("_", "")[::2]) == sorted(set(text[:-2].replace("_", "")[::2]))
    many = recall_dataset(50, seed=3, queries=4)
    np.testing.assert_array_equal(many["tokens"][:, :SEQ_LEN], d["tokens"])  # the one-query item is a prefix
    np.testing.assert_array_equal(many["answer"][:, 0], d["answer"])
    assert many["tokens"][0, query_positions(4)].tolist() == [many["tokens"][0, p] for p in (15, 18, 21, 24)]
    assert encode("_?a0").tolist() == [FILLER_ID, 1, 2, 10]
    with pytest.raises(ValueError, match=r"characters \['x'\] are not in the demo vocabulary"):
        encode("ax")


@pytest.fixture(scope="module")
def demo():
    from xai.app.lm_demo import demo_lm

    return demo_lm()


def test_demo_lm_answers_held_out_queries(demo):
    from mamba_jax import lm_apply

    config, params = demo
    assert config.depth == 2 and config.vocab_size == 18
    d = recall_dataset(256, seed=1)
    pred = np.asarray(lm_apply(config, params, d["tokens"])[:, -1].argmax(-1))
    assert (pred == d["answer"]).mean() >= 0.99


def test_faithfulness_on_the_demo(demo):
    """64 held-out sequences: MambaLRP's top token is the evidence (the value) nearly always, its
    deletion curve falls faster than random's and its least-relevant-first curve stays higher; the
    recency baseline never hits the evidence."""
    from mamba_jax import lm_apply
    from xai.tokens import explain_tokens

    config, params = demo
    d = recall_dataset(64, seed=5)
    pred = np.asarray(lm_apply(config, params, d["tokens"])[:, -1].argmax(-1))
    rows = {"lrp": explain_tokens(config, params, d["tokens"], "mamba_lrp", target=pred),
            "random": random_relevance(d["tokens"].shape), "recency": recency_relevance(d["tokens"].shape)}
    out = {}
    for name, rel in rows.items():
        acc = TokenFaithfulness()
        acc.step(config, params, d["tokens"], np.asarray(rel), pred, fill_token=FILLER_ID, evidence=d["evidence"],
                 support=d["support"])
        out[name] = acc.summary()
    assert out["lrp"]["evidence_hit_rate"] >= 90
    assert out["recency"]["evidence_hit_rate"] == 0
    assert out["lrp"]["auc_positive"] < out["random"]["auc_positive"] - 10
    assert out["lrp"]["auc_negative"] > out["random"]["auc_negative"] + 10
    assert out["lrp"]["curve_positive"][0] == 100.0  # nothing deleted: the prediction itself
    with pytest.raises(ValueError, match="relevance must have the tokens' shape"):
        TokenFaithfulness().step(config, params, d["tokens"], np.zeros((3, 3)), pred, fill_token=FILLER_ID)


def test_training_script_runs(tmp_path, capsys):
    """python -m xai.app.train_lm_demo, three steps: weights demo_lm() can read and a JSON log."""
    import json

    from xai.app.train_lm_demo import main

    main(["--out", str(tmp_path / "w.npz"), "--steps", "3", "--batch-size", "8", "--held-out", "20",
          "--eval-every", "3"])
    log = json.loads((tmp_path / "w.json").read_text())
    assert log["steps_done"] == 3 and log["queries"] == 4 and len(log["held_out"]) == 1
    with np.load(tmp_path / "w.npz") as data:
        assert data["embeddings/embedding"].shape == (18, 64) and data["layers/mixer/A_log"].shape == (2, 128, 16)
    assert "final held-out accuracy" in capsys.readouterr().out
