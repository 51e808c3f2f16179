"""``mamba-jax explain-text``: which tokens a Mamba language model's next-token prediction used.

    mamba-jax explain-text "TEXT" [--checkpoint SRC] [--tokenizer DIR] [--methods all|m1,m2]
        [--mode exact|official|both] [--position N] [--target ID] [--start-layer N]
        [--color auto|always|never] [--out DIR] [--overwrite] [--debug]

SRC is "demo" (the embedded demo LM, default; its text is characters of ``xai.eval.recall.VOCAB``,
e.g. "c0_g1_e6___d5_?c"), a Hugging Face or state-spaces folder, a hub id, a converted folder or a
weights file (``convert.load_checkpoint``). The text is tokenized by transformers' AutoTokenizer
from a local folder: ``--tokenizer DIR``, or SRC itself when it is a folder with tokenizer files;
without one, the text must be token ids ("510 3158 8516"). Prints each token shaded by its
relevance, one line per method (and mode), and writes ``explanation.html``, ``explanation.png``
and ``relevance.json`` (tokens, the prediction, every relevance row) to DIR (default
out/explain-text): new or empty, or with ``--overwrite`` a folder an earlier explain-text run
wrote (only its files are replaced). Every file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from mamba_jax.config import MambaLMConfig
from mamba_jax.files import atomic_write_text
from xai.app.files import OutputDirError, check_output_dir, output_dir, record_outputs
from xai.app.models import DEMO
from xai.app.text_view import relevance_figure, terminal_line, write_html
from xai.tokens import MODES, TOKEN_METHODS

HTML, PNG, JSON = "explanation.html", "explanation.png", "relevance.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ExplainTextError(ValueError):
    """A user error, printed as one line (``mamba-jax explain-text: error: ...``, exit status 2)."""


def parse_token_methods(text: str) -> tuple[str, ...]:
    """"all" or a comma list of ``xai.tokens.TOKEN_METHODS``."""
    if text.strip() == "all":
        return TOKEN_METHODS
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in TOKEN_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(map(repr, unknown)) or repr(text)}; valid: all "
                                         f"or a comma list of {', '.join(TOKEN_METHODS)}")
    return methods


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain-text", help="token relevance of a Mamba language model's next-token prediction",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", metavar="TEXT", help="the text (or, without a tokenizer, token ids separated by spaces)")
    p.add_argument("--checkpoint", default=DEMO, metavar="SRC",
                   help="'demo' (the embedded demo LM, default), a Hugging Face / state-spaces folder, a hub id, a "
                        "converted folder or a weights file")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a local folder transformers' AutoTokenizer reads (default: SRC, when it is a folder with "
                        "tokenizer files)")
    p.add_argument("--methods", type=parse_token_methods, default=TOKEN_METHODS, metavar="all|LIST",
                   help=f"'all' (default) or a comma list of {', '.join(TOKEN_METHODS)}")
    p.add_argument("--mode", choices=(*MODES, "both"), default="exact", help="method mode (default exact)")
    p.add_argument("--position", type=int, default=-1,
                   help="the predicting position explained (default -1, the last token)")
    p.add_argument("--target", type=int, default=None, metavar="ID",
                   help="the next-token id explained (default: the model's top-1 at --position)")
    p.add_argument("--start-layer", type=int, default=None, metavar="N",
                   help="first layer of the attention methods (default: 15 of 24 scaled to the depth)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="shade the tokens with ANSI colours (auto: on a terminal, unless NO_COLOR is set)")
    p.add_argument("--out", default="out/explain-text", metavar="DIR",
                   help="output folder (default out/explain-text), new or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier `mamba-jax explain-text` run in --out (only those)")
    p.set_defaults(run=run)
    return p


# ------------------------------------------------------------------ model and text
def load_lm(checkpoint: str) -> tuple[MambaLMConfig, dict]:
    if checkpoint == DEMO:
        from xai.app.lm_demo import demo_lm

        return demo_lm()
    from convert import load_checkpoint

    config, params = load_checkpoint(checkpoint)
    if not isinstance(config, MambaLMConfig):
        raise ExplainTextError(f"{checkpoint} is a Vim image classifier, not a language model: use "
                               "`mamba-jax explain` for images")
    return config, params


def find_tokenizer_folder(checkpoint: str, tokenizer: str | None) -> Path | None:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_dir():
            raise ExplainTextError(f"--tokenizer {tokenizer}: not a folder (a local folder with tokenizer.json or "
                                   "tokenizer_config.json)")
        return path
    path = Path(checkpoint)
    if checkpoint != DEMO and path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        return path
    return None


def tokenize(text: str, checkpoint: str, tokenizer: str | None) -> tuple[np.ndarray, list[str]]:
    """(token ids [T], token strings) of ``text``."""
    if checkpoint == DEMO and tokenizer is None:
        from xai.eval.recall import decode, encode

        try:
            ids = encode(text)
        except ValueError as e:
            raise ExplainTextError(f"{e} (the demo LM reads key-value recall text such as 'c0_g1_e6___d5_?c')") \
                from None
        return ids, decode(ids)
    folder = find_tokenizer_folder(checkpoint, tokenizer)
    if folder is not None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ExplainTextError("a tokenizer folder needs transformers: pip install transformers") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types for unreadable folders
            raise ExplainTextError(f"cannot read a tokenizer from {folder}: {str(e).splitlines()[0]}") from None
        ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
        return ids, [str(t) for t in tok.convert_ids_to_tokens(ids.tolist())]
    words = text.replace(",", " ").split()
    if not words or not all(w.lstrip("-").isdigit() for w in words):
        raise ExplainTextError("no tokenizer: pass --tokenizer DIR (a local folder with tokenizer.json), use a "
                               "checkpoint folder that holds one, or give the text as token ids ('510 3158 8516')")
    ids = np.asarray([int(w) for w in words], np.int64)
    return ids, [str(i) for i in ids]


def _use_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


# ------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    import jax

    from mamba_jax.lm import check_tokens, lm_apply
    from xai.methods import method_modes
    from xai.tokens import check_target, explain_tokens, resolve_position, resolve_start_layer

    if not args.text.strip():
        raise ExplainTextError("the text is empty")
    try:  # before any work: a bad --out must not cost a model load
        out = check_output_dir(args.out, command="explain-text", overwrite=args.overwrite)
    except OutputDirError as e:
        raise ExplainTextError(str(e)) from None
    config, params = load_lm(args.checkpoint)
    ids, strings = tokenize(args.text, args.checkpoint, args.tokenizer)
    if not len(ids):
        raise ExplainTextError("the text has no tokens")
    tokens = check_tokens(config, ids[None])
    position = resolve_position(args.position, tokens.shape[1])
    start = resolve_start_layer(config, args.start_layer)
    check_target(config, args.target, 1)
    modes = MODES if args.mode == "both" else (args.mode,)

    probs = np.asarray(jax.nn.softmax(lm_apply(config, params, tokens)[0, position]))
    if not np.isfinite(probs).all():
        raise ExplainTextError("the model's output is not finite (damaged weights?)")
    predicted = int(probs.argmax())
    target = predicted if args.target is None else args.target
    rows: dict[str, np.ndarray] = {}
    for method in args.methods:
        for mode in method_modes(method, modes):
            named = f"{method} ({mode})" if mode and len(modes) > 1 else method
            mode = mode or "exact"
            rel = np.asarray(explain_tokens(config, params, tokens, method, position=position, target=target,
                                            mode=mode, start_layer=start))[0]
            if not np.isfinite(rel).all():
                raise ExplainTextError(f"the {method} ({mode}) relevance is not finite: nothing was written")
            rows[named] = rel

    def token_text(i: int) -> str:
        if args.checkpoint == DEMO and args.tokenizer is None:
            from xai.eval.recall import decode

            return decode([i])[0]
        return str(i)

    shown = strings[:position + 1]
    headline = (f"next token after position {position} ({strings[position]!r}): predicted {token_text(predicted)!r} "
                f"(id {predicted}, p={probs[predicted]:.3f}); explained: id {target} "
                f"(p={probs[target]:.3f})")
    print(headline)
    color = _use_color(args.color)
    width = max(map(len, rows))
    for name, rel in rows.items():
        print(f"{name:<{width}}  {terminal_line(shown, rel[:position + 1], color=color, query=position)}")

    with output_dir(out, command="explain-text", overwrite=args.overwrite) as out:
        record_outputs(out, "explain-text", [HTML, PNG, JSON])
        title = f"{config.name or 'Mamba LM'}: why {token_text(target)!r} after position {position}"
        write_html(out / HTML, shown, {k: v[:position + 1] for k, v in rows.items()}, title=title,
                   caption=headline, query=position)
        relevance_figure(shown, {k: v[:position + 1] for k, v in rows.items()}, out / PNG, title=title,
                         query=position)
        atomic_write_text(out / JSON, json.dumps({
            "checkpoint": str(args.checkpoint), "model": config.name, "text": args.text, "token_ids": ids.tolist(),
            "tokens": strings, "position": position, "predicted": predicted, "target": target,
            "probability": float(probs[target]), "start_layer": start,
            "relevance": {k: v.tolist() for k, v in rows.items()}}, indent=1, allow_nan=False) + "\n")
    print(f"wrote {HTML}, {PNG} and {JSON} to {out}")
    return 0
