"""``mamba-jax explain``: explanation maps, figures and predictions for image files.

    mamba-jax explain IMAGES... --out DIR [--overwrite] [--checkpoint SRC] [--variant NAME]
        [--methods all|m1,m2] [--mode exact|official|both] [--batch-size N]
        [--start-layer N] [--target CLASS] [--attention-layer N] [--bf16] [--scan-method M] [--remat] [--debug]

Writes to DIR, for each image ``<stem>``: ``<stem>_<method>_<mode>.npy`` (float32
[grid_h, grid_w] maps; ``<stem>_<method>.npy`` for the methods without modes, MambaLRP and
gradient x input), ``<stem>.png`` (the image and one overlay per method, one row per
mode); with ``--attention-layer N`` also ``<stem>_attention_layer<N>.png`` for the first
image (channels 0..3); and one ``predictions.json`` (top-5 classes per image). Every file is
written atomically (complete or absent). DIR must be new or empty: a rerun into the same folder
is refused, unless ``--overwrite``, which first removes the files the earlier explain run wrote
there (listed in its ``.mamba-jax-output.json``) and nothing else; DIR may never hold the input
images. Images go through the official evaluation transform
(``mamba_jax.preprocess``); batches have a fixed size (the last one is padded and the
padding discarded) so each method compiles once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from mamba_jax import preprocess, to_unit, vim_apply
from mamba_jax.files import OUTPUT_MARKER, atomic_write, atomic_write_text
from mamba_jax.preprocess import pad_batch
from xai.app import plot
from xai.app.compile_cache import HELP as CACHE_HELP
from xai.app.files import OutputDirError, check_output_dir, listing, output_dir, record_outputs
from xai.app.labels import class_names
from xai.app.models import DEMO, add_numerics_arguments, load_model, numerics_options, parse_methods
from xai.eval.data import IMAGE_EXTENSIONS
from xai.hidden_attention import hidden_attention
from xai.methods import METHODS, MODELESS, MODES, default_start_layer, explain, method_modes

IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # the types torchvision's ImageFolder reads; other files are reported
ATTENTION_CHANNELS = 4
TOP_K = 5
PREDICTIONS = "predictions.json"


class ExplainError(ValueError):
    """A user error; ``python -m xai`` prints it as one line (``mamba-jax explain: error: ...``,
    exit status 2, as every command's errors)."""


# ------------------------------------------------------------------------ arguments
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain", help="explanation maps, figures and top-5 predictions for images",
        description=__doc__, epilog=CACHE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGES",
                   help=f"image files or folders (a folder contributes its {'/'.join(IMAGE_SUFFIXES)} files)")
    p.add_argument("--checkpoint", default=DEMO, metavar="SRC",
                   help="'demo' (the embedded demo model, default), a .pth/.safetensors file, a hub id "
                        "such as hustvl/Vim-small-midclstok, or a converted folder")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="official variant name of the checkpoint (default: inferred from its shapes)")
    p.add_argument("--methods", default="all", metavar="all|LIST",
                   help=f"'all' or a comma-separated list of {', '.join(METHODS)}")
    p.add_argument("--mode", choices=(*MODES, "both"), default="exact",
                   help="exact hidden attention, the official code's approximations, or both (default exact)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per batch (default 8)")
    p.add_argument("--start-layer", type=int, default=None, metavar="N",
                   help="first layer used (0-based; default 15 of 24, scaled to the model's depth)")
    p.add_argument("--target", type=int, default=None, metavar="CLASS",
                   help="class explained by Mamba-Attribution (default: each image's top-1)")
    p.add_argument("--attention-layer", type=int, default=None, metavar="N",
                   help="also plot the hidden attention matrices of layer N (first image, channels 0..3)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, new or empty (created if needed); a rerun into a non-empty folder is "
                        "refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier `mamba-jax explain` run in --out (only the files it "
                        "wrote; a folder holding anything else is refused)")
    add_numerics_arguments(p)
    p.set_defaults(run=run)
    return p


