"""The evaluation at scale: start-up, steady state, and the bound set by the model's own rates.

    python benchmarks/evaluate_bench.py --run small:float32:all:both --run small:bfloat16:all:both \
        --batch-size 128 --batches 2 --warm-start tiny:float32:mamba_attribution:official \
        --out benchmarks/results/h200/evaluate
    python benchmarks/evaluate_bench.py --run demo:float32:raw_attention:official --batch-size 2 \
        --batches 2 --out /tmp/eb                                    # a CPU smoke run

A run is MODEL:DTYPE:METHODS:MODES[:BATCHES] (MODEL tiny, small, base or demo, random weights except
the demo's; DTYPE float32 or bfloat16; METHODS "all" = ``xai.methods.METHODS`` or a comma list;
MODES both, exact or official; BATCHES overrides --batches). Each run evaluates procedural
shapes (``--shapes`` data, rendered on the device) with ``xai.eval.evaluate.Evaluation``
exactly as ``evaluate`` does (prefetch thread, device copies), every method and mode as a row
plus the random and centre baselines, and measures, in one process:

- start-up: process start to the first batch done (imports, backend, model, every compilation
  and the first batch). Later runs of the same process add the process part measured by the
  first (imports and backend) to their own run-start-to-first-batch time; they may find small
  programs they share with earlier runs (data rendering, metrics) already in the persistent cache.
- steady state: images per second over the batches after the first.
- the rates, timed after the loop on one batch (medians, each call ended with
  block_until_ready): the forward pass, each (method, mode) explanation, one row's perturbation
  test (2 x 9 forwards, the ranking and masking), the segmentation statistics, the data.
- the bound: per image, the protocol runs 1 explanation per (method, mode) and 1 + 18 x rows
  forwards (the unperturbed image, 9 positive and 9 negative steps of every row, baselines
  included): bound = 1 / (forwards / forward rate + sum of 1 / explanation rate). The ratio
  steady / bound is the loop's efficiency; "accounted" adds the measured metric and data costs,
  so that steady vs accounted shows what is left unexplained (host syncs, dispatch).
- the projection of the paper's protocol (ImageNet validation 50,000 images for both
  perturbation tests, ImageNet-Segmentation 4,276 images; its three methods x both modes, no
  baselines) from the same rates, for each run that measured all six rows (and its three
  official rows alone): the bound, plus the metrics, and that divided by the measured ratio
  (capped at 1).

``--warm-start SPEC`` runs SPEC again right after its run (added to the runs if absent) in a fresh
process (its first batch only), with the persistent compilation cache the first filled
(``MAMBA_JAX_CACHE``, as the command lines use it): that process's start-up is the warm
start-up. Writes results.json and results.md atomically after every run (merged with the runs
already in --out).
"""

from __future__ import annotations

import time

_IMPORTED = time.time()


def process_start() -> float:
    """The epoch time this process started (Linux /proc), else the time this module was imported."""
    try:
        import os

        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started_ticks = float(fields[19])  # field 22 of stat(5): start time after boot, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


T_PROCESS = process_start()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xai.app.compile_cache import enable_compilation_cache  # noqa: E402

CACHE = enable_compilation_cache()  # as the command lines do, before anything compiles

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mamba_jax import init_params, official  # noqa: E402
from mamba_jax.files import atomic_write_text  # noqa: E402
from mamba_jax.options import Options  # noqa: E402
from xai.eval.data import prefetch  # noqa: E402
from xai.eval.evaluate import (  # noqa: E402
    Evaluation,
    _normalize,
    default_classifier,
    default_explainer,
    options_record,
    to_device,
)
from xai.eval.metrics import PERTURBATION_STEPS, perturbation_hits, segmentation_stats  # noqa: E402
from xai.eval.shapes import shapes_batches  # noqa: E402
from xai.methods import METHODS, MODES, method_modes, resolve_start_layer  # noqa: E402

BACKEND_READY = time.time() if jax.devices() else None  # initializes the backend
MODELS = {"tiny": "vim_tiny", "small": "vim_small", "base": "vim_base", "demo": None}
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
SEED = 1000
STEPS = len(PERTURBATION_STEPS) - 1  # perturbed forwards per direction (k = 0 reuses the unperturbed top-1)

