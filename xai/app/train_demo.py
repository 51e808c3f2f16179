"""Train the embedded demo model: a small Vim on the procedural shapes, with optax.

    python -m xai.app.train_demo --out xai/assets/demo_vim.npz          # ~5 min on one H200

Training images come from ``xai.eval.shapes`` with seed 0 (an endless stream rendered on the
device); the held-out set is seed 1 (never seen in training). The script prints the loss
and held-out accuracy as it goes and writes the weights (float32 npz, atomically) and a
JSON log next to them.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mamba_jax import init_params, vim_apply
from mamba_jax.files import atomic_write, atomic_write_text
from mamba_jax.options import Options
from xai.app.demo import DEMO_CONFIG, flatten, unflatten
from xai.eval.shapes import shapes_batches, shapes_dataset

TRAIN_SEED, HELD_OUT_SEED = 0, 1
TRAIN_OPTIONS = Options(precision=None)  # the backend's default matmuls (TF32 on a GPU): training speed


def make_step(config, optimizer, label_smoothing):
    def loss_fn(params, images, labels):
        logits = vim_apply(config, params, images, options=TRAIN_OPTIONS)
        onehot = optax.smooth_labels(jax.nn.one_hot(labels, config.num_classes), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, onehot).mean()
        return loss, (logits.argmax(-1) == labels).mean()

    @jax.jit
    def step(params, opt_state, images, labels):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return step


@functools.cache
def _predictor(config):
    """One compiled classifier per config (accuracy() runs at every evaluation)."""
    return jax.jit(lambda p, x: vim_apply(config, p, x, options=TRAIN_OPTIONS).argmax(-1))


def accuracy(config, params, images, labels, batch=250):
    predict = _predictor(config)
    hits = 0
    for i in range(0, len(images), batch):
        hits += int((predict(params, images[i:i + batch]) == labels[i:i + batch]).sum())
    return hits / len(images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="xai/assets/demo_vim.npz")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--time-budget", type=float, default=330.0, help="stop training after this many seconds")
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--init", default=None, help="start from these weights (.npz) instead of a random init")
    args = p.parse_args(argv)

    config = DEMO_CONFIG
    params = init_params(config, jax.random.PRNGKey(0))
    if args.init:  # continue from saved weights (a second run with a fresh schedule)
        with np.load(args.init) as data:
            params = unflatten(dict(data))
        print(f"continuing from {args.init}", flush=True)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"demo Vim: {n_params / 1e6:.2f}M parameters on {jax.devices()[0].device_kind}", flush=True)
    # the learning rate follows linear warm-up, then a cosine over the *time* budget (or the
    # step budget, whichever ends first), so a run cut by the clock still anneals to zero
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.inject_hyperparams(optax.adamw)(learning_rate=0.0,
                                                                  weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)

    def lr_at(i, elapsed):
        progress = min(1.0, max(i / args.steps, elapsed / args.time_budget))
        return args.lr * min(1.0, (i + 1) / args.warmup) * 0.5 * (1.0 + math.cos(math.pi * progress))
    step = make_step(config, optimizer, args.label_smoothing)
    held_images, held_labels, _ = shapes_dataset(args.held_out, seed=HELD_OUT_SEED)
    held_images, held_labels = jnp.asarray(held_images), jnp.asarray(held_labels)

    log = dict(config=str(config), init=args.init, steps=[], held_out=[])
    t0 = time.time()
    batches = shapes_batches(args.batch_size, seed=TRAIN_SEED)
    done = 0
    for i in range(args.steps):
        images, labels, _ = next(batches)
        opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr_at(i, time.time() - t0), jnp.float32)
        params, opt_state, loss, acc = step(params, opt_state, images, labels)
        done = i + 1
        if done % 100 == 0:
            loss, acc = float(loss), float(acc)
            log["steps"].append(dict(step=done, loss=loss, train_acc=acc, seconds=time.time() - t0))
            print(f"step {done:5d}  loss {loss:.4f}  batch acc {acc:.3f}  {time.time() - t0:6.1f}s", flush=True)
        if done % args.eval_every == 0 or done == args.steps:
            held = accuracy(config, params, held_images, held_labels)
            log["held_out"].append(dict(step=done, accuracy=held))
            print(f"          held-out accuracy ({args.held_out} images, seed {HELD_OUT_SEED}): {held:.4f}",
                  flush=True)
        if time.time() - t0 > args.time_budget:
            print(f"time budget reached after {done} steps", flush=True)
            break
    held = accuracy(config, params, held_images, held_labels)
    log.update(final_held_out_accuracy=held, steps_done=done, train_seconds=time.time() - t0,
               n_params=int(n_params), batch_size=args.batch_size, lr=args.lr)
    print(f"final held-out accuracy: {held:.4f} after {done} steps", flush=True)

    out = Path(args.out)
    flat = flatten(jax.device_get(params))
    atomic_write(out, lambda f: np.savez_compressed(f, **flat))
    atomic_write_text(out.with_suffix(".json"), json.dumps(log, indent=1, allow_nan=False))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