def find_images(sources) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted by name); errors name the culprit."""
    found: list[Path] = []
    notes: list[str] = []
    for src in map(Path, sources):
        if src.is_dir():
            files = sorted(f for f in src.iterdir() if f.is_file() and not f.name.startswith("."))
            found.extend(f for f in files if f.suffix.lower() in IMAGE_SUFFIXES)
            skipped = [f.name for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
            if skipped:
                notes.append(f"skipped {len(skipped)} file(s) in {src} that are not {'/'.join(IMAGE_SUFFIXES)} "
                             f"images: {listing(skipped, 6)}")
        elif src.is_file():
            found.append(src)
        else:
            raise ExplainError(f"no such file or folder: {src}")
    if not found:
        raise ExplainError(f"no images found in {', '.join(map(str, sources))} "
                           f"(looked for {'/'.join(IMAGE_SUFFIXES)} files)" + "".join(f"; {n}" for n in notes))
    for note in notes:  # no file is skipped silently
        print(f"mamba-jax explain: note: {note}", file=sys.stderr)
    stems: dict[str, Path] = {}
    for f in found:
        if f.stem in stems:
            raise ExplainError(f"{stems[f.stem]} and {f} share the name {f.stem!r}: their outputs would collide")
        stems[f.stem] = f
    return found


def check_readable(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises several unrelated types for bad files
        raise ExplainError(f"cannot read image {path}: {e}") from None


# ------------------------------------------------------------------------- outputs
def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.asarray(array, np.float32)))


def _save_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"  # strict JSON: no NaN or Infinity
    atomic_write_text(path, text)


def map_name(stem: str, method: str, mode: str | None) -> str:
    """``<stem>_<method>_<mode>.npy``; ``<stem>_<method>.npy`` for a method without modes."""
    return f"{stem}_{method}_{mode}.npy" if mode else f"{stem}_{method}.npy"


def output_names(files, methods, modes, attention_layer) -> list[str]:
    """Every file name the command will write in --out; refuses names that would collide."""
    names = [PREDICTIONS, OUTPUT_MARKER]
    for f in files:
        names += [map_name(f.stem, m, mode) for m in methods for mode in method_modes(m, modes)] + [f"{f.stem}.png"]
    if attention_layer is not None:
        names.append(f"{files[0].stem}_attention_layer{attention_layer}.png")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ExplainError(f"two outputs would be named {n!r}: rename one of the images")
        seen.add(n)
    return names


def check_finite(values: np.ndarray, what: str, chunk) -> None:
    """Refuse to write a non-finite result; name the images it came from."""
    bad = [f.name for f, v in zip(chunk, values) if not np.isfinite(v).all()]
    if bad:
        raise ExplainError(f"{what} is not finite (NaN or inf) for {', '.join(bad)}: nothing was written for "
                           "them (damaged weights or images?)")


def top_k(probs: np.ndarray, names, k: int = TOP_K) -> dict:
    idx = np.argsort(-probs, kind="stable")[: min(k, probs.shape[-1])]
    return {"indices": [int(i) for i in idx], "classes": [names[i] for i in idx],
            "probabilities": [float(probs[i]) for i in idx]}


def print_summary(rows: list[dict]) -> None:
    width = max(len("image"), *(len(r["image"]) for r in rows))
    cls_width = max(len("top-1"), *(len(r["top5"]["classes"][0]) for r in rows))
    print(f"{'image':<{width}}  {'class':>5}  {'top-1':<{cls_width}}  {'prob':>6}")
    for r in rows:
        t = r["top5"]
        print(f"{r['image']:<{width}}  {t['indices'][0]:>5}  {t['classes'][0]:<{cls_width}}  "
              f"{t['probabilities'][0]:>6.3f}")


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    files = find_images(args.images)
    for f in files:
        check_readable(f)
    methods = parse_methods(args.methods)
    modes = MODES if args.mode == "both" else (args.mode,)
    if args.batch_size < 1:
        raise ExplainError(f"--batch-size must be at least 1, got {args.batch_size}")
    output_names(files, methods, modes, args.attention_layer)
    try:  # before any work: a bad --out must not cost a model load and a run
        out = check_output_dir(args.out, command="explain", overwrite=args.overwrite, inputs=files)
    except OutputDirError as e:
        raise ExplainError(str(e)) from None

    config, params = load_model(args.checkpoint, args.variant)
    if config.num_cls_tokens != 1:
        raise ExplainError(f"the explanation methods follow one class token; this model has cls_token="
                           f"{config.cls_token!r}")
    start = args.start_layer if args.start_layer is not None else default_start_layer(config)
    if not 0 <= start < config.depth:
        raise ExplainError(f"--start-layer {start} is out of range: the model has {config.depth} layers "
                           f"(0..{config.depth - 1})")
    if args.target is not None and not 0 <= args.target < config.num_classes:
        raise ExplainError(f"--target {args.target} is out of range: the model has {config.num_classes} classes")
    if args.attention_layer is not None and not 0 <= args.attention_layer < config.depth:
        raise ExplainError(f"--attention-layer {args.attention_layer} is out of range: "
                           f"the model has {config.depth} layers (0..{config.depth - 1})")

    with output_dir(out, command="explain", overwrite=args.overwrite) as out:
        names = class_names(config)
        bs = min(args.batch_size, len(files))  # no batch larger than the images need
        options = numerics_options(args)
        forward = options.replace(remat=False)  # remat only matters under a gradient
        rows: list[dict] = []
        with tqdm(total=len(files), desc="explain", unit="image") as bar:
            for b0 in range(0, len(files), bs):
                chunk = files[b0:b0 + bs]
                try:
                    x = np.stack([preprocess(f, config) for f in chunk])
                    x01 = [to_unit(f, config.img_size) for f in chunk]
                except Exception as e:
                    raise ExplainError(f"cannot read image in {', '.join(map(str, chunk))}: {e}") from None
                x = jnp.asarray(pad_batch(x, bs))
                probs = np.asarray(jax.nn.softmax(vim_apply(config, params, x, options=forward), axis=-1))[: len(chunk)]
                check_finite(probs, "the model's output", chunk)
                maps = {(mode, m): np.asarray(explain(config, params, x, m, target=args.target, start_layer=start,
                                                      mode=mode or modes[0], options=options))[: len(chunk)]
                        for m in methods for mode in method_modes(m, modes)}
                for (mode, m), arr in maps.items():
                    check_finite(arr, f"the {m} ({mode}) map" if mode else f"the {m} map", chunk)
                for i, f in enumerate(chunk):
                    # listed before they are written: a later --overwrite removes them, even half-done
                    record_outputs(out, "explain", [map_name(f.stem, m, mode) for (mode, m) in maps]
                                        + [f"{f.stem}.png"])
                    for (mode, m), arr in maps.items():
                        _save_npy(out / map_name(f.stem, m, mode), arr[i])
                    top = top_k(probs[i], names)
                    rows.append({"image": f.name, "path": str(f), "top5": top})
                    title = f"{f.name}: {top['classes'][0]} ({top['probabilities'][0]:.2f})"
                    # a method without modes shows its one map in every mode's row
                    by_mode = {mode: {m: maps[mode if m not in MODELESS else None, m][i] for m in methods}
                               for mode in modes}
                    plot.modes_figure(x01[i], by_mode, out / f"{f.stem}.png", title=title)
                bar.update(len(chunk))

        if args.attention_layer is not None:
            channels = list(range(min(ATTENTION_CHANNELS, config.d_inner)))
            alpha = hidden_attention(config, params, jnp.asarray(preprocess(files[0], config))[None],
                                     layers=[args.attention_layer], channels=channels)
            check_finite(np.asarray(alpha), "the hidden attention", files[:1])
            name = f"{files[0].stem}_attention_layer{args.attention_layer}.png"
            record_outputs(out, "explain", [name])
            plot.attention_matrices_figure(np.asarray(alpha[0, 0]), channels, args.attention_layer, out / name,
                                           cls_pos=config.cls_pos)

        record_outputs(out, "explain", [PREDICTIONS])
        _save_json(out / PREDICTIONS, {
            "checkpoint": str(args.checkpoint), "model": config.name, "methods": list(methods), "modes": list(modes),
            "start_layer": start, "target": args.target, "images": rows})
    print_summary(rows)
    print(f"wrote {len(files)} image(s) x {len(methods)} method(s) x {len(modes)} mode(s) to {out}")
    return 0
