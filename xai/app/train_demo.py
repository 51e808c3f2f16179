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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mamba_jax import init_params, vim_apply
from mamba_jax.options import Options
from xai.app.demo import DEMO_CONFIG, unflatten
from xai.app.training import save_weights, train
from xai.eval.shapes import shapes_batches, shapes_dataset

TRAIN_SEED, HELD_OUT_SEED = 0, 1
TRAIN_OPTIONS = Options(precision=None)  # the backend's default matmuls (TF32 on a GPU): training speed


def make_loss(config, label_smoothing):
    def loss_fn(params, images, labels):
        logits = vim_apply(config, params, images, options=TRAIN_OPTIONS)
        onehot = optax.smooth_labels(jax.nn.one_hot(labels, config.num_classes), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, onehot).mean()
        return loss, (logits.argmax(-1) == labels).mean()

    return loss_fn


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
    held_images, held_labels, _ = shapes_dataset(args.held_out, seed=HELD_OUT_SEED)
    held_images, held_labels = jnp.asarray(held_images), jnp.asarray(held_labels)
    batches = shapes_batches(args.batch_size, seed=TRAIN_SEED)

    log = dict(config=str(config), init=args.init)
    params = train(params, make_loss(config, args.label_smoothing), lambda i: next(batches)[:2],
                   lambda p: accuracy(config, p, held_images, held_labels), args,
                   held_out=f"{args.held_out} images, seed {HELD_OUT_SEED}", train_acc="batch acc", log=log)
    log.update(n_params=int(n_params), batch_size=args.batch_size, lr=args.lr)
    save_weights(args.out, params, log)


if __name__ == "__main__":
    main()