# The paper's protocol (SPEC section 5; the brief of issue 13): its three methods, both modes.
PAPER = {"perturbation_images": 50_000, "segmentation_images": 4_276,
         "methods": ("raw_attention", "rollout", "mamba_attribution"), "modes": ("exact", "official")}


def log(*a):
    print(*a, flush=True)


class BenchError(RuntimeError):
    """A measurement that is not a finite positive number, or a run that cannot be set up."""


def finite(value: float, what: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise BenchError(f"{what} is not finite: {value!r}")
    return float(value)


# ---------------------------------------------------------------------------- runs


def parse_run(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"a run is MODEL:DTYPE:METHODS:MODES[:BATCHES], got {text!r}")
    model, dtype, methods, modes = parts[:4]
    batches = None
    if len(parts) == 5:
        if not parts[4].isdigit() or int(parts[4]) < 1:
            raise argparse.ArgumentTypeError(f"BATCHES must be a positive integer, got {parts[4]!r}")
        batches = int(parts[4])
    if model not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    methods = METHODS if methods == "all" else tuple(m for m in methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; expected all or some of {METHODS}")
    modes = MODES if modes == "both" else tuple(m for m in modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        raise argparse.ArgumentTypeError(f"modes must be both or some of {MODES}, got {parts[3]!r}")
    return {"spec": text, "model": model, "dtype": dtype, "methods": tuple(methods), "modes": tuple(modes),
            "batches": batches}


def model_of(name: str):
    if name == "demo":
        from xai.app.demo import demo_model

        return demo_model()
    config = official(MODELS[name])
    return config, init_params(config, jax.random.PRNGKey(0))


def timed(fn, *, reps: int, budget_s: float = 2.0) -> float:
    """Median seconds of ``fn()`` (each ended with block_until_ready) over up to ``reps`` calls,
    fewer (at least 2) once ``budget_s`` is spent; the first call is a warm-up unless it alone
    took longer than ``budget_s`` (then it is the first sample: everything is compiled by then)."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = [first] if first > budget_s else []
    spent = first
    while len(times) < reps and (len(times) < 2 or spent < budget_s):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return statistics.median(times)


def run_one(run: dict, args, first_in_process: bool, process_s: float) -> dict:
    t_run = time.time()
    if not first_in_process:
        jax.clear_caches()  # this run compiles its own programs, as a fresh process would
    config, params = model_of(run["model"])
    if config.img_size != 224:
        raise BenchError(f"{run['model']}: the shapes data are 224 x 224, the model takes {config.img_size}")
    options = Options(dtype=DTYPES[run["dtype"]], scan_method=args.scan_method, remat=args.remat)
    start_layer = resolve_start_layer(config, None)
    classifier = default_classifier(config, params, options=options)
    explainer = default_explainer(config, params, start_layer=start_layer, options=options)
    evaluation = Evaluation(config, classifier, explainer, methods=run["methods"], modes=run["modes"],
                            start_layer=start_layer, options=options)
    B, n_batches = args.batch_size, run["batches"] or args.batches
    data = prefetch(shapes_batches(B, SEED, stop=B * n_batches, normalized=False), 2, transform=to_device)

    # the loop of xai.eval.evaluate.evaluate, with a clock
    step_s = []
    t = time.perf_counter()
    for images01, labels, masks in data:
        evaluation.step(images01, labels, masks)
        step_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        if len(step_s) == 1:
            first_done = time.time()
            first_batch_s = first_done - t_run
            log(f"  first batch done {first_batch_s:.1f} s after the run started")
    summary = evaluation.summary()
    for key, row in summary["rows"].items():
        for test, values in (("perturbation", row["perturbation"]), ("segmentation", row["segmentation"])):
            for name, v in (values or {}).items():
                for x in (v["curve"] + [v["auc"]] if isinstance(v, dict) else [v]):
                    finite(x, f"{key} {test} {name}")
    rows = len(evaluation.rows)
    forwards = 1 + 2 * STEPS * rows
    result = {
        "spec": run["spec"], "model": run["model"], "config": config.name, "dtype": run["dtype"],
        "methods": list(run["methods"]), "modes": list(run["modes"]), "rows": rows,
        "baselines": list(evaluation.baselines), "batch_size": B, "batches": n_batches,
        "options": options_record(options), "start_layer": start_layer,
        "forwards_per_image": forwards, "explanations_per_image": rows - len(evaluation.baselines),
        "process_s": process_s, "run_to_first_batch_s": first_batch_s,
        "startup_s": first_done - T_PROCESS if first_in_process else process_s + first_batch_s,
        "first_batch_step_s": step_s[0], "steady_step_s": step_s[1:],
    }
    if len(step_s) > 1:
        result["steady_img_per_s"] = finite(B * (len(step_s) - 1) / sum(step_s[1:]), "steady img/s")
    if args.no_rates:
        return result

    # the rates, on one batch, everything compiled
    x01, _, masks = to_device(next(iter(shapes_batches(B, SEED, stop=B, normalized=False))))
    x_norm = _normalize(x01)
    targets = jnp.argmax(classifier(x_norm), -1).astype(jnp.int32)
    t_fwd = timed(lambda: classifier(x_norm), reps=args.reps)
    t_expl, maps = {}, None
    for method in run["methods"]:
        for mode in method_modes(method, run["modes"]):  # a method without modes (MODELESS) once, as evaluate
            key = f"{method}/{mode}" if mode else method
            t_expl[key] = timed(lambda m=method, md=mode or run["modes"][0]: explainer(x_norm, m, md, targets),
                                reps=args.reps)
            log(f"  {key}: {B / t_expl[key]:.1f} img/s")
    maps = explainer(x_norm, run["methods"][0], run["modes"][0], targets)
    t_pert = timed(lambda: [perturbation_hits(classifier, x01, maps, targets, positive=p, unperturbed=targets)
                            for p in (True, False)], reps=2)
    t_seg = timed(lambda: segmentation_stats(maps, masks), reps=args.reps)
    t_data = timed(lambda: next(iter(shapes_batches(B, SEED + 1, stop=B, normalized=False))), reps=args.reps)

    per_batch_bound = forwards * t_fwd + sum(t_expl.values())
    metrics_overhead = max(t_pert - 2 * STEPS * t_fwd, 0.0) + t_seg  # one row's metrics beyond its forwards
    per_batch_accounted = per_batch_bound + rows * metrics_overhead + t_data
    result.update({
        "forward_img_per_s": finite(B / t_fwd, "forward img/s"),
        "explain_img_per_s": {k: finite(B / v, f"{k} img/s") for k, v in t_expl.items()},
        "perturbation_row_s": t_pert, "perturbation_row_overhead_s": t_pert - 2 * STEPS * t_fwd,
        "segmentation_row_s": t_seg, "data_batch_s": t_data,
        "bound_img_per_s": finite(B / per_batch_bound, "bound img/s"),
        "accounted_img_per_s": finite(B / per_batch_accounted, "accounted img/s"),
    })
    if "steady_img_per_s" in result:
        result["ratio"] = result["steady_img_per_s"] / result["bound_img_per_s"]
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["process_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    result["projection"] = projection(result)
    return result


def projection(r: dict) -> dict | None:
    """Minutes for the paper's protocol at this run's rates (None without all six paper rows)."""
    expl = r["explain_img_per_s"]
    out = {}
    for name, modes in (("all_rows", PAPER["modes"]), ("official_rows", ("official",))):
        keys = [f"{m}/{mode}" for m in PAPER["methods"] for mode in modes]
        if any(k not in expl for k in keys):
            continue
        rows = len(keys)
        t_f = 1 / r["forward_img_per_s"]
        t_e = sum(1 / expl[k] for k in keys)
        B = r["batch_size"]
        pert_extra = max(r["perturbation_row_overhead_s"], 0.0) / B  # per image and row
        seg_extra = r["segmentation_row_s"] / B
        n_p, n_s = PAPER["perturbation_images"], PAPER["segmentation_images"]
        forwards_min = (n_p * (1 + 2 * STEPS * rows) + n_s) * t_f / 60
        explain_min = (n_p + n_s) * t_e / 60
        bound = forwards_min + explain_min
        metrics_min = (n_p * rows * pert_extra + n_s * rows * seg_extra) / 60
        # a ratio above 1 means the loop pipelined its forwards better than the timed single calls
        # (each ended with a sync): the projection does not count on it
        ratio = min(r["ratio"], 1.0) if r.get("ratio") else None
        out[name] = {"rows": rows, "forwards_per_image": 1 + 2 * STEPS * rows, "forwards_min": forwards_min,
                     "explanations_min": explain_min, "bound_min": bound, "metrics_min": metrics_min,
                     "at_measured_efficiency_min": (bound + metrics_min) / ratio if ratio else None}
    return out or None


# ---------------------------------------------------------------------------- output


def _f(x, fmt=".1f"):
    return "-" if x is None else format(x, fmt)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# `evaluate` at scale ({meta['device']}, jax {meta['jax']})", "",
             f"Batch {results[0]['batch_size'] if results else '-'}, procedural shapes, random weights (demo: "
             "its own), every row also runs the random and centre baselines; matmul precision "
             "'highest'. Start-up = process start to the first batch done (compilation included); steady = "
             "img/s after the first batch; bound = 1 / (forwards per image / forward rate + sum of 1 / "
             "explanation rate), from rates measured in the same process; accounted = the bound plus the "
             "measured metric and data costs.", "",
             "| run | rows | fwd/img | start-up s | warm start-up s | steady img/s | bound img/s | ratio "
             "| accounted img/s | forward img/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['spec']} | {r['rows']} | {r['forwards_per_image']} | {_f(r.get('startup_s'))} | "
                     f"{_f(r.get('warm_startup_s'))} | {_f(r.get('steady_img_per_s'))} | "
                     f"{_f(r.get('bound_img_per_s'))} | {_f(r.get('ratio'), '.0%')} | "
                     f"{_f(r.get('accounted_img_per_s'))} | {_f(r.get('forward_img_per_s'), '.0f')} |")
    lines += ["", "Explanation rates (img/s, same runs):", "", "| run | method/mode | img/s |", "|---|---|---:|"]
    for r in results:
        for k, v in (r.get("explain_img_per_s") or {}).items():
            lines.append(f"| {r['spec']} | {k} | {v:.1f} |")
    lines += ["", f"Projection of the paper's protocol ({PAPER['perturbation_images']:,} ImageNet validation images, "
              f"both perturbation tests; {PAPER['segmentation_images']:,} ImageNet-Segmentation images; "
              "no baselines), minutes on this device:", "",
              "| run | rows | forwards | explanations | bound | + metrics | at measured efficiency |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for name, p in (r.get("projection") or {}).items():
            lines.append(f"| {r['spec']} | {name} ({p['rows']}) | {p['forwards_min']:.1f} | "
                         f"{p['explanations_min']:.1f} | {p['bound_min']:.1f} | "
                         f"{p['bound_min'] + p['metrics_min']:.1f} | {_f(p['at_measured_efficiency_min'])} |")
    return "\n".join(lines) + "\n"


def write(results: list[dict], out: Path, meta: dict) -> None:
    """results.json and results.md, atomically, merged with the runs already there (same spec,
    batch size and options: replaced)."""
    path = out / "results.json"
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    key = lambda r: (r["spec"], r["batch_size"], json.dumps(r["options"], sort_keys=True))  # noqa: E731
    new_keys = {key(r) for r in results}
    merged = [r for r in old if key(r) not in new_keys] + results
    atomic_write_text(path, json.dumps({"meta": meta, "runs": merged}, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "results.md", markdown(merged, meta))


def table(results: list[dict]) -> str:
    head = (f"{'run':<60} {'start s':>8} {'warm s':>7} {'steady':>8} {'bound':>8} {'ratio':>6} "
            f"{'acctd':>8} {'fwd':>7}")
    lines = [head]
    for r in results:
        lines.append(f"{r['spec']:<60} {_f(r.get('startup_s')):>8} {_f(r.get('warm_startup_s')):>7} "
                     f"{_f(r.get('steady_img_per_s')):>8} {_f(r.get('bound_img_per_s')):>8} "
                     f"{_f(r.get('ratio'), '.0%'):>6} {_f(r.get('accounted_img_per_s')):>8} "
                     f"{_f(r.get('forward_img_per_s'), '.0f'):>7}")
    for r in results:
        for name, p in (r.get("projection") or {}).items():
            lines.append(f"projection {r['spec']} {name}: forwards {p['forwards_min']:.1f} + explanations "
                         f"{p['explanations_min']:.1f} = {p['bound_min']:.1f} min (bound), "
                         f"{p['bound_min'] + p['metrics_min']:.1f} with metrics, "
                         f"{_f(p['at_measured_efficiency_min'])} at the measured efficiency")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def warm_start(run: dict, args) -> float | None:
    """The start-up of ``run`` (its first batch only) in a fresh process that finds the
    compilation cache this one filled; None if that process failed."""
    with tempfile.TemporaryDirectory() as tmp:
        child = Path(tmp) / "child.json"
        spec = ":".join(run["spec"].split(":")[:4])
        cmd = [sys.executable, __file__, "--run", spec, "--batch-size", str(args.batch_size),
               "--batches", "1", "--no-rates", "--out", tmp, "--child-json", str(child),
               "--scan-method", args.scan_method] + (["--remat"] if args.remat else [])
        log(f"warm start: {' '.join(cmd[1:])}")
        # this process still holds its memory: the child allocates on demand instead of taking 75% first
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        done = subprocess.run(cmd, env=env, check=False)
        if done.returncode != 0 or not child.is_file():
            return None
        startup = json.loads(child.read_text())[0]["startup_s"]
    log(f"warm start-up {startup:.1f} s (cold {run.get('startup_s', float('nan')):.1f} s)")
    return startup


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=parse_run, action="append", metavar="MODEL:DTYPE:METHODS:MODES",
                   help="a run (repeatable; default small:float32:all:both)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=3, help="batches per run: the first compiles, the rest are "
                                                          "the steady state (default 3)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per rate (fewer for slow calls; default 5)")
    p.add_argument("--scan-method", default="auto")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--warm-start", type=parse_run, default=None, metavar="SPEC",
                   help="after the runs, SPEC's first batch in a fresh process, with the compilation cache filled")
    p.add_argument("--no-rates", action="store_true", help="only the loop (start-up and steady state)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds after which no further run starts (results so far are written)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.batches < 1:
        p.error("--batch-size and --batches must be >= 1")
    runs = args.run or [parse_run("small:float32:all:both")]
    process_s = BACKEND_READY - T_PROCESS
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "argv": sys.argv[1:],
            "compilation_cache": str(CACHE) if CACHE else None}
    log(f"{meta['device']}, jax {meta['jax']}; process start to backend ready {process_s:.1f} s; "
        f"compilation cache {meta['compilation_cache']}")
    results, failed = [], []
    warm_pending = args.warm_start is not None and args.child_json is None
    base = lambda spec: ":".join(spec.split(":")[:4])  # noqa: E731  (without the batch count)
    if warm_pending and base(args.warm_start["spec"]) not in [base(r["spec"]) for r in runs]:
        runs.append(args.warm_start)  # measured cold first, then warm
    for i, run in enumerate(runs):
        if time.time() - T_PROCESS > args.time_budget:
            log(f"SKIPPED (time budget {args.time_budget:.0f} s spent): {run['spec']}")
            failed.append(run["spec"])
            continue
        log(f"run {run['spec']}, batch {args.batch_size} x {run['batches'] or args.batches}")
        try:
            results.append(run_one(run, args, i == 0, process_s))
        except Exception as err:  # the other runs still go, the error is reported
            traceback.print_exc()
            log(f"FAILED {run['spec']}: {type(err).__name__}: {str(err)[:300]}")
            failed.append(run["spec"])
            continue
        if args.child_json is None:
            if warm_pending and base(run["spec"]) == base(args.warm_start["spec"]):
                warm = warm_start(results[-1], args)
                if warm is None:
                    failed.append(f"warm start {run['spec']}")
                else:
                    results[-1]["warm_startup_s"] = warm
            write(results, args.out, meta)
        log(table(results[-1:]))

    if args.child_json is not None:
        atomic_write_text(args.child_json, json.dumps(results, allow_nan=False))
        return 1 if failed else 0
    log("")
    log(table(results))
    if failed:
        log(f"not measured: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
