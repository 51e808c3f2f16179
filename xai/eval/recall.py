"""Procedural key-value recall sequences with known evidence, for the embedded demo language model.

A sequence of ``SEQ_LEN`` = 16 characters holds ``N_PAIRS`` = 4 key-value pairs (a key letter a-h
followed at once by a value digit 0-7; the keys of one sequence are distinct) scattered among
filler characters "_", then the query marker "?" and one of the keys:

    _c5__a2_f7g0___?a        (one such sequence; the answer is "2")

The next token after the last one is the value that followed the queried key: it is fixed by one
earlier token, the evidence (``evidence``: the value's position; ``support``: the matching key's).
Deleting a token means replacing it with the filler "_", which is in the training distribution.

Item ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng([s, i])`` alone: it never depends
on how many items are asked for, and a held-out set is another seed.
"""

from __future__ import annotations

import numpy as np

FILLER, QUERY = "_", "?"
KEYS = "abcdefgh"
VALUES = "01234567"
VOCAB = FILLER + QUERY + KEYS + VALUES  # token id = index in this string
FILLER_ID = VOCAB.index(FILLER)
N_PAIRS = 4
SEQ_LEN = 16  # pairs and fillers in the first SEQ_LEN - 2 positions, then "?" and the queried key


def encode(text: str) -> np.ndarray:
    """Characters of ``VOCAB`` -> token ids int32 [len(text)]; other characters are a ValueError."""
    bad = sorted({c for c in text if c not in VOCAB})
    if bad:
        raise ValueError(f"characters {bad} are not in the demo vocabulary {VOCAB!r}")
    return np.array([VOCAB.index(c) for c in text], np.int32)


def decode(ids) -> list[str]:
    """Token ids -> their characters."""
    return [VOCAB[int(i)] for i in np.asarray(ids).reshape(-1)]


def recall_item(seed: int, index: int, queries: int = 1) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(tokens, answers [queries], evidence position, support position) of one item.

    tokens: the 14-character context, then ``queries`` queries of distinct keys, each
    "?" key followed by its answer except the last: ``context ?k1 v1 ?k2 v2 ... ?kq`` (length
    ``SEQ_LEN + 3 (queries - 1)``). Query i's answer is predicted at position
    ``SEQ_LEN - 1 + 3 i``; the first ``SEQ_LEN`` tokens are the item with one query (the same
    draw). Evidence and support are those of the first query.
    """
    if not 1 <= queries <= N_PAIRS:
        raise ValueError(f"queries must be in 1..{N_PAIRS}, got {queries}")
    rng = np.random.default_rng([seed, index])
    keys = rng.choice(len(KEYS), N_PAIRS, replace=False)
    values = rng.integers(0, len(VALUES), N_PAIRS)
    n_fill = SEQ_LEN - 2 - 2 * N_PAIRS
    # slots: N_PAIRS pairs and n_fill fillers in a random order
    slots = rng.permutation(np.array([1] * N_PAIRS + [0] * n_fill))
    tokens, positions = [], []
    pair = 0
    for s in slots:
        if s:
            positions.append(len(tokens))
            tokens += [VOCAB.index(KEYS[keys[pair]]), VOCAB.index(VALUES[values[pair]])]
            pair += 1
        else:
            tokens.append(FILLER_ID)
    asked = rng.permutation(N_PAIRS)[:queries]
    answers = []
    for i, q in enumerate(asked):
        tokens += [VOCAB.index(QUERY), VOCAB.index(KEYS[keys[q]])]
        answers.append(VOCAB.index(VALUES[values[q]]))
        if i < queries - 1:
            tokens.append(answers[-1])
    q = asked[0]
    return np.array(tokens, np.int32), np.array(answers, np.int32), positions[q] + 1, positions[q]


def query_positions(queries: int = 1) -> np.ndarray:
    """The positions at which the answers of ``recall_item(..., queries)`` are predicted."""
    return SEQ_LEN - 1 + 3 * np.arange(queries)


def recall_dataset(n: int, seed: int = 0, start: int = 0, queries: int = 1) -> dict[str, np.ndarray]:
    """Items ``start .. start + n - 1`` of ``seed``: tokens int32 [n, T] (T = ``SEQ_LEN`` for one
    query), answer [n] (the next token after the last one; [n, queries] for several queries),
    evidence and support positions [n] (of the first query)."""
    items = [recall_item(seed, i, queries) for i in range(start, start + n)]
    answers = np.stack([a for _, a, _, _ in items])
    return {"tokens": np.stack([t for t, *_ in items]), "answer": answers[:, 0] if queries == 1 else answers,
            "evidence": np.array([e for *_, e, _ in items], np.int32),
            "support": np.array([s for *_, s in items], np.int32)}
