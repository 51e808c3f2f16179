"""The embedded demo language model: a tiny Mamba LM trained on procedural key-value recall.

``demo_lm()`` loads it (``xai/assets/demo_lm.npz``, trained by ``python -m xai.app.train_lm_demo``);
its vocabulary is the characters of ``xai.eval.recall.VOCAB`` (``encode`` / ``decode``).
``run_lm_demo`` is the text demo's evaluation: every method's token-level faithfulness on held-out
recall sequences, next to a random and a recency baseline.
"""

from __future__ import annotations

import io
from importlib import resources

import numpy as np

from mamba_jax.config import MambaLMConfig
from xai.app.demo import unflatten
from xai.eval.recall import VOCAB

DEMO_LM_CONFIG = MambaLMConfig(vocab_size=len(VOCAB), hidden_size=64, state_size=16, num_hidden_layers=2,
                               expand=2, conv_kernel=4, name="demo-lm")
LM_WEIGHTS = "assets/demo_lm.npz"
# The demo's attention methods use both of its layers: the default start layer (the official 15 of
# 24 scaled to the depth, ``xai.methods.default_start_layer``) would keep only the last one of two.
DEMO_LM_START_LAYER = 0


def demo_lm() -> tuple[MambaLMConfig, dict]:
    """(config, params) of the embedded demo language model: 2 layers of width 64 over the 18
    characters of ``xai.eval.recall.VOCAB``, trained to answer key-value recall queries."""
    ref = resources.files("xai").joinpath(LM_WEIGHTS)
    if not ref.is_file():
        raise FileNotFoundError(f"the demo weights {LM_WEIGHTS} are missing from the xai package; "
                                "train them with `python -m xai.app.train_lm_demo`")
    with np.load(io.BytesIO(ref.read_bytes())) as data:
        return DEMO_LM_CONFIG, unflatten(dict(data))


# ------------------------------------------------------------------ the text demo job
BASELINES = ("random", "recency")
RESULTS_JSON, RESULTS_MD, SAMPLES_PNG = "results.json", "results.md", "samples.png"


def explainers(methods=None, modes=None) -> list[tuple[str, str | None]]:
    """(method, mode) rows of the table: every token method in every mode it has (one row for the
    methods without modes, mode None), then the baselines (mode None)."""
    from xai.methods import method_modes
    from xai.tokens import MODES, TOKEN_METHODS

    rows = [(m, mode) for m in (methods or TOKEN_METHODS) for mode in method_modes(m, modes or MODES)]
    return rows + [(b, None) for b in BASELINES]


def row_name(method: str, mode: str | None) -> str:
    return f"{method}/{mode or ('baseline' if method in BASELINES else '-')}"


