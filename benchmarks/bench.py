"""Benchmarks of the Flax Vim and the explanation methods (run on the GPU for the README table).

    python benchmarks/bench.py --out benchmarks/results/latest     # everything (over 10 min on an H200,
                                                                   # mostly compiling; see --budget)
    python benchmarks/bench.py --models tiny --batches 1 --modes official --reps 1   # a CPU smoke run
    python benchmarks/bench.py --merge run1,run2 --out merged     # one table from several runs

Measures, per model (Vim-T/S/B, random weights, float32, matmul precision "highest"
unless --precision default) and batch size: forward throughput, explanation throughput
of each method (official and exact modes), single-image latency, the compiled peak
memory (XLA's memory analysis: arguments + outputs + temporaries), the compile time, the full hidden
attention of every layer of one Vim-T image consumed chunk by chunk, and, with --torch,
the pure-PyTorch reference on the same device. Every timing is the median of --reps runs
(explanations: half as many, at least 3) after warm-up, each ended with block_until_ready;
--remat-batches adds Mamba-Attribution with remat=True at those batches. Writes results.json and results.md.

The exact mode's layer matrices come from the tiled Pallas kernels on a GPU
(mamba_jax/pallas_attention.py; the path column says "attn pallas"); --attention-config sets their
tuning (the JSON line printed last by benchmarks/attention_gpu_check.py). --compile-threads N
compiles the cases of one model and batch N at a time before timing them one by one (each row's
compile time is then its wall time beside the others: an upper bound).

    python benchmarks/bench.py --models tiny,small --modes official,exact \
        --methods rollout,mamba_attribution --skip-forward --remat-batches "" --full-attention \
        --compile-threads 4 --out benchmarks/results/h200/runs/NAME      # exact vs official, b1/32/128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mamba_jax import init_params, official, pallas_attention, vim_apply  # noqa: E402
from mamba_jax.files import atomic_write  # noqa: E402
from mamba_jax.options import Options  # noqa: E402
from xai.hidden_attention import map_hidden_attention  # noqa: E402
from xai.methods import METHODS, MODELESS, explain  # noqa: E402

MODELS = {"tiny": "vim_tiny", "small": "vim_small", "base": "vim_base"}

BF16 = Options(dtype=jnp.bfloat16)


def log(*a):
    print(*a, flush=True)


def timeit(fn, *args, reps=10, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compile_case(fn, *args):
    """(the executable of the jitted ``fn`` for ``args``, compile seconds)."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t


def measure(fn, *args, reps, warmup=2, precompiled=None):
    """Compile the jitted ``fn`` for ``args`` once, explicitly (or take ``precompiled``, a
    ``compile_case`` result), then time that executable and read its memory analysis: (median
    seconds, peak GiB, compile seconds). (Wrapping ``fn`` in another jax.jit for the memory
    analysis, as this script once did, compiled every case twice.)"""
    compiled, compile_s = precompiled if precompiled is not None else compile_case(fn, *args)
    return timeit(compiled, *args, reps=reps, warmup=warmup), _gib(peak_bytes(compiled)), compile_s


