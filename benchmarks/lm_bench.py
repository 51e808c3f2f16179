"""Benchmark of the Mamba language model and every token-explanation method (the H200 rows).

    python benchmarks/lm_bench.py --out benchmarks/results/h200/lm          # mamba-130m shape, 1024 tokens,
                                                                            # batch 1 and 16, every method
    python benchmarks/lm_bench.py --smoke --out /tmp/lm_smoke               # tiny settings, runs on a CPU

A random model of mamba-130m's shape (768 wide, 24 layers, vocabulary 50280, N 16; float32,
matmul precision "highest" unless --bf16) explains the next-token prediction at the last of
--seq-len tokens. Rows: the forward pass (logits of every position), each method of
``xai.tokens.TOKEN_METHODS`` in each mode (target: the top-1 next token, computed in the same
program), and the full hidden attention of one layer (all channels, batch 1 only: 1536 x 1024 x
1024 floats = 6.4 GB). Each time is the median of --reps runs after warm-up, ended with
block_until_ready; compile seconds and XLA's compiled memory analysis (arguments + outputs +
temporaries) are reported too. Writes results.json (with the command in meta.argv) and results.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mamba_jax import MambaLMConfig, init_lm_params, lm_apply, mamba_lm  # noqa: E402
from mamba_jax.files import atomic_write_text  # noqa: E402
from mamba_jax.lm import _lm_apply  # noqa: E402
from mamba_jax.options import Options  # noqa: E402
from xai.methods import GRADIENT_METHODS, MODELESS, MODES, method_modes  # noqa: E402
from xai.tokens import TOKEN_METHODS, _explain_tokens, lm_hidden_attention  # noqa: E402

SMOKE_CONFIG = MambaLMConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=4, name="smoke")


def log(*a):
    print(*a, flush=True)


def peak_gib(compiled):
    try:
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes) / 2 ** 30
    except Exception:  # some backends have no analysis
        return None


def compile_timed(fn, args):
    """(compiled executable, compile seconds) of the jitted ``fn`` on ``args``."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t


def measure(fn, args, reps: int, warmup: int = 1, compiled=None):
    """(median seconds, peak GiB, compile seconds) of the jitted ``fn`` on ``args`` (``compiled``:
    an executable and its compile seconds from ``compile_timed``, to time it without compiling)."""
    compiled, compile_s = compiled or compile_timed(fn, args)
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak_gib(compiled), compile_s


def cases(config, params, tokens, methods, modes, options, start_layer, remat):
    """(work, jitted fn, args) of every row for one batch."""
    B, T = tokens.shape
    yield "forward", jax.jit(lambda p, t: _lm_apply(config, p, t, None, capture=False, start_layer=0,
                                                    options=options)[0]), (params, tokens)
    for method in methods:
        for mode in method_modes(method, modes):
            name = f"{method}/{mode}" if mode else method
            mode = mode or "exact"
            o = options.replace(remat=remat and method in GRADIENT_METHODS)
            s = 0 if method in MODELESS else start_layer
            fn = functools.partial(_explain_tokens, config, method=method, mode=mode, start_layer=s,
                                   budget=1 << 30, options=o)
            yield name, jax.jit(lambda p, t, fn=fn: fn(p, t, None)), (params, tokens)
    if B == 1:
        layer = start_layer
        yield f"hidden_attention layer {layer}", jax.jit(
            lambda p, t: lm_hidden_attention(config, p, t, layers=[layer], options=options)), (params, tokens)


