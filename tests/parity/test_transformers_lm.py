"""Independent parity: our Mamba language model against Hugging Face ``transformers``' MambaForCausalLM.

``transformers.MambaForCausalLM`` is a third-party PyTorch Mamba written without reference to this
project; without the CUDA packages it runs its pure-PyTorch path on the CPU. Each case builds a
random transformers model, moves the structured initializations away from themselves (A, D, the
step-size and conv biases, the norms, the projection biases: every parameter matters), writes it
with ``save_pretrained`` and loads that folder with ``convert.load_checkpoint``: the loader, the
key table and the model are checked together.

Compared (float32; JAX matmul precision "highest", plain float32 in torch):
  logits                              1e-5 x max |logits|
  every layer's residual stream       1e-5 x max |stream|   (transformers' output_hidden_states:
                                      the stream after each block, then norm_f's output)
  d <logits, cotangent> / d embeddings  1e-5 x max |grad|   (JAX vjp vs torch autograd)
"""

import functools
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from transformers import MambaConfig, MambaForCausalLM  # noqa: E402
from transformers.models.mamba.modeling_mamba import MambaMixer  # noqa: E402

from convert import load_checkpoint  # noqa: E402
from mamba_jax import lm_apply  # noqa: E402
from mamba_jax.options import Options  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

if not hasattr(MambaMixer, "slow_forward") and any(
        importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d")):
    pytest.skip("transformers would run the mamba_ssm / causal_conv1d kernels, not its pure-PyTorch path",
                allow_module_level=True)

# name -> (MambaConfig fields, batch, T). Every flag the mixer reads is varied: conv bias on/off,
# projection biases on/off, dt rank (explicit and "auto"), state size, conv width, expand, untied head.
CASES = {
    "d16_n4_L2_k4_r2": (dict(hidden_size=16, state_size=4, num_hidden_layers=2, conv_kernel=4,
                             time_step_rank=2, vocab_size=40), 2, 11),
    "d32_n8_L3_k3_rauto_no_conv_bias_proj_bias": (dict(hidden_size=32, state_size=8, num_hidden_layers=3,
                                                       conv_kernel=3, time_step_rank="auto", use_conv_bias=False,
                                                       use_bias=True, vocab_size=64), 2, 9),
    "d24_n2_L2_k2_r5_e3_proj_bias": (dict(hidden_size=24, state_size=2, num_hidden_layers=2, conv_kernel=2,
                                          expand=3, time_step_rank=5, use_bias=True, vocab_size=33), 3, 7),
    "d8_n16_L1_k4_r1_untied_no_conv_bias": (dict(hidden_size=8, state_size=16, num_hidden_layers=1, conv_kernel=4,
                                                 time_step_rank=1, use_conv_bias=False, tie_word_embeddings=False,
                                                 vocab_size=20), 2, 6),
}
# A random model of mamba-130m's shape (the published architecture, random weights), initialized as
# mamba_ssm initializes the published models before training (embeddings N(0, 0.02), out_proj scaled
# by 1 / sqrt(layers)). With transformers' default init (embeddings N(0, 0.1), no rescaling) the
# random 24-layer residual stream grows to ~900 and float32 itself stops being accurate to 1e-5:
# transformers' float32 logits differ from its own float64 ones by 5e-5 to 8e-5 of their maximum
# (ours by 8e-5 to 4e-4), so that model says nothing about 1e-5. Well conditioned, transformers'
# float32 is within 5e-7 of its float64 and ours within 7e-7.
MAMBA_130M = dict(hidden_size=768, state_size=16, num_hidden_layers=24, conv_kernel=4, time_step_rank="auto",
                  vocab_size=50280, rescale_prenorm_residual=True, initializer_range=0.02)


def hf_model(fields, seed):
    """A transformers MambaForCausalLM with every parameter moved off its structured init."""
    torch.manual_seed(seed)
    config = MambaConfig(**{"use_bias": False, **fields})
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.5 * torch.randn_like(p))  # A no longer -(1..N) in every channel
            elif name.endswith("mixer.D") or name.endswith("dt_proj.bias"):
                p.add_(torch.randn_like(p))  # D of both signs; spread step sizes
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):  # conv1d, in_proj, out_proj biases (zero-initialized ones too)
                p.add_(0.3 * torch.randn_like(p))
    return model


