"""Command line: ``python -m xai {demo,explain,evaluate} ...`` (also installed as ``mamba-jax``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from xai import demo, evaluate, explain_cli

    demo.add_parser(sub)
    explain_cli.add_parser(sub)
    evaluate.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