def markdown_table(rows: dict) -> str:
    lines = ["| method | mode | AUC+ (lower better) | AUC- (higher better) | evidence hit % | evidence or key hit % |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows.values():
        name = f"{r['method']} (baseline)" if r["method"] in BASELINES else r["method"]
        lines.append(f"| {name} | {r['mode'] or '-'} | {r['auc_positive']:.2f} | {r['auc_negative']:.2f} | "
                     f"{r['evidence_hit_rate']:.1f} | {r['evidence_or_support_hit_rate']:.1f} |")
    return "\n".join(lines)


def evaluate_lm_demo(n_eval: int = 512, *, batch_size: int = 128, seed: int = 1,
                     start_layer: int | None = DEMO_LM_START_LAYER, methods=None, modes=None,
                     progress: bool = True) -> dict:
    """Token-level faithfulness of every method on ``n_eval`` held-out recall sequences (seed 1 was
    never trained on): the deletion AUCs both ways and the evidence hit rates, explaining the
    model's own prediction at the last position (``xai.eval.tokens``)."""
    import jax
    from tqdm import tqdm

    from mamba_jax.lm import lm_apply
    from xai.eval.recall import FILLER_ID, recall_dataset
    from xai.eval.tokens import TokenFaithfulness, random_relevance, recency_relevance
    from xai.tokens import explain_tokens

    config, params = demo_lm()
    data = recall_dataset(n_eval, seed=seed)
    rows = explainers(methods, modes)
    accs = {row: TokenFaithfulness() for row in rows}
    hits = 0
    for b0 in tqdm(range(0, n_eval, batch_size), desc="demo-text", disable=not progress):
        tokens = data["tokens"][b0:b0 + batch_size]
        pred = np.asarray(jax.numpy.argmax(lm_apply(config, params, tokens)[:, -1], -1))
        hits += int((pred == data["answer"][b0:b0 + batch_size]).sum())
        for method, mode in rows:
            if method == "random":
                rel = random_relevance(tokens.shape, seed=b0)
            elif method == "recency":
                rel = recency_relevance(tokens.shape)
            else:
                rel = np.asarray(explain_tokens(config, params, tokens, method, target=pred, mode=mode or "exact",
                                                start_layer=start_layer))
            accs[method, mode].step(config, params, tokens, rel, pred, fill_token=FILLER_ID,
                                    evidence=data["evidence"][b0:b0 + batch_size],
                                    support=data["support"][b0:b0 + batch_size])
    from xai.methods import default_start_layer

    table = {row_name(m, mode): dict(method=m, mode=mode, **acc.summary()) for (m, mode), acc in accs.items()}
    return {"model": config.name, "n": n_eval, "seed": seed, "accuracy": 100 * hits / n_eval,
            "start_layer": default_start_layer(config) if start_layer is None else start_layer,
            "fill_token": "_", "rows": table}


def run_lm_demo(out_dir="out/demo-text", *, n_eval: int = 512, batch_size: int = 128, seed: int = 1,
                start_layer: int | None = DEMO_LM_START_LAYER, overwrite: bool = False, progress: bool = True) -> dict:
    """The text demo: explain a few held-out recall sequences with every method (terminal, HTML,
    PNG), then the faithfulness table on ``n_eval`` of them; writes results.json / results.md."""
    import json
    import os
    import sys
    from pathlib import Path

    from mamba_jax.files import atomic_write_text
    from xai.app.files import check_output_dir, output_dir, record_outputs
    from xai.app.text_view import relevance_figure, terminal_line
    from xai.eval.recall import decode, recall_dataset
    from xai.tokens import explain_tokens

    out = check_output_dir(out_dir, command="demo-text", overwrite=overwrite)
    config, params = demo_lm()
    with output_dir(out, command="demo-text", overwrite=overwrite) as out:
        sample = recall_dataset(1, seed=seed + 1000)
        tokens = decode(sample["tokens"][0])
        rows = {f"{m} ({mode})" if mode else m: np.asarray(explain_tokens(config, params, sample["tokens"], m,
                                                                           mode=mode or "exact",
                                                                           start_layer=start_layer))[0]
                for m, mode in explainers()[:-len(BASELINES)]}
        print(f"sample {''.join(tokens)!r}: the answer {decode(sample['answer'])[0]!r} is fixed by the value at "
              f"position {int(sample['evidence'][0])} (its key at {int(sample['support'][0])})")
        width = max(map(len, rows))
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        for name, rel in rows.items():
            print(f"  {name:<{width}}  {terminal_line(tokens, rel, color=color, query=len(tokens) - 1)}")
        record_outputs(out, "demo-text", [SAMPLES_PNG, RESULTS_JSON, RESULTS_MD])
        relevance_figure(tokens, rows, Path(out) / SAMPLES_PNG, title=f"demo LM, {''.join(tokens)!r}",
                         query=len(tokens) - 1)
        results = evaluate_lm_demo(n_eval, batch_size=batch_size, seed=seed, start_layer=start_layer,
                                   progress=progress)
        table = markdown_table(results["rows"])
        atomic_write_text(Path(out) / RESULTS_JSON, json.dumps(results, indent=1, allow_nan=False) + "\n")
        atomic_write_text(Path(out) / RESULTS_MD, f"# Token-level faithfulness, demo LM\n\n{n_eval} held-out "
                          f"key-value recall sequences (seed {seed}), next-token accuracy "
                          f"{results['accuracy']:.1f}%, start layer {results['start_layer']}; deleted tokens "
                          f"become '_'.\n\n{table}\n")
    print(f"\nnext-token accuracy {results['accuracy']:.1f}% on {n_eval} held-out sequences\n\n{table}")
    print(f"\nwrote {SAMPLES_PNG}, {RESULTS_JSON} and {RESULTS_MD} to {out}")
    return results


def add_parser(subparsers):
    p = subparsers.add_parser(
        "demo-text", help="the text demo on the embedded demo language model (offline, a few minutes on a CPU)",
        description="Loads the embedded demo Mamba LM (trained on key-value recall), explains a held-out sequence "
                    "with every method, and measures token-level faithfulness (deletion AUC both ways, evidence "
                    "hit rate) on held-out sequences next to a random and a recency baseline.")
    p.add_argument("--out", default="out/demo-text", metavar="DIR",
                   help="output folder (default out/demo-text), new or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier `mamba-jax demo-text` run in --out (only those)")
    p.add_argument("--n-eval", type=int, default=512, help="held-out sequences evaluated (default 512)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1, help="seed of the held-out set (training used 0)")
    p.add_argument("--start-layer", type=int, default=DEMO_LM_START_LAYER,
                   help=f"first layer of the attention methods (default {DEMO_LM_START_LAYER}: both of the demo's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=lambda a: run_lm_demo(a.out, n_eval=a.n_eval, batch_size=a.batch_size, seed=a.seed,
                                             start_layer=a.start_layer, overwrite=a.overwrite,
                                             progress=not a.no_progress) and 0)
    return p
