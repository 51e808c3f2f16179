"""The training loop of the embedded demo models (``train_demo``: the Vim on shapes;
``train_lm_demo``: the language model on key-value recall), written once.

AdamW with global-norm clipping; the learning rate warms up linearly, then follows a cosine over
the step budget or the time budget, whichever ends first, so that a run cut by the clock still
anneals to zero. The loop logs every 100 steps, evaluates every ``eval_every`` steps and at the
end, and the weights are written as a float32 npz with a JSON log next to it, both atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mamba_jax.files import atomic_write, atomic_write_text
from xai.app.demo import flatten


def train(params, loss_fn: Callable, batch_at: Callable[[int], tuple], evaluate: Callable[[dict], float], args, *,
          held_out: str, train_acc: str, log: dict):
    """Train ``params`` on ``loss_fn(params, *batch) -> (loss, accuracy)``, step i's batch from
    ``batch_at(i)``; ``evaluate(params)`` gives the held-out accuracy. ``args``: steps, lr, warmup,
    weight_decay, time_budget, eval_every. ``held_out`` / ``train_acc`` name the held-out set and
    the batch accuracy in the printed lines. Returns the trained params; ``log`` gets the "steps"
    and "held_out" entries and the final accuracy, steps done and seconds."""
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)

    def lr_at(i, elapsed):
        progress = min(1.0, max(i / args.steps, elapsed / args.time_budget))
        return args.lr * min(1.0, (i + 1) / args.warmup) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @jax.jit
    def step(params, opt_state, *batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    log.setdefault("steps", [])
    log.setdefault("held_out", [])
    t0 = time.time()
    done = 0
    for i in range(args.steps):
        batch = batch_at(i)
        opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr_at(i, time.time() - t0), jnp.float32)
        params, opt_state, loss, acc = step(params, opt_state, *batch)
        done = i + 1
        if done % 100 == 0:
            loss, acc = float(loss), float(acc)
            log["steps"].append(dict(step=done, loss=loss, train_acc=acc, seconds=time.time() - t0))
            print(f"step {done:5d}  loss {loss:.4f}  {train_acc} {acc:.3f}  {time.time() - t0:6.1f}s", flush=True)
        if done % args.eval_every == 0 or done == args.steps:
            held = evaluate(params)
            log["held_out"].append(dict(step=done, accuracy=held))
            print(f"          held-out accuracy ({held_out}): {held:.4f}", flush=True)
        if time.time() - t0 > args.time_budget:
            print(f"time budget reached after {done} steps", flush=True)
            break
    held = evaluate(params)
    log.update(final_held_out_accuracy=held, steps_done=done, train_seconds=time.time() - t0)
    print(f"final held-out accuracy: {held:.4f} after {done} steps", flush=True)
    return params


def save_weights(out, params, log: dict) -> Path:
    """The weights as a float32 npz at ``out`` and the log as JSON next to it, both atomically."""
    out = Path(out)
    atomic_write(out, lambda f: np.savez_compressed(f, **flatten(jax.device_get(params))))
    atomic_write_text(out.with_suffix(".json"), json.dumps(log, indent=1, allow_nan=False))
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB)" if size >= 1e6 else f"wrote {out} ({size / 1e3:.0f} kB)", flush=True)
    return out
