"""Independent parity: our causal Mamba mixer against Hugging Face ``transformers``' MambaMixer.

``transformers.models.mamba.modeling_mamba.MambaMixer`` is a third-party PyTorch Mamba mixer,
written without reference to this project. Without the CUDA packages (``mamba_ssm``,
``causal_conv1d``) it runs a pure-PyTorch path on the CPU: ``slow_forward`` in transformers 4.x,
and in 5.x the reference fallbacks of its hub-kernel functions (sequential scan in eager mode).
``VimConfig(bimamba="none")`` makes our ``Mixer`` the same single causal branch:
in_proj -> x, z -> causal depthwise conv1d (+ bias) -> silu -> x_proj -> dt_proj -> softplus ->
selective scan with the D skip -> y * silu(z) -> out_proj. Its state dict is mapped onto our
parameters with the project's own checkpoint table (``convert.mapping``), whose names are the
official Mamba ones that transformers uses too.

Tolerances (float32; JAX matmul precision "highest", plain float32 on the CPU in torch):
  mixer output             1e-5 x max |out|     (one layer of float32 rounding, different op orders)
  d <out, cotangent> / d h 1e-5 x max |grad|    (JAX vjp vs torch autograd)
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from transformers.models.mamba.modeling_mamba import MambaConfig, MambaMixer  # noqa: E402

from convert.mapping import LAYER_TABLE, to_flax  # noqa: E402
from mamba_jax.config import VimConfig  # noqa: E402
from mamba_jax.mixer import Mixer  # noqa: E402
from mamba_jax.options import Options  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

if not hasattr(MambaMixer, "slow_forward") and any(
        importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d")):
    pytest.skip("transformers would run the mamba_ssm / causal_conv1d kernels, not its pure-PyTorch path",
                allow_module_level=True)

# name -> (MambaConfig fields, VimConfig dt_rank, batch, L). dt_rank "auto" is ceil(hidden / 16)
# in transformers and dt_rank=None in VimConfig: the last case checks the two agree.
CASES = {
    "d16_n4_e2_k4_r2_L11": (dict(hidden_size=16, state_size=4, expand=2, conv_kernel=4, time_step_rank=2), 2, 2, 11),
    "d32_n8_e2_k3_r3_L17": (dict(hidden_size=32, state_size=8, expand=2, conv_kernel=3, time_step_rank=3), 3, 2, 17),
    "d8_n2_e3_k2_rauto_L9_no_conv_bias": (dict(hidden_size=8, state_size=2, expand=3, conv_kernel=2,
                                                time_step_rank="auto", use_conv_bias=False), None, 2, 9),
}
METHODS = ["sequential", "associative"]
_PREFIX = "layers.{i}.mixer."  # official key prefix in convert.mapping; transformers' mixer keys lack it


def _hf_config(fields, **extra):
    fields = dict(num_hidden_layers=1, vocab_size=8, use_bias=False, use_mambapy=False, **fields)
    return MambaConfig(**{**fields, **extra})


def _hf_mixer(fields, seed, **extra):
    torch.manual_seed(seed)
    mixer = MambaMixer(_hf_config(fields, **extra), layer_idx=0).eval()
    with torch.no_grad():  # make every parameter matter: move the structured inits away from themselves
        mixer.A_log.add_(0.5 * torch.randn_like(mixer.A_log))  # A no longer -(1..N) in every channel
        mixer.D.add_(torch.randn_like(mixer.D))  # D no longer all ones (some negative)
        mixer.dt_proj.bias.add_(torch.randn_like(mixer.dt_proj.bias))  # larger, spread step sizes
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.add_(0.3 * torch.randn_like(mixer.conv1d.bias))
    return mixer


def _vim_config(fields, dt_rank):
    return VimConfig(bimamba="none", embed_dim=fields["hidden_size"], d_state=fields["state_size"],
                     d_conv=fields["conv_kernel"], expand=fields["expand"], dt_rank=dt_rank)


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _unflatten(items):
    tree = {}
    for path, v in items:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def mixer_params(config: VimConfig, sd, batch=1, length=4):
    """transformers MambaMixer state dict -> our Mixer params, through convert.mapping's table.

    Returns (params, unused transformers keys). Our Mixer always has a conv bias; when
    transformers has none (use_conv_bias=False) it is set to zero here, by hand.
    """
    h = jax.ShapeDtypeStruct((batch, length, config.embed_dim), jnp.float32)
    shapes = jax.eval_shape(Mixer(config).init, jax.random.PRNGKey(0), h)["params"]
    sd = {k: v.detach().numpy() for k, v in sd.items()}
    items = []
    for path, shape in _flatten(shapes):
        key, layout = LAYER_TABLE[("mixer", *path)]
        assert key.startswith(_PREFIX), key
        key = key[len(_PREFIX):]
        if key not in sd and key == "conv1d.bias":  # use_conv_bias=False: no bias is a zero bias
            value = np.zeros(shape.shape, np.float32)
        else:
            value = np.ascontiguousarray(to_flax(sd.pop(key), layout), np.float32)
        assert value.shape == shape.shape, (key, value.shape, shape.shape)
        items.append((path, jnp.asarray(value)))
    return _unflatten(items), sorted(sd)


def _reference_forward(mixer, h):
    if hasattr(mixer, "slow_forward"):  # transformers 4.x: the pure-PyTorch path by name
        return mixer.slow_forward(h)
    return mixer(h)  # transformers 5.x: the torch fallbacks of its kernel functions


@functools.cache
def _pair(case):
    """(config, params, h, cotangent, transformers output, transformers d<out, cot>/dh) of a case."""
    fields, dt_rank, batch, length = CASES[case]
    mixer = _hf_mixer(fields, seed=sorted(CASES).index(case))
    config = _vim_config(fields, dt_rank)
    params, unused = mixer_params(config, mixer.state_dict())
    assert not unused, f"transformers parameters with no place in our Mixer: {unused}"
    rng = np.random.default_rng(len(case))
    h = rng.normal(size=(batch, length, config.embed_dim)).astype(np.float32)
    cot = rng.normal(size=(batch, length, config.embed_dim)).astype(np.float32)
    h_t = torch.from_numpy(h.copy()).requires_grad_(True)
    out_t = _reference_forward(mixer, h_t)
    (out_t * torch.from_numpy(cot)).sum().backward()
    return config, params, h, cot, out_t.detach().numpy(), h_t.grad.numpy()


@functools.cache
def _ours(case, method):
    """Our mixer output and d <out, cotangent> / d h, via jax.vjp."""
    config, params, h, cot, _, _ = _pair(case)
    model = Mixer(config, Options(scan_method=method, precision="highest"))

    # one compilation instead of op-by-op dispatch; LLVM optimization off halves the compile
    # time (most of this test's run time) and changes no float32 result here
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def forward_and_vjp(params, h, cot):
        out, vjp = jax.vjp(lambda x: model.apply({"params": params}, x)[0], h)
        return out, vjp(cot)[0]

    with jax.default_matmul_precision("highest"):
        out, grad = forward_and_vjp(params, jnp.asarray(h), jnp.asarray(cot))
    return np.asarray(out), np.asarray(grad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(case, method):
    ref = _pair(case)[4]
    worst = assert_close(_ours(case, method)[0], ref, rtol_of_max=1e-5, name=f"mixer output ({case}, {method})")
    print(f"\n{case} {method}: forward max |diff| {worst:.2e} (max |out| {np.abs(ref).max():.3f})")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_input_gradient_matches_transformers(case, method):
    ref = _pair(case)[5]
    worst = assert_close(_ours(case, method)[1], ref, rtol_of_max=1e-5,
                         name=f"d <out, cotangent> / d h ({case}, {method})")
    print(f"\n{case} {method}: backward max |diff| {worst:.2e} (max |grad| {np.abs(ref).max():.3f})")


def test_projection_biases_have_no_counterpart():
    """Our Mixer is transformers' use_bias=False model (Vim's and Mamba's default): with
    use_bias=True, exactly the in_proj and out_proj biases are left without a place."""
    fields, dt_rank, _, _ = CASES["d16_n4_e2_k4_r2_L11"]
    mixer = _hf_mixer(fields, seed=0, use_bias=True)
    _, unused = mixer_params(_vim_config(fields, dt_rank), mixer.state_dict())
    assert unused == ["in_proj.bias", "out_proj.bias"]
