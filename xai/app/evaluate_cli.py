"""``mamba-jax evaluate``: the perturbation and segmentation tests of SPEC section 5 on a data set
(ImageNet-Segmentation, an ImageNet validation folder, or procedural shapes), written with
``xai.app.report``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable

import jax

from mamba_jax.config import VimConfig
from xai.app.compile_cache import HELP as CACHE_HELP
from xai.app.files import check_output_dir, output_dir, record_outputs
from xai.app.models import add_numerics_arguments, load_model, numerics_options, parse_methods
from xai.app.report import CURVES_PNG, RESULTS_JSON, RESULTS_MD, markdown_table, write_results
from xai.eval.evaluate import BASELINES, DATA_SIZE, TARGETS, TESTS, Batch, DataError, evaluate
from xai.methods import METHODS, MODES, default_start_layer


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _baselines(text: str) -> tuple[str, ...]:
    """"none" or a comma list of baseline rows."""
    if text.strip() == "none":
        return ()
    names = tuple(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    unknown = [b for b in names if b not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown baseline {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"valid: none or a comma list of {', '.join(BASELINES)}")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``evaluate`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "evaluate", help="perturbation and segmentation tests of the explanation methods",
        description="Perturbation (positive/negative) and segmentation tests of the explanation methods "
                    "(SPEC section 5), with random and centre-blob baselines. Writes results.json, results.md "
                    "and perturbation_curves.png.", epilog=CACHE_HELP)
    p.add_argument("--checkpoint", default="demo", metavar="SRC",
                   help="'demo' (the embedded shapes model, default), a checkpoint file, a converted folder or a "
                        "hub id")
    p.add_argument("--variant", default=None, help="official variant name (default: inferred)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--imagenet-seg", metavar="FILE", help="ImageNet-Segmentation gtsegs_ijcv.mat")
    data.add_argument("--imagenet-val", metavar="DIR", help="ImageNet validation folder")
    data.add_argument("--shapes", type=_non_negative_int, metavar="N",
                      help="N procedural shapes images (xai.eval.shapes)")
    p.add_argument("--labels", metavar="FILE", help="labels file for a flat --imagenet-val folder")
    p.add_argument("--seed", type=int, default=1000,
                   help="seed of the --shapes set (default 1000, held out from training seeds)")
    p.add_argument("--methods", type=parse_methods, default=METHODS, metavar="all|LIST",
                   help=f"'all' (default) or a comma list of {', '.join(METHODS)}")
    p.add_argument("--mode", choices=(*MODES, "both"), default="both", help="method mode (default both)")
    p.add_argument("--tests", choices=(*TESTS, "both"), default="both",
                   help="the perturbation test, the segmentation test (only where the data has masks), or both "
                        "(default)")
    p.add_argument("--baselines", type=_baselines, default=BASELINES, metavar="none|LIST",
                   help=f"baseline rows: a comma list of {', '.join(BASELINES)} (default both) or none; each costs "
                        "the perturbation test's 18 forward passes per image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=_non_negative_int, default=None, help="evaluate only the first N images")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first layer of the methods (default round(15 * depth / 24); 5 for the demo model)")
    p.add_argument("--target", choices=TARGETS, default="predicted",
                   help="class explained and tested: the predicted top-1 (default) or the label")
    p.add_argument("--out", default="out/evaluate", metavar="DIR",
                   help="output folder (default out/evaluate), new or empty: checked before the evaluation starts; "
                        "a rerun into a non-empty folder is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier `mamba-jax evaluate` run in --out (only the files it "
                        "wrote; a folder holding anything else is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--all-devices", action="store_true",
                   help="spread each batch over all local devices (data parallel; batch size per step)")
    add_numerics_arguments(p)
    p.set_defaults(run=run)
    return p


def _load_model(args) -> tuple[VimConfig, dict, int]:
    config, params = load_model(args.checkpoint, args.variant)
    start = default_start_layer(config) if args.start_layer is None else args.start_layer
    if not 0 <= start < config.depth:
        raise DataError(f"--start-layer {start} is outside the model's {config.depth} layers (0..{config.depth - 1})")
    return config, params, start


def _open_data(args, num_classes: int) -> tuple[str, int, Callable[[], Iterable[Batch]]]:
    """(description, number of images, a function returning the batch iterator); labels that
    the model cannot have are refused here, before any work."""
    bs, limit = args.batch_size, args.limit
    if args.labels and not args.imagenet_val:
        raise DataError("--labels is for --imagenet-val only")
    if args.imagenet_seg:
        from xai.eval.data import ImagenetSegmentation

        ds = ImagenetSegmentation(args.imagenet_seg, size=DATA_SIZE)
        n = len(ds) if limit is None else min(len(ds), limit)
        return f"ImageNet-Segmentation {args.imagenet_seg}", n, lambda: (
            (x, None, m) for x, m in ds.batches(bs, progress=False, limit=limit))
    if args.imagenet_val:
        from xai.eval.data import ImageNetVal

        ds = ImageNetVal(args.imagenet_val, args.labels, size=DATA_SIZE)
        n = len(ds) if limit is None else min(len(ds), limit)
        bad = sorted({lb for _, lb in ds.samples[:n] if not -1 <= lb < num_classes})
        if bad:
            raise DataError(f"label(s) {bad[:10]} in {args.labels or args.imagenet_val} outside the model's "
                            f"{num_classes} classes (0..{num_classes - 1})")
        return f"ImageNet validation folder {args.imagenet_val}", n, lambda: (
            (x, y, None) for x, y, _ in ds.batches(bs, progress=False, limit=limit))
    from xai.eval.shapes import shapes_batches

    n = args.shapes if limit is None else min(args.shapes, limit)
    # rendered on the device, where the evaluation keeps them
    return f"{n} procedural shapes (seed {args.seed})", n, lambda: shapes_batches(
        bs, args.seed, stop=n, img_size=DATA_SIZE, normalized=False)


def run(args) -> int:
    """The ``evaluate`` command; errors propagate to ``python -m xai``'s handler (one line, exit 2).
    The output folder is checked before any work and written only at the end."""
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_dir(args.out, command="evaluate", overwrite=args.overwrite)
    config, params, start_layer = _load_model(args)
    if config.img_size != DATA_SIZE:
        raise DataError(f"the data set's images are {DATA_SIZE} x {DATA_SIZE} but the model expects "
                        f"{config.img_size} x {config.img_size} (img_size={config.img_size})")
    source, n, make_batches = _open_data(args, config.num_classes)
    if n == 0:
        raise DataError(f"no data: {source} has no images to evaluate")
    modes = MODES if args.mode == "both" else (args.mode,)
    tests = TESTS if args.tests == "both" else (args.tests,)
    options = numerics_options(args)
    print(f"evaluating {config.name or 'model'} on {source}: {n} images, methods {', '.join(args.methods)}, "
          f"modes {', '.join(modes)}, start layer {start_layer}, tests {', '.join(tests)}, "
          f"{'bfloat16' if args.bf16 else 'float32'}", file=sys.stderr)
    results = evaluate(config, params, make_batches(), methods=args.methods, modes=modes,
                       start_layer=start_layer, tests=tests, target=args.target, baselines=args.baselines,
                       progress=not args.no_progress, total=math.ceil(n / args.batch_size),
                       devices=jax.devices() if args.all_devices else None, options=options)
    results["settings"]["data"] = source
    results["settings"]["checkpoint"] = args.checkpoint
    print(markdown_table(results))  # first: the results are on the screen even if writing fails
    if results["top1_accuracy"] is not None:
        print(f"top-1 accuracy: {results['top1_accuracy']:.2f}% over {results['counts']['labeled']} images")
    with output_dir(args.out, command="evaluate", overwrite=args.overwrite) as out:
        record_outputs(out, "evaluate", [RESULTS_JSON, RESULTS_MD, CURVES_PNG])
        paths = write_results(results, out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
