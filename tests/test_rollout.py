"""The rollout of xai/rollout.py worked out by hand: rollout of explicit per-layer matrices
(I + A, rows normalized, composed last layer first) and of the official rank-one layers.

Tolerance (float32): rtol 1e-6 against fractions computed by hand.
"""

import jax.numpy as jnp
import numpy as np

from xai.rollout import rank_one, rollout


def test_rollout_by_hand():
    # two layers, L = 2: M1 = I + [[1, 1], [0, 2]] -> rows / sums = [[2/3, 1/3], [0, 1]]
    #                    M2 = I + [[0, 1], [1, 0]] -> [[1/2, 1/2], [1/2, 1/2]]
    # R = M2 @ M1 = [[1/3, 2/3], [1/3, 2/3]]; row 0 = [1/3, 2/3]
    attn = jnp.array([[[[1.0, 1.0], [0.0, 2.0]]], [[[0.0, 1.0], [1.0, 0.0]]]])
    np.testing.assert_allclose(rollout(attn, 0), [[1 / 3, 2 / 3]], rtol=1e-6)
    # order matters: R' = M1 @ M2 = [[1/2, 1/2], [1/2, 1/2]]
    np.testing.assert_allclose(rollout(attn[::-1], 0), [[0.5, 0.5]], rtol=1e-6)


def test_rank_one_rollout_by_hand():
    # official per-layer matrix: every row e_i + a, divided by 1 + sum(a); a = [1, 0, 1]
    a = jnp.array([[[1.0, 0.0, 1.0]]])
    M = np.array([[2, 0, 1], [1, 1, 1], [1, 0, 2]]) / 3.0
    np.testing.assert_allclose(rollout(rank_one(a), 1), M[1:2], rtol=1e-6)
