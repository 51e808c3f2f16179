"""Command line: ``python -m xai {demo,explain,evaluate,demo-text,explain-text} ...`` (also installed as ``mamba-jax``).

Errors are reported as one line (``mamba-jax <command>: error: ...``, exit status 2); ``--debug``
(anywhere on the line) shows the full traceback instead (``convert.errors.reported_errors``).
Compiled programs go to a persistent cache (``xai.app.compile_cache``; ``MAMBA_JAX_CACHE``).
"""

from __future__ import annotations

import argparse
import sys

from convert.errors import reported_errors


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from xai.app.compile_cache import HELP as CACHE_HELP
    from xai.app.compile_cache import enable_compilation_cache

    parser = argparse.ArgumentParser(prog="mamba-jax", description=__doc__, epilog=CACHE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command", required=True)
    from xai.app import demo, evaluate_cli, explain_cli, explain_text, lm_demo

    demo.add_parser(sub)
    explain_cli.add_parser(sub)
    evaluate_cli.add_parser(sub)
    lm_demo.add_parser(sub)
    explain_text.add_parser(sub)
    args = parser.parse_args(argv)
    enable_compilation_cache()  # before anything compiles
    with reported_errors(f"mamba-jax {args.command}", debug) as status:
        return int(args.run(args) or 0)
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
