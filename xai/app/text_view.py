"""Token relevance shown three ways: shaded text in a terminal, an HTML page, a PNG.

Each row is one explanation (a method, a mode) over the same tokens. Non-negative maps (the
attention methods) are scaled by their maximum and shaded white -> red; signed maps (MambaLRP)
by their largest magnitude, red for positive and blue for negative relevance. The scaling is per
row: rows rank tokens, their absolute sizes are not comparable across methods. The explained
token itself (``query``: the predicting position, usually the last) holds most of the relevance in
most methods; it is left out of the scaling and drawn grey, so that the earlier tokens' shades
show which of them the prediction used.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mamba_jax.files import atomic_write_text

RESET = "\x1b[0m"


QUERY_RGB = (200, 200, 200)


def scaled(relevance, query: int | None = None) -> np.ndarray:
    """Relevance in [-1, 1]: divided by its largest magnitude outside ``query`` (zeros stay zero; a
    zero map stays zero); the ``query`` entry itself is clipped to [-1, 1]."""
    r = np.asarray(relevance, np.float64)
    r = np.where(np.isfinite(r), r, 0.0)
    rest = np.delete(r, query) if query is not None and r.size > 1 else r
    top = float(np.abs(rest).max()) if rest.size else 0.0
    return np.clip(r / top, -1, 1) if top > 0 else np.zeros_like(r)


def _color(s, i: int, query: int | None) -> tuple[int, int, int]:
    return QUERY_RGB if i == query else rgb(s[i])


def rgb(value: float) -> tuple[int, int, int]:
    """White for 0, towards red (215, 48, 39) for +1, towards blue (49, 54, 149) for -1."""
    end = (215, 48, 39) if value >= 0 else (49, 54, 149)
    a = min(1.0, abs(float(value)))
    return tuple(int(round(255 + a * (c - 255))) for c in end)


def display_token(token: str) -> str:
    """A token as it reads: byte-level BPE's space marker as a space, newlines and tabs escaped."""
    return token.replace("\u0120", " ").replace("\u010a", "\\n").replace("\n", "\\n").replace("\t", "\\t")


def terminal_line(tokens: Sequence[str], relevance, *, color: bool = True, query: int | None = None) -> str:
    """The tokens with 24-bit ANSI background shading (black text; the ``query`` token grey and
    underlined); without ``color``, each token followed by its scaled relevance in brackets."""
    s = scaled(relevance, query)
    if not color:
        return " ".join(f"{display_token(t)}[{'query' if i == query else f'{v:+.2f}'}]"
                        for i, (t, v) in enumerate(zip(tokens, s)))
    parts = []
    for i, t in enumerate(tokens):
        r, g, b = _color(s, i, query)
        under = ";4" if i == query else ""
        parts.append(f"\x1b[38;2;0;0;0;48;2;{r};{g};{b}{under}m{display_token(t)}{RESET}")
    return "".join(parts)


def html_page(tokens: Sequence[str], rows: Mapping[str, np.ndarray], *, title: str, caption: str = "",
              query: int | None = None) -> str:
    """A self-contained HTML page: one line of shaded tokens per row (hover: the relevance)."""
    body = []
    for name, rel in rows.items():
        s, raw = scaled(rel, query), np.asarray(rel, np.float64)
        spans = "".join(
            f'<span style="background:rgb{_color(s, i, query)}{";text-decoration:underline" if i == query else ""}" '
            f'title="{raw[i]:.4g}">{html.escape(display_token(t))}</span>' for i, t in enumerate(tokens))
        body.append(f'<tr><th>{html.escape(name)}</th><td class="t">{spans}</td></tr>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em} th{text-align:right;padding-right:1em;font-weight:normal;"
            "white-space:nowrap} td.t{font-family:monospace;font-size:15px;white-space:pre-wrap}"
            "td.t span{padding:2px 0;border-right:1px solid #eee}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p><table>{''.join(body)}</table>"
            "<p>Shading per row: red = relevant (scaled by the row's largest magnitude among the earlier "
            "tokens); blue = negative relevance (MambaLRP); grey and underlined: the explained token itself. "
            "Hover a token for its value.</p></body></html>\n")


def write_html(path: str | os.PathLike, tokens, rows, *, title: str, caption: str = "",
               query: int | None = None) -> Path:
    return atomic_write_text(path, html_page(tokens, rows, title=title, caption=caption, query=query))


def relevance_figure(tokens: Sequence[str], rows: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                     title: str = "", max_tokens: int = 64, query: int | None = None) -> Path:
    """A PNG (or any matplotlib format, by suffix): one row of shaded token boxes per explanation;
    longer sequences show their last ``max_tokens`` tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from xai.app.plot import save_figure

    tokens = list(tokens)
    first = max(0, len(tokens) - max_tokens)
    shown = [display_token(t) for t in tokens[first:]]
    widths = [max(1, len(t)) * 0.12 + 0.1 for t in shown]
    total = sum(widths)
    label_w = 0.25 + 0.065 * max((len(n) for n in rows), default=4)
    fig = Figure(figsize=(label_w + total + 0.2, 0.45 * len(rows) + (0.5 if title else 0.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-label_w, total + 0.2)
    ax.set_ylim(-len(rows) - (0.2 if not title else 0.0), 0.9 if title else 0.2)
    ax.axis("off")
    if title:
        ax.text(-label_w + 0.05, 0.45, title + (f"  (last {len(shown)} of {len(tokens)} tokens)" if first else ""),
                fontsize=10, va="center")
    for r, (name, rel) in enumerate(rows.items()):
        s = scaled(rel, query)
        y = -r - 0.5
        ax.text(-0.1, y, name, ha="right", va="center", fontsize=8)
        x = 0.0
        for i, (t, w) in enumerate(zip(shown, widths)):
            ax.add_patch(_box(x, y, w, [c / 255 for c in _color(s, first + i, query)]))
            ax.text(x + w / 2, y, t, ha="center", va="center", fontsize=8, family="monospace")
            x += w
    return save_figure(fig, path, dpi=120)


def _box(x, y, w, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y - 0.4), w, 0.8, facecolor=color, edgecolor="0.85", linewidth=0.5)
