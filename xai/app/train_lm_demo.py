"""Train the embedded demo language model: a tiny Mamba LM on key-value recall, with optax.

    python -m xai.app.train_lm_demo --out xai/assets/demo_lm.npz   # 60 s on one H200; ~3000 steps reach 99.8%

Training sequences are items of ``xai.eval.recall`` with seed 0 (each step takes the next
batch of items), each with ``--queries`` queries of distinct keys (``context ?k1 v1 ?k2 v2 ...``):
the loss is the cross-entropy of every query's answer at its position (the only positions whose
next token the task fixes), so one sequence teaches several retrievals. The demo's sequences
are the first ``SEQ_LEN`` tokens, one query: a prefix of the training distribution. The
held-out set is seed 1, one query. Writes the weights (float32 npz, atomically) and a JSON log
next to them.
"""

from __future__ import annotations

import argparse

import jax
import optax

from mamba_jax.lm import _lm_apply, init_lm_params
from mamba_jax.options import Options
from xai.app.lm_demo import DEMO_LM_CONFIG
from xai.app.training import save_weights, train
from xai.eval.recall import query_positions, recall_dataset

TRAIN_SEED, HELD_OUT_SEED = 0, 1
TRAIN_OPTIONS = Options(precision=None)


def logits_at(config, params, tokens, positions):
    logits, _ = _lm_apply(config, params, tokens, None, capture=False, start_layer=0, options=TRAIN_OPTIONS)
    return logits[:, positions]


def last_logits(config, params, tokens):
    return logits_at(config, params, tokens, -1)


def accuracy(config, params, data, batch=500) -> float:
    predict = jax.jit(lambda p, t: last_logits(config, p, t).argmax(-1))
    hits = sum(int((predict(params, data["tokens"][i:i + batch]) == data["answer"][i:i + batch]).sum())
               for i in range(0, len(data["answer"]), batch))
    return hits / len(data["answer"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="xai/assets/demo_lm.npz")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--time-budget", type=float, default=3600.0, help="stop training after this many seconds")
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="parameter initialization seed")
    p.add_argument("--queries", type=int, default=4, help="queries per training sequence (1..4)")
    p.add_argument("--hidden-size", type=int, default=DEMO_LM_CONFIG.hidden_size,
                   help="model width (experiments; demo_lm() loads DEMO_LM_CONFIG's)")
    p.add_argument("--layers", type=int, default=DEMO_LM_CONFIG.num_hidden_layers,
                   help="number of layers (experiments; demo_lm() loads DEMO_LM_CONFIG's)")
    args = p.parse_args(argv)

    config = DEMO_LM_CONFIG.replace(hidden_size=args.hidden_size, num_hidden_layers=args.layers)
    params = init_lm_params(config, jax.random.PRNGKey(args.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"demo LM: {n_params / 1e3:.1f}k parameters on {jax.devices()[0].device_kind}", flush=True)
    positions = query_positions(args.queries)

    def loss_fn(params, tokens, answer):
        logits = logits_at(config, params, tokens, positions)  # [B, queries, V]
        answer = answer.reshape(logits.shape[:2])
        return optax.softmax_cross_entropy_with_integer_labels(logits, answer).mean(), \
            (logits[:, 0].argmax(-1) == answer[:, 0]).mean()

    def batch_at(i):
        batch = recall_dataset(args.batch_size, seed=TRAIN_SEED, start=i * args.batch_size, queries=args.queries)
        return batch["tokens"], batch["answer"]

    held = recall_dataset(args.held_out, seed=HELD_OUT_SEED)
    log = dict(config=str(config))
    params = train(params, loss_fn, batch_at, lambda p: accuracy(config, p, held), args,
                   held_out=f"{args.held_out} sequences, seed {HELD_OUT_SEED}", train_acc="first-query acc", log=log)
    log.update(n_params=int(n_params), batch_size=args.batch_size, lr=args.lr, seed=args.seed, queries=args.queries)
    save_weights(args.out, params, log)


if __name__ == "__main__":
    main()
