"""The scans against each other and against a direct NumPy recurrence, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax import ssm


def numpy_recurrence(u, delta, A, B, C, D):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ; y_t = h_t C_t + D u_t, one step at a time."""
    L, E = u.shape
    h = np.zeros(A.shape)
    y = np.zeros((L, E))
    for t in range(L):
        h = np.exp(delta[t][:, None] * A) * h + (delta[t] * u[t])[:, None] * B[t][None, :]
        y[t] = h @ C[t] + D * u[t]
    return y


def random_inputs(rng, L, E=6, N=4, delta_scale=1.0):
    u = rng.normal(size=(L, E))
    delta = np.log1p(np.exp(rng.normal(size=(L, E)))) * delta_scale
    A = -np.exp(rng.normal(size=(E, N)))
    B = rng.normal(size=(L, N))
    C = rng.normal(size=(L, N))
    D = rng.normal(size=E)
    return u, delta, A, B, C, D


@pytest.mark.parametrize("L,delta_scale", [(1, 1.0), (7, 1.0), (197, 1.0), (1500, 1.0),
                                           (64, 1e-6), (64, 50.0)])
def test_scans_match_numpy_recurrence_float64(x64, L, delta_scale):
    args = random_inputs(np.random.default_rng(L), L, delta_scale=delta_scale)
    expected = numpy_recurrence(*args)
    for method in ("associative", "sequential"):
        y = np.asarray(jax.jit(ssm.selective_scan, static_argnames="method")(*args, method=method))
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-10 * max(1.0, np.abs(expected).max()),
                                   err_msg=f"{method} scan, L={L}, delta scale {delta_scale}")


def test_scans_agree_float32():
    args = [a.astype(np.float32) for a in random_inputs(np.random.default_rng(0), 197, E=32, N=16)]
    ya = np.asarray(ssm.selective_scan(*args, method="associative"))
    ys = np.asarray(ssm.selective_scan(*args, method="sequential"))
    assert np.abs(ya - ys).max() <= 1e-5 * np.abs(ys).max()


def test_hidden_attention_reproduces_scan_float64(x64):
    u, delta, A, B, C, D = random_inputs(np.random.default_rng(1), 50, delta_scale=3.0)
    alpha = np.asarray(ssm.hidden_attention(delta, A, B, C))
    assert alpha.shape == (6, 50, 50)
    assert np.all(np.triu(alpha, k=1) == 0), "alpha must be lower triangular (causal)"
    y_attn = np.einsum("etj,je->te", alpha, u) + D * u
    np.testing.assert_allclose(y_attn, numpy_recurrence(u, delta, A, B, C, D), rtol=0, atol=1e-10)


def test_hidden_attention_hand_computed_entry(x64):
    # one channel, one state: alpha[t, j] = C_t exp(A (delta_{j+1} + ... + delta_t)) delta_j B_j
    delta = np.array([[0.5], [1.0], [2.0]])
    A = np.array([[-0.3]])
    B = np.array([[2.0], [3.0], [5.0]])
    C = np.array([[7.0], [11.0], [13.0]])
    alpha = np.asarray(ssm.hidden_attention(delta, A, B, C))[0]
    assert alpha[2, 0] == pytest.approx(13.0 * np.exp(-0.3 * 3.0) * 0.5 * 2.0, rel=1e-14)
    assert alpha[1, 1] == pytest.approx(11.0 * 1.0 * 3.0, rel=1e-14)
    assert alpha[0, 2] == 0.0


def test_discretize_matches_definition():
    delta, A = jnp.array([0.5, 2.0]), jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
    B, u = jnp.array([1.0, 4.0]), jnp.array([3.0, -1.0])
    A_bar, B_bar_u = ssm.discretize(delta, A, B, u)
    np.testing.assert_allclose(A_bar, np.exp(np.array([[-0.5, -1.0], [-1.0, -6.0]])), rtol=1e-6)
    np.testing.assert_allclose(B_bar_u, np.array([[1.5, 6.0], [-2.0, -8.0]]), rtol=1e-6)


def test_unknown_scan_method():
    args = random_inputs(np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="unknown scan method"):
        ssm.selective_scan(*args, method="fast")


def test_class_token_row_exact_is_row_of_alpha(x64):
    u, delta, A, B, C, D = random_inputs(np.random.default_rng(2), 21, delta_scale=2.0)
    alpha = np.asarray(ssm.hidden_attention(delta, A, B, C))
    for pos in (0, 10, 20):
        row = np.asarray(ssm.class_token_row(delta, A, B, C, pos))
        np.testing.assert_allclose(row, alpha[:, pos, :], rtol=0, atol=1e-12)


def test_class_token_row_official_brute_force(x64):
    """SPEC: v[d, j] = sum_n C_pos[n] prod_{k=j+1}^{pos-1} exp(Delta_k A) Delta_j B_j[n], j < pos; 0 else."""
    _, delta, A, B, C, _ = random_inputs(np.random.default_rng(3), 12, delta_scale=2.0)
    pos = 7
    want = np.zeros((A.shape[0], 12))
    for d in range(A.shape[0]):
        for j in range(pos):
            for n in range(A.shape[1]):
                prod = 1.0
                for k in range(j + 1, pos):
                    prod *= np.exp(delta[k, d] * A[d, n])
                want[d, j] += C[pos, n] * prod * delta[j, d] * B[j, n]
    got = np.asarray(ssm.class_token_row(delta, A, B, C, pos, official=True))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("official", [False, True])
def test_class_token_row_float32_long_sequence(official):
    """float32 at L = 197 against a float64 NumPy oracle (suffix sums by np.cumsum), to 1e-5 of the
    row's maximum: the triangular-matrix suffix sum must keep full float32 precision."""
    _, delta, A, B, C, _ = random_inputs(np.random.default_rng(5), 197, E=8, N=16)
    pos = 98
    last = pos if official else pos + 1
    d = np.where((np.arange(197) < last)[:, None], delta, 0.0)
    seg = np.cumsum(d[::-1], axis=0)[::-1] - d  # exclusive suffix sums, float64
    want = np.einsum("n,jen,jn->ej", C[pos], np.exp(seg[:, :, None] * A[None]), B) * delta.T
    want[:, pos if official else pos + 1:] = 0.0
    f32 = [jnp.asarray(a, jnp.float32) for a in (delta, A, B, C)]
    got = np.asarray(jax.jit(ssm.class_token_row, static_argnames=("pos", "official"))(*f32, pos=pos,
                                                                                      official=official))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
