"""``python -m convert SRC OUT_DIR [--variant NAME]`` converts a checkpoint to an orbax folder;
``python -m convert validate SRC [IMAGES...]`` prints a JAX-vs-PyTorch parity report."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "validate":
        p = argparse.ArgumentParser(prog="python -m convert validate",
                                    description="Run the Flax model and the PyTorch reference side by side.")
        p.add_argument("src", help="checkpoint file, converted folder or hub id")
        p.add_argument("images", nargs="*", help="image files (default: 2 random inputs)")
        p.add_argument("--variant", default=None)
        p.add_argument("--json", default=None, help="also write the report as JSON here")
        args = p.parse_args(argv[1:])
        from convert.validate import format_report, validate

        report = validate(args.src, args.images, variant=args.variant)
        print(format_report(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return 0
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    p.add_argument("src", help="official .pth/.pt/.safetensors file or hub id (owner/name[:file])")
    p.add_argument("out_dir", help="folder to write (config.json + orbax params/)")
    p.add_argument("--variant", default=None, help="official variant name or alias (default: inferred)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from convert.checkpoint import load_checkpoint, save_params
    from convert.mapping import CheckpointError

    try:
        config, params = load_checkpoint(args.src, args.variant)
        out = save_params(args.out_dir, config, params, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {config.name or config} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
