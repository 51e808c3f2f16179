"""Attention rollout (Abnar & Zuidema 2020), the one implementation every method shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rollout(attn, row: int):
    """Row ``row`` of the rollout of per-layer attention matrices.

    attn: [n_layers, B, L, L], earliest layer first. Each layer's matrix becomes
    M_l = I + attn_l with every row divided by its sum; the rollout is
    R = M_last @ ... @ M_first (later layers on the left). Returns R[:, row, :]: [B, L],
    computed as a chain of vector-matrix products starting from e_row.
    """
    n, B, L, _ = attn.shape
    eye = jnp.eye(L, dtype=attn.dtype)
    M = attn + eye
    M = M / M.sum(-1, keepdims=True)

    def step(r, M_l):  # r @ M_l, applied from the last layer down to the first
        return jnp.einsum("bi,bij->bj", r, M_l), None

    r0 = jnp.broadcast_to(eye[row], (B, L))
    r, _ = jax.lax.scan(step, r0, M, reverse=True)
    return r


def rank_one(vectors):
    """The official code's per-layer 'matrix': every row equal to the vector. [n, B, L] -> [n, B, L, L]."""
    return jnp.broadcast_to(vectors[..., None, :], vectors.shape + vectors.shape[-1:])
