"""Data-parallel scaling over the local devices (weak scaling: a fixed batch per device).

    python benchmarks/scaling.py --model small --per-device 128 --out benchmarks/results/h200x2
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python benchmarks/scaling.py --model demo --per-device 2 --methods rollout --reps 1   # CPU smoke run

For 1, 2, 4, ... and all local devices: images per second of the forward pass and of each
method (official mode unless --mode) through ``xai.distributed`` (one jitted shard_map
program per device count), median of --reps runs after warm-up. Efficiency is
throughput(n) / (n x throughput(1)): 1.0 is perfect scaling. Random weights, float32.
Writes scaling.json and scaling.md to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from bench import timeit  # noqa: E402  (this folder)

from mamba_jax import init_params, official  # noqa: E402
from mamba_jax.files import atomic_write  # noqa: E402
from xai.app.demo import DEMO_CONFIG  # noqa: E402
from xai.distributed import data_mesh, explain_sharded, predict_sharded  # noqa: E402
from xai.methods import METHODS, default_start_layer  # noqa: E402

MODELS = {"tiny": "vim_tiny", "small": "vim_small", "base": "vim_base"}


def device_counts(total: int) -> list[int]:
    """1, 2, 4, ... below ``total``, then ``total``."""
    counts, n = [], 1
    while n < total:
        counts.append(n)
        n *= 2
    return counts + [total]


def run(args) -> dict:
    config = DEMO_CONFIG if args.model == "demo" else official(MODELS[args.model])
    params = init_params(config, jax.random.PRNGKey(0))
    start = default_start_layer(config)
    devices = jax.devices()
    rows = []
    for n in device_counts(len(devices)):
        mesh = data_mesh(devices[:n])
        B = args.per_device * n
        images = jax.random.normal(jax.random.PRNGKey(n), (B, config.img_size, config.img_size, config.channels))
        works = {"forward": functools.partial(predict_sharded, config, params, images, mesh)}
        for method in args.methods:
            works[f"{method}/{args.mode}"] = functools.partial(
                explain_sharded, config, params, images, method, start_layer=start, mode=args.mode, mesh=mesh)
        for work, fn in works.items():
            t = timeit(fn, reps=args.reps, warmup=1)
            rows.append(dict(devices=n, batch=B, work=work, seconds=t, img_per_s=B / t))
            print(f"{n:3d} devices  batch {B:5d}  {work:<28} {t * 1e3:9.2f} ms {B / t:10.1f} img/s", flush=True)
    single = {r["work"]: r["img_per_s"] for r in rows if r["devices"] == 1}
    for r in rows:
        r["efficiency"] = r["img_per_s"] / (r["devices"] * single[r["work"]])
    return dict(meta=dict(device=str(devices[0].device_kind), n_devices=len(devices), jax=jax.__version__,
                          model=args.model, per_device=args.per_device, reps=args.reps), rows=rows)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    m = report["meta"]
    lines = [f"{m['n_devices']} x {m['device']}; jax {m['jax']}; model {m['model']}, {m['per_device']} images "
             f"per device; median of {m['reps']} runs after warm-up.", "",
             "| devices | batch | work | ms | img/s | efficiency |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['devices']} | {r['batch']} | {r['work']} | {r['seconds'] * 1e3:.2f} | {r['img_per_s']:.1f} | "
              f"{r['efficiency']:.2f} |" for r in report["rows"]]
    for name, text in (("scaling.json", json.dumps(report, indent=1)), ("scaling.md", "\n".join(lines) + "\n")):
        atomic_write(out / name, lambda f, text=text: f.write(text.encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=(*MODELS, "demo"), default="small")
    p.add_argument("--per-device", type=int, default=128, help="images per device (default 128)")
    p.add_argument("--methods", default="mamba_attribution", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--mode", choices=("official", "exact"), default="official")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/scaling")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; expected {', '.join(METHODS)}")
    report = run(args)
    write(report, Path(args.out))
    print(f"wrote {args.out}/scaling.json and scaling.md")


if __name__ == "__main__":
    main()
