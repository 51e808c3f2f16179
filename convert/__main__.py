"""``python -m convert SRC OUT_DIR [--variant NAME]`` converts a checkpoint to an orbax folder;
``python -m convert validate SRC [IMAGES...]`` prints a JAX-vs-PyTorch parity report.

OUT_DIR must be new or empty; ``--overwrite`` replaces only a folder this program wrote (it holds
the marker file ``.mamba-jax-output.json``). Errors are one line (exit status 2); ``--debug``
shows the traceback; an interrupted conversion leaves nothing behind."""

from __future__ import annotations

import argparse
import json
import sys

from convert.errors import reported_errors


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    prog = "python -m convert" + (" validate" if argv[:1] == ["validate"] else "")
    with reported_errors(prog, debug) as status:
        return _main(argv)
    return status[0]


def _check_json_path(path: str) -> None:
    """A --json report path must be writable before the (long) validation starts."""
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"--json {path} is a folder, not a file")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--json {path}: {parent} is a file, not a folder")
            break


def _main(argv) -> int:
    if argv and argv[0] == "validate":
        p = argparse.ArgumentParser(prog="python -m convert validate",
                                    description="Run the Flax model and the PyTorch reference side by side.")
        p.add_argument("src", help="checkpoint file, converted folder or hub id")
        p.add_argument("images", nargs="*", help="image files (default: 2 random inputs)")
        p.add_argument("--variant", default=None)
        p.add_argument("--json", default=None, help="also write the report as JSON here")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        args = p.parse_args(argv[1:])
        if args.json:
            _check_json_path(args.json)
        from convert import validate as v

        report = v.validate(args.src, args.images, variant=args.variant)
        print(v.format_report(report))
        if args.json:
            from mamba_jax.files import atomic_write

            try:
                text = json.dumps(report, indent=1, allow_nan=False)
            except ValueError:
                raise ValueError("the report holds non-finite numbers (NaN or inf): not written") from None
            atomic_write(args.json, lambda f: f.write(text.encode()))
        return 0
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    p.add_argument("src", help="official .pth/.pt/.safetensors file or hub id (owner/name[:file]); or a Mamba "
                               "language model's Hugging Face / state-spaces folder or hub id")
    p.add_argument("out_dir", help="folder to write (config.json + orbax params/)")
    p.add_argument("--variant", default=None, help="official variant name or alias (default: inferred)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is a folder this program wrote (never anything else)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    from convert.api import load_checkpoint, save_params
    from convert.checkpoint import check_out_dir

    check_out_dir(args.out_dir, overwrite=args.overwrite)  # before the (long) load
    config, params = load_checkpoint(args.src, args.variant)
    out = save_params(args.out_dir, config, params, overwrite=args.overwrite)
    print(f"converted {config.name or config} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