def peak_bytes(compiled):
    """XLA's static memory analysis of a compiled function: args + outputs + temporaries."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # some backends have no analysis
        return None


T0 = time.perf_counter()


def over_budget(args, what):
    if time.perf_counter() - T0 > args.budget:
        log(f"SKIPPED (time budget {args.budget:.0f} s spent): {what}")
        return True
    return False


def run_cases(cases, args, rows):
    """Compile (``--compile-threads`` at a time) and time each case (row, fn, inputs, reps, warmup),
    appending its row with seconds, img/s, peak GiB and compile seconds; a failure is logged."""
    def compile_one(case):
        try:
            return compile_case(case[1], *case[2])
        except Exception as e:
            return e

    threads = max(1, args.compile_threads)
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            compiled = list(pool.map(compile_one, cases))
    else:
        compiled = [None] * len(cases)
    for (row, fn, inputs, reps, warmup), pre in zip(cases, compiled):
        if over_budget(args, f"{row['work']} {row['model']} B={row['batch']} {row['scan']}"):
            continue
        try:
            if threads == 1:
                pre = compile_one((row, fn, inputs))
            if isinstance(pre, Exception):
                raise pre
            t, peak, tc = measure(fn, *inputs, reps=reps, warmup=warmup, precompiled=pre)
            row = dict(row, seconds=t, img_per_s=row["batch"] / t, peak_gib=peak, compile_s=tc)
            rows.append(row)
            log(_fmt(row))
        except Exception as e:
            log(f"{row['work']} {row['model']} B={row['batch']} {row['scan']}: FAILED {type(e).__name__}: "
                f"{str(e)[:300]}")


def bench_model(name, batches, args, rows):
    config = official(MODELS[name])
    params = init_params(config, jax.random.PRNGKey(0))
    start = config.depth * 15 // 24
    attention = pallas_attention.resolve_attention("auto")
    for B in batches:
        if over_budget(args, f"{name} batch {B}"):
            continue
        images = jax.random.normal(jax.random.PRNGKey(B), (B, config.img_size, config.img_size, 3))
        cases = []
        for scan in ([] if args.skip_forward else args.scans):
            opts = Options(scan_method=scan, precision=args.precision)
            fwd = jax.jit(lambda p, x, opts=opts: vim_apply(config, p, x, options=opts))
            cases.append((dict(model=name, batch=B, work="forward", scan=scan), fwd, (params, images), args.reps, 2))
        for mode in ([] if args.skip_explain else args.modes):
            if mode == "exact" and (B > args.max_exact_batch or name not in args.exact_models):
                continue
            for method in args.methods:
                if method in MODELESS and mode != args.modes[0]:
                    continue  # one row: the mode does not apply
                remats = (False, True) if method == "mamba_attribution" and B in args.remat_batches else (False,)
                for scan, remat in ((s, r) for s in args.scans for r in remats):
                    opts = Options(scan_method=scan, remat=remat)
                    fn = jax.jit(lambda p, x, method=method, mode=mode, opts=opts: explain(
                        config, p, x, method, start_layer=start, mode=mode, options=opts))
                    work = (method if method in MODELESS else f"{method}/{mode}") + (" remat" if remat else "")
                    path = scan + (f" + attn {attention}" if mode == "exact" and method != "raw_attention" else "")
                    cases.append((dict(model=name, batch=B, work=work, scan=path), fn, (params, images),
                                  max(3, args.reps // 2), 1))
        run_cases(cases, args, rows)
        write(rows, Path(args.out), args.meta)  # results so far, in case a later section is cut


def bench_full_attention(rows, reps, args):
    """All layers, all channels, both branches of one Vim-T image, consumed layer by layer
    (each layer's [2, E, L, L] block is reduced to a checksum, so memory stays one layer)."""
    config = official("vim_tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    image = jax.random.normal(jax.random.PRNGKey(1), (1, 224, 224, 3))

    def checksum(alpha):  # a consumer: reduce each layer's [1, 2, E, L, L] block as it is made
        return alpha.sum(axis=(2, 3, 4))

    all_layers = jax.jit(lambda p, x: map_hidden_attention(config, p, x, checksum))

    path = f"auto + attn {pallas_attention.resolve_attention('auto')}"
    run_cases([(dict(model="tiny", batch=1, work="hidden attention, 24 layers x 2 branches x 384 ch", scan=path),
                all_layers, (params, image), reps, 1)], args, rows)


def bench_bf16(rows, reps, report):
    """bfloat16 projections (scan and residual stream in float32): speed, and the effect on
    logits and on the official/exact maps, against float32, for Vim-S with random weights."""
    config = official("vim_small")
    params = init_params(config, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(7), (128, 224, 224, 3))
    for dtype in (None, jnp.bfloat16):
        opts = Options(precision=None, dtype=dtype)
        fwd = jax.jit(lambda p, x, opts=opts: vim_apply(config, p, x, options=opts))
        t, peak, tc = measure(fwd, params, images, reps=reps)
        rows.append(dict(model="small", batch=128, work=f"forward {'bf16' if dtype else 'f32 (tf32 matmuls)'}",
                         scan="auto", seconds=t, img_per_s=128 / t, peak_gib=peak, compile_s=tc))
        log(_fmt(rows[-1]))
    fn = jax.jit(lambda p, x: explain(config, p, x, "mamba_attribution", start_layer=15, mode="official",
                                      options=BF16))
    t, peak, tc = measure(fn, params, images, reps=max(3, reps // 2), warmup=1)
    rows.append(dict(model="small", batch=128, work="mamba_attribution/official bf16", scan="auto", seconds=t,
                     img_per_s=128 / t, peak_gib=peak, compile_s=tc))
    log(_fmt(rows[-1]))
    x = images[:16]
    l32 = vim_apply(config, params, x)
    l16 = vim_apply(config, params, x, options=BF16)
    report["bf16_logits_max_abs_diff_rel_to_max"] = float(jnp.abs(l32 - l16).max() / jnp.abs(l32).max())
    report["bf16_top1_agreement"] = float((l32.argmax(-1) == l16.argmax(-1)).mean())
    for method in METHODS:  # official mode only here (exact: benchmarks/bf16_effect.py, on the CPU)
        for mode in ("official",):
            a = explain(config, params, x, method, mode=mode)
            b = explain(config, params, x, method, mode=mode, options=BF16)
            report[f"bf16_{method}_{mode}_map_max_abs_diff_rel_to_max"] = float(jnp.abs(a - b).max() / jnp.abs(a).max())
    log("bf16 effect:", json.dumps(report, indent=1))


def bench_torch(names, batches, rows, reps):
    try:
        import torch

        from convert.checkpoint import load_checkpoint  # noqa: F401  (keeps the import path honest)
        from convert.reference import VimReference, mamba_attribution
    except Exception as e:
        log(f"torch reference unavailable: {e}")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in names:
        config = official(MODELS[name])
        model = VimReference(config).to(device).eval()
        for B in batches:
            x = torch.randn(B, 3, 224, 224, device=device)

            def run(fn):
                times = []
                for i in range(reps + 1):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - t)
                return statistics.median(times)

            with torch.no_grad():
                t = run(lambda m=model, x=x: m(x))
            rows.append(dict(model=name, batch=B, work="forward", scan="torch-reference", seconds=t,
                             img_per_s=B / t, peak_gib=None))
            log(_fmt(rows[-1]))
            if B == 1:
                t = run(lambda m=model, x=x: mamba_attribution(m, x, start_layer=15))
                rows.append(dict(model=name, batch=B, work="mamba_attribution/official", scan="torch-reference",
                                 seconds=t, img_per_s=B / t, peak_gib=None))
                log(_fmt(rows[-1]))
    try:
        import mamba_ssm  # noqa: F401

        log("mamba_ssm is importable, but this script does not build the official Vim with it")
    except Exception:
        log("mamba_ssm (official CUDA kernels) is not importable here: its column is left out")


def _gib(b):
    return None if b is None else b / 2**30


def _fmt(r):
    mem = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "-"
    comp = f"  compiled in {r['compile_s']:.1f} s" if r.get("compile_s") is not None else ""
    return (f"{r['model']:>5} B={r['batch']:<4} {r['work']:<34} {r['scan']:<16} "
            f"{r['seconds'] * 1e3:10.2f} ms {r['img_per_s']:10.1f} img/s  {mem}{comp}")


def write(rows, out: Path, meta):
    merged = any("run" in r for r in rows)  # rows from --merge name the run folder they came from
    text = json.dumps(dict(meta=meta, rows=rows), indent=1)
    atomic_write(out / "results.json", lambda f: f.write(text.encode()))
    lines = [f"Device: {meta['device']}; jax {meta['jax']}; precision {meta['precision']}; "
             f"medians after warm-up of {meta['reps']} runs (explanations: half as many, at least 3).", "",
             "| model | batch | work | path | ms | img/s | peak GiB | compile s |" + (" run |" if merged else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if merged else "")]
    for r in rows:
        mem = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['work']} | {r['scan']} | {r['seconds'] * 1e3:.2f} | "
                     f"{r['img_per_s']:.1f} | {mem} | {comp} |" + (f" {r['run']} |" if merged else ""))
    table = "\n".join(lines) + "\n"
    atomic_write(out / "results.md", lambda f: f.write(table.encode()))


def merge(folders, out: Path):
    """One table from several runs (e.g. two device calls): rows in order, metadata per run."""
    runs = [json.loads((d / "results.json").read_text()) for d in folders]
    meta = dict(runs[0]["meta"], runs=[dict(r["meta"], folder=d.name) for d, r in zip(folders, runs)])
    meta["reps"] = "/".join(str(r["meta"]["reps"]) for r in runs)
    write([dict(row, run=d.name) for d, r in zip(folders, runs) for row in r["rows"]], out, meta)
    log(f"merged {len(folders)} runs into {out}/results.json and results.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small,base")
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--scans", default="auto", help="comma list of auto, associative, sequential, pallas")
    p.add_argument("--modes", default="official,exact")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-exact-batch", type=int, default=128)
    p.add_argument("--exact-models", default="tiny,small,base", help="models whose exact mode is timed")
    p.add_argument("--precision", default="highest")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--skip-explain", action="store_true")
    p.add_argument("--skip-forward", action="store_true", help="no forward rows (explanations only)")
    p.add_argument("--compile-threads", type=int, default=1,
                   help="compile the cases of one model and batch this many at a time, then time them")
    p.add_argument("--attention-config", default=None,
                   help="JSON tuning of the hidden-attention kernels (mamba_jax.pallas_attention.DEFAULTS)")
    p.add_argument("--full-attention", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bfloat16 speed and its effect on logits and maps")
    p.add_argument("--torch", action="store_true", help="also time the pure-PyTorch reference")
    p.add_argument("--torch-batches", default="1,32")
    p.add_argument("--torch-models", default="tiny,small")
    p.add_argument("--remat-batches", default="128", help="batches whose attribution is also timed with remat")
    p.add_argument("--out", default="benchmarks/results/latest")
    p.add_argument("--merge", default=None, help="comma list of result folders to merge into --out (no run)")
    p.add_argument("--budget", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--order", default="models,full-attention,bf16,torch",
                   help="order of the sections (the budget cuts the last ones)")
    args = p.parse_args(argv)
    args.scans = args.scans.split(",")
    args.modes = args.modes.split(",")
    args.methods = args.methods.split(",")
    args.remat_batches = [int(b) for b in args.remat_batches.split(",") if b]
    if args.merge:
        merge([Path(d) for d in args.merge.split(",")], Path(args.out))
        return
    if args.precision == "default":
        args.precision = None
    batches = [int(b) for b in args.batches.split(",")]
    if args.attention_config:
        pallas_attention.DEFAULTS.update(json.loads(args.attention_config))
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, precision=str(args.precision),
                reps=args.reps, argv=sys.argv[1:], attention=pallas_attention.resolve_attention("auto"),
                attention_config=dict(pallas_attention.DEFAULTS))
    args.meta = meta
    log(f"# {meta}")
    rows: list[dict] = []
    for section in args.order.split(","):
        if section == "models":
            for name in args.models.split(","):
                bench_model(name, batches, args, rows)
        elif section == "full-attention" and args.full_attention and not over_budget(args, section):
            bench_full_attention(rows, max(3, args.reps // 2), args)
        elif section == "bf16" and args.bf16 and not over_budget(args, section):
            meta["bf16"] = {}
            bench_bf16(rows, args.reps, meta["bf16"])
        elif section == "torch" and args.torch and not over_budget(args, section):
            bench_torch(args.torch_models.split(","), [int(b) for b in args.torch_batches.split(",")], rows, reps=2)
        elif section.startswith("models:"):  # e.g. models:base, to run a model after the other sections
            for name in section.split(":")[1].split("+"):
                bench_model(name, batches, args, rows)
        write(rows, Path(args.out), meta)
    log(f"wrote {args.out}/results.json and results.md")


if __name__ == "__main__":
    main()
