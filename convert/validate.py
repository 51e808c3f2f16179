"""Side-by-side validation: the Flax model and the pure-PyTorch reference on the same inputs."""

from __future__ import annotations

import numpy as np

from convert.checkpoint import load_checkpoint, read_state_dict, resolve, unwrap_state_dict
from mamba_jax import preprocess, vim_apply


def validate(src, images=(), *, variant=None, n_random: int = 2, seed: int = 0) -> dict:
    """Run both models on ``images`` (paths; random normal inputs when empty) and report
    logit differences, top-5 agreement and the per-layer residual-stream differences."""
    import torch

    from convert.reference import VimReference

    config, params = load_checkpoint(src, variant)
    if images:
        x = np.stack([preprocess(p, config) for p in images])
    else:
        x = np.random.default_rng(seed).normal(size=(n_random, config.img_size, config.img_size,
                                                     config.channels)).astype(np.float32)
    ref = VimReference(config).eval()
    if isinstance(src, dict):
        sd = unwrap_state_dict(src)
    else:
        from convert.mapping import params_to_state_dict

        path = resolve(src)
        sd = params_to_state_dict(config, params) if path.is_dir() else read_state_dict(path)
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        ref_logits, cap = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), capture=True)
    ref_logits = ref_logits.numpy()
    logits, inter = vim_apply(config, params, x, capture=True)
    logits = np.asarray(logits)
    diff = np.abs(logits - ref_logits)
    scale = np.abs(ref_logits).max()
    top5 = [set(np.argsort(-a)[:5]) == set(np.argsort(-b)[:5]) for a, b in zip(logits, ref_logits)]
    layers = []
    for l in range(config.depth):
        r, rr = np.asarray(inter["residual"][l]), cap["residual"][l].numpy()
        d = np.abs(r - rr)
        layers.append(dict(layer=l, max_abs=float(d.max()), rel_to_max=float(d.max() / np.abs(rr).max())))
    return dict(model=config.name or str(config), images=[str(p) for p in images] or f"{len(x)} random",
                logits_max_abs=float(diff.max()), logits_mean_abs=float(diff.mean()),
                logits_rel_to_max=float(diff.max() / scale), top1_agree=float(np.mean(
                    logits.argmax(-1) == ref_logits.argmax(-1))), top5_agree=float(np.mean(top5)), layers=layers)


def format_report(r: dict) -> str:
    lines = [f"model: {r['model']}", f"inputs: {r['images']}",
             f"logits: max |diff| {r['logits_max_abs']:.3e}, mean |diff| {r['logits_mean_abs']:.3e}, "
             f"max |diff| / max |logit| {r['logits_rel_to_max']:.3e}",
             f"top-1 agreement {r['top1_agree']:.0%}, top-5 set agreement {r['top5_agree']:.0%}",
             "residual stream entering each layer (max |diff|, relative to max |value|):"]
    lines += [f"  layer {x['layer']:2d}: {x['max_abs']:.3e}  ({x['rel_to_max']:.3e})" for x in r["layers"]]
    return "\n".join(lines)