def fmt(row):
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
    return (f"| {row['batch']} | {row['work']} | {1e3 * row['seconds']:.1f} | {row['tokens_per_s']:.0f} | "
            f"{peak} | {row['compile_s']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--smoke", action="store_true", help="a tiny model, 32 tokens, batches 1 and 2, one rep (CPU)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of {', '.join(TOKEN_METHODS)}")
    p.add_argument("--modes", default="exact,official")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--start-layer", type=int, default=None, help="default: 15 of 24 scaled to the depth")
    p.add_argument("--bf16", action="store_true", help="bfloat16 projections (scan and residual stream float32)")
    p.add_argument("--precision", default="highest", choices=("highest", "default"))
    p.add_argument("--remat", action="store_true", help="remat for the gradient methods")
    p.add_argument("--scan-method", default="auto", choices=("auto", "pallas", "associative", "sequential"),
                   help="the selective scan (default auto: the associative scan below batch PALLAS_MIN_BATCH on a GPU)")
    p.add_argument("--compile-threads", type=int, default=1,
                   help="compile every row first, this many at a time, then time them one by one")
    args = p.parse_args(argv)

    config = SMOKE_CONFIG if args.smoke else mamba_lm("mamba-130m")
    T = 32 if args.smoke and args.seq_len == 1024 else args.seq_len
    batches = [1, 2] if args.smoke and args.batches == "1,16" else [int(b) for b in args.batches.split(",")]
    reps = 1 if args.smoke else args.reps
    methods = TOKEN_METHODS if args.methods == "all" else tuple(args.methods.split(","))
    modes = tuple(args.modes.split(","))
    bad = [m for m in methods if m not in TOKEN_METHODS] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown methods or modes {bad}")
    from xai.methods import default_start_layer

    start = default_start_layer(config) if args.start_layer is None else args.start_layer
    options = Options(dtype=jnp.bfloat16 if args.bf16 else None, precision=args.precision,
                      scan_method=args.scan_method)
    params = init_lm_params(config, jax.random.PRNGKey(0))
    device = jax.devices()[0].device_kind
    log(f"{config.name}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M parameters, {T} tokens, "
        f"batches {batches}, start layer {start}, on {device}")
    rows = []
    header = ["| batch | work | ms | tokens/s | peak GiB | compile s |", "|---:|---|---:|---:|---:|---:|"]
    log("\n".join(header))
    out = Path(args.out)
    meta = dict(argv=["python", "benchmarks/lm_bench.py", *(sys.argv[1:] if argv is None else argv)], device=device,
                model=config.name, seq_len=T, reps=reps, start_layer=start, bf16=args.bf16, precision=args.precision,
                remat=args.remat, scan_method=args.scan_method, jax=jax.__version__)
    title = (f"# Mamba LM benchmark: {config.name}, {T} tokens, {device}\n\nmedian of {reps} runs; "
             f"`{' '.join(meta['argv'])}`\n\n")

    def write():  # after every row: a run cut short still leaves the rows it timed
        text = json.dumps(dict(meta=meta, rows=rows), indent=1, allow_nan=False)
        atomic_write_text(out / "results.json", text + "\n")
        atomic_write_text(out / "results.md", title + "\n".join(header + [fmt(r) for r in rows]) + "\n")

    for B in batches:  # one batch at a time: its rows are timed before the next batch compiles
        tokens = jax.random.randint(jax.random.PRNGKey(B), (B, T), 0, config.vocab_size)
        jax.block_until_ready(lm_apply(config, params, tokens[:, :8]))  # the check, once, outside the timings
        todo = [(B, *case) for case in cases(config, params, tokens, methods, modes, options, start, args.remat)]
        executables = {}
        if args.compile_threads > 1:  # compile the batch's rows first, several at a time (XLA compiles off the
            # GIL); each compile time is then an upper bound (the compiles share the CPU), the timings are unaffected
            from concurrent.futures import ThreadPoolExecutor

            def compile_one(i, todo=todo):
                try:
                    return i, compile_timed(todo[i][2], todo[i][3])
                except Exception as e:  # reported when the row is timed
                    return i, e

            with ThreadPoolExecutor(args.compile_threads) as pool:
                executables = dict(pool.map(compile_one, range(len(todo))))
        for i, (B, work, fn, fargs) in enumerate(todo):
            try:
                pre = executables.pop(i, None)
                if isinstance(pre, Exception):
                    raise pre
                seconds, peak, compile_s = measure(fn, fargs, reps, compiled=pre)
            except Exception as e:  # one failing row (out of memory, say) does not end the run
                log(f"| {B} | {work} | FAILED {type(e).__name__}: {str(e)[:200]} |")
                continue
            row = dict(model=config.name, batch=B, seq_len=T, work=work, seconds=seconds,
                       tokens_per_s=B * T / seconds, peak_gib=peak, compile_s=compile_s)
            rows.append(row)
            log(fmt(row))
            write()
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
