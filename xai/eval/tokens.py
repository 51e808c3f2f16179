"""Token-level faithfulness of explanations of a language model's next-token prediction.

Deletion test (the token analogue of SPEC section 5's perturbation test): the candidate tokens
(those before the explained position; with ``include_position`` that one too) are ranked by
relevance, and at each fraction f = 0, 0.1, ..., 0.9 the top round(f n) of them are replaced by a
neutral token (``fill_token``: the demo's filler "_", or a tokenizer's pad/unk token); the model
predicts again at the explained position. A hit is the prediction equal to the token explained.
The curve is the hit rate (percent) over the sequences at each fraction; its area (trapezoid,
spacing 0.1) is the AUC. Most relevant first ("AUC+", lower is better) and least relevant first
("AUC-", higher is better). Relevance is computed once, on the intact sequence. Ties (a map that is
exactly zero on many tokens) are broken in a fixed random order (``tie_seed``), the same for every
method: an order by position would turn a map's zeros into a primacy or recency ranking.

Evidence hit rate: the share of sequences whose most relevant candidate token is the evidence
(a task's known source of the answer, e.g. the value token of key-value recall); a tie for the top
among k tokens that include the evidence counts 1/k (the expected hit of a random tie-break).

Baselines: ``random_relevance`` (independent uniform scores) and ``recency_relevance`` (the later
the token, the more relevant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.lm import _lm_apply, check_options, check_tokens
from xai.tokens import resolve_position

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))


def candidate_mask(length: int, position: int, include_position: bool = False) -> np.ndarray:
    """bool [T]: the tokens that may be deleted (before ``position``, or up to it)."""
    t = np.arange(length)
    return (t <= position) if include_position else (t < position)


def deletion_order(relevance, candidates, most_relevant_first: bool = True, tie_seed: int = 0) -> np.ndarray:
    """int [B, n]: the candidate positions of each sequence in deletion order (ties in a fixed random order)."""
    relevance = np.asarray(relevance, np.float64)
    pos = np.flatnonzero(candidates)
    scores = relevance[:, pos] if most_relevant_first else -relevance[:, pos]
    ties = np.random.default_rng(tie_seed).random(scores.shape)
    order = np.lexsort((ties, -scores), axis=1)  # by score, then by the random key
    return pos[order]


def deleted_tokens(tokens, order, fractions, fill_token: int) -> np.ndarray:
    """int32 [n_fractions, B, T]: ``tokens`` with the first round(f n) positions of ``order`` filled."""
    tokens = np.asarray(tokens)
    n = order.shape[1]
    out = np.repeat(tokens[None], len(fractions), axis=0).astype(np.int32)
    rows = np.arange(tokens.shape[0])[:, None]
    for i, f in enumerate(fractions):
        k = int(round(f * n))
        if k:
            out[i][rows, order[:, :k]] = fill_token
    return out


@functools.partial(jax.jit, static_argnames=("config", "options"))
def _predictions(config, params, tokens, options):
    """argmax next token after the last of tokens [F, B, T] -> [F, B]."""
    F, B, T = tokens.shape
    logits, _ = _lm_apply(config, params, tokens.reshape(F * B, T), None, capture=False, start_layer=0,
                          options=options, last_only=True)
    return logits[:, -1].argmax(-1).reshape(F, B)


def deletion_hits(config, params, tokens, relevance, target, *, position: int = -1, fill_token: int,
                  most_relevant_first: bool = True, include_position: bool = False, fractions=FRACTIONS,
                  options=None) -> np.ndarray:
    """bool [n_fractions, B]: whether the prediction at ``position`` is still ``target`` after
    deleting the top round(f n) candidates (module docstring)."""
    tokens = np.asarray(check_tokens(config, tokens))
    B, T = tokens.shape
    position = resolve_position(position, T)
    relevance = np.asarray(relevance)
    if relevance.shape != (B, T):
        raise ValueError(f"relevance must have the tokens' shape {(B, T)}, got {relevance.shape}")
    if not 0 <= fill_token < config.vocab_size:
        raise ValueError(f"fill_token {fill_token} is outside the vocabulary 0..{config.vocab_size - 1}")
    order = deletion_order(relevance, candidate_mask(T, position, include_position), most_relevant_first)
    batch = deleted_tokens(tokens, order, fractions, fill_token)
    # the model is causal: the prediction at position reads the first position + 1 tokens only
    pred = np.asarray(_predictions(config, params, jnp.asarray(batch[..., :position + 1]), check_options(options)))
    return pred == np.broadcast_to(np.asarray(target), (B,))[None]


def auc(curve, dx: float = 0.1) -> float:
    """Trapezoid area under a curve sampled every ``dx``."""
    curve = np.asarray(curve, np.float64)
    return float(dx * (curve[1:] + curve[:-1]).sum() / 2)


def evidence_hits(relevance, evidence, *, position: int, include_position: bool = False) -> np.ndarray:
    """float [B]: 1 where the evidence position alone holds the top relevance among the candidates,
    1/k where it is one of k tied for the top, else 0."""
    relevance = np.asarray(relevance, np.float64)
    cand = candidate_mask(relevance.shape[1], position, include_position)
    scores = np.where(cand, relevance, -np.inf)
    top = scores == scores.max(axis=1, keepdims=True)
    at_evidence = top[np.arange(len(scores)), np.asarray(evidence)]
    return at_evidence / top.sum(axis=1)


def random_relevance(shape, seed: int = 0) -> np.ndarray:
    """Independent uniform scores: the chance baseline."""
    return np.random.default_rng(seed).random(shape)


def recency_relevance(shape) -> np.ndarray:
    """The position itself: the latest token the most relevant (a recency baseline)."""
    return np.broadcast_to(np.arange(shape[-1], dtype=np.float64), shape).copy()


class TokenFaithfulness:
    """Accumulates the deletion curves (both orders) and the evidence hits of one explainer over
    batches; ``summary()`` gives the curves (percent), AUC+ / AUC- and the evidence hit rate."""

    def __init__(self, fractions=FRACTIONS):
        self.fractions = tuple(fractions)
        self.pos, self.neg, self.evidence, self.support = [], [], [], []

    def step(self, config, params, tokens, relevance, target, *, position: int = -1, fill_token: int,
             evidence=None, support=None, include_position: bool = False, options=None):
        position = resolve_position(position, np.shape(tokens)[1])
        kw = dict(position=position, fill_token=fill_token, include_position=include_position,
                  fractions=self.fractions, options=options)
        self.pos.append(deletion_hits(config, params, tokens, relevance, target, most_relevant_first=True, **kw))
        self.neg.append(deletion_hits(config, params, tokens, relevance, target, most_relevant_first=False, **kw))
        if evidence is not None:
            self.evidence.append(evidence_hits(relevance, evidence, position=position,
                                               include_position=include_position))
            if support is not None:  # the top token is the evidence or its support (e.g. the key)
                self.support.append(self.evidence[-1] + evidence_hits(relevance, support, position=position,
                                                                      include_position=include_position))

    def summary(self) -> dict:
        if not self.pos:
            raise ValueError("no batch was evaluated")
        pos = 100 * np.concatenate(self.pos, axis=1).mean(1)
        neg = 100 * np.concatenate(self.neg, axis=1).mean(1)
        out = {"n": int(sum(p.shape[1] for p in self.pos)), "fractions": list(self.fractions),
               "curve_positive": pos.tolist(), "curve_negative": neg.tolist(), "auc_positive": auc(pos),
               "auc_negative": auc(neg)}
        if self.evidence:
            out["evidence_hit_rate"] = float(100 * np.concatenate(self.evidence).mean())
        if self.support:
            out["evidence_or_support_hit_rate"] = float(100 * np.concatenate(self.support).mean())
        return out