@functools.cache
def _case(name, tmp_root):
    """(config, params, tokens, cotangent, transformers logits, hidden states, d<logits, cot>/d embeddings)."""
    from pathlib import Path

    fields, batch, length = CASES[name] if name in CASES else (MAMBA_130M, 1, 8)
    model = hf_model(fields, seed=sorted(CASES).index(name) if name in CASES else 99)
    folder = Path(tmp_root) / name
    model.save_pretrained(folder)
    config, params = load_checkpoint(str(folder))
    rng = np.random.default_rng(len(name))
    tokens = rng.integers(0, fields["vocab_size"], (batch, length))
    cot = rng.normal(size=(batch, length, fields["vocab_size"])).astype(np.float32)
    embeds = model.backbone.embeddings(torch.from_numpy(tokens)).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
    (out.logits * torch.from_numpy(cot)).sum().backward()
    hidden = [h.detach().numpy() for h in out.hidden_states]
    return config, params, tokens, cot, out.logits.detach().numpy(), hidden, embeds.grad.numpy()


@functools.cache
def _ours(name, tmp_root, scan="auto"):
    config, params, tokens, cot, *_ = _case(name, tmp_root)
    opts = Options(scan_method=scan, precision="highest")
    perturb = jnp.zeros((config.depth + 1, *tokens.shape, config.embed_dim), jnp.float32)

    def f(p):
        logits, inter = lm_apply(config, params, tokens, capture=True, perturb=p, options=opts)
        return (logits * cot).sum(), (logits, inter)

    with jax.default_matmul_precision("highest"):
        grads, (logits, inter) = jax.grad(f, has_aux=True)(perturb)
    return np.asarray(logits), jax.tree.map(np.asarray, inter), np.asarray(grads[0])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_lm"))


def _streams(config, inter):
    """Our residual streams r_1 .. r_depth and norm_f's output, in transformers' hidden_states order."""
    return [inter["residual"][l] for l in range(1, config.depth)] + [inter["residual_final"], inter["final"]]


def _check(name, root, scan="auto"):
    config, params, tokens, cot, ref_logits, ref_hidden, ref_grad = _case(name, root)
    logits, inter, grad = _ours(name, root, scan)
    if len(ref_hidden) == config.depth + 2:  # transformers versions that list the embeddings first
        assert_close(inter["tokens"], ref_hidden[0], rtol_of_max=1e-6, name="embeddings")
        ref_hidden = ref_hidden[1:]
    assert len(ref_hidden) == config.depth + 1
    worst = {"logits": assert_close(logits, ref_logits, rtol_of_max=1e-5, name=f"logits ({name})")}
    for l, (ours, ref) in enumerate(zip(_streams(config, inter), ref_hidden)):
        what = f"residual stream r_{l + 1}" if l < config.depth else "norm_f output"
        worst[what] = assert_close(ours, ref, rtol_of_max=1e-5, name=f"{what} ({name})")
    worst["grad"] = assert_close(grad, ref_grad, rtol_of_max=1e-5, name=f"d <logits, cot> / d embeddings ({name})")
    scale = {"logits": np.abs(ref_logits).max(), "grad": np.abs(ref_grad).max()}
    print(f"\n{name} ({scan}): logits max |diff| {worst['logits']:.2e} (max {scale['logits']:.3f}); streams max "
          f"|diff| {max(v for k, v in worst.items() if k not in scale):.2e}; d/d embeddings {worst['grad']:.2e} "
          f"(max {scale['grad']:.3f})")
    return config


@pytest.mark.parametrize("name", list(CASES))
def test_logits_streams_and_gradients_match_transformers(name, root):
    config = _check(name, root)
    fields = CASES[name][0]
    assert config.conv_bias == fields.get("use_conv_bias", True) and config.proj_bias == fields.get("use_bias", False)
    assert config.tie_word_embeddings == fields.get("tie_word_embeddings", True)


def test_associative_scan_matches_transformers(root):
    _check("d32_n8_L3_k3_rauto_no_conv_bias_proj_bias", root, scan="associative")


def test_mamba_130m_shape_matches_transformers(root):
    """A random model of mamba-130m's shape (768 wide, 24 layers, vocabulary 50280, N 16), 8 tokens."""
    t0 = time.time()
    config = _check("mamba_130m", root)
    assert config.name == "mamba-130m" and config.rank == 48 and config.d_inner == 1536
    print(f"mamba-130m-shaped case: {time.time() - t0:.1f} s")

