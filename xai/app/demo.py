"""The embedded demo model (a small Vim trained on the procedural shapes) and the main job."""

from __future__ import annotations

import io
from importlib import resources

import jax.numpy as jnp
import numpy as np

from mamba_jax.config import VimConfig

DEMO_CONFIG = VimConfig(embed_dim=96, depth=8, patch_size=16, stride=16, img_size=224, num_classes=10,
                        name="demo")
DEMO_START_LAYER = 5  # the official 15 of 24 layers scaled to 8 (xai.methods.default_start_layer)
WEIGHTS = "assets/demo_vim.npz"


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    params: dict = {}
    for key, value in flat.items():
        node = params
        *path, leaf = key.split("/")
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return params


def flatten(params, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def demo_model() -> tuple[VimConfig, dict]:
    """(config, params) of the embedded demo Vim: 10 shape classes, 224 x 224, 8 layers, middle class token."""
    ref = resources.files("xai").joinpath(WEIGHTS)
    if not ref.is_file():
        raise FileNotFoundError(f"the demo weights {WEIGHTS} are missing from the xai package; "
                                "train them with `python -m xai.app.train_demo`")
    with np.load(io.BytesIO(ref.read_bytes())) as data:
        return DEMO_CONFIG, unflatten(dict(data))


# ------------------------------------------------------------------ the main job
def run_demo(out_dir="out/demo", *, n_eval: int = 32, n_show: int = 4, batch_size: int = 16, seed: int = 1000,
             overwrite: bool = False, progress: bool = True) -> dict:
    """The main job: explain procedural images with every method in both modes, write the
    figures, run both evaluation tests on a held-out procedural set, write and print the table.
    ``out_dir`` must be new or empty, or hold an earlier demo run's results with ``overwrite``
    (``xai.app.files``: checked before any work, only this command's files replaced)."""

    import jax

    from mamba_jax import normalize, vim_apply
    from xai import explain
    from xai.app.files import check_output_dir, output_dir, record_outputs
    from xai.app.labels import class_names
    from xai.app.plot import attention_matrices_figure, modes_figure
    from xai.app.report import CURVES_PNG, RESULTS_JSON, RESULTS_MD, markdown_table, write_results
    from xai.eval.evaluate import evaluate
    from xai.eval.shapes import shapes_batches, shapes_dataset01
    from xai.hidden_attention import hidden_attention
    from xai.methods import METHODS, MODES

    out = check_output_dir(out_dir, command="demo", overwrite=overwrite)
    config, params = demo_model()
    names = class_names(config)
    start = DEMO_START_LAYER
    with output_dir(out, command="demo", overwrite=overwrite) as out:
        record_outputs(out, "demo", [f"sample_{i}.png" for i in range(n_show)]
                       + [f"attention_layer{start}.png", RESULTS_JSON, RESULTS_MD, CURVES_PNG])

        images01, labels, _ = shapes_dataset01(n_show, seed=seed + 10_000)
        images = normalize(images01)
        probs = jax.nn.softmax(vim_apply(config, params, images), -1)
        maps = {mode: {m: np.asarray(explain(config, params, images, m, start_layer=start, mode=mode))
                       for m in METHODS} for mode in MODES}
        figures = []
        for i in range(n_show):
            pred = int(probs[i].argmax())
            title = f"label {names[labels[i]]}, predicted {names[pred]} ({float(probs[i, pred]):.0%})"
            path = out / f"sample_{i}.png"
            modes_figure(images01[i], {mode: {m: maps[mode][m][i] for m in METHODS} for mode in MODES}, path,
                         title=title)
            figures.append(path)
            print(f"sample {i}: {title} -> {path}")
        alpha = np.asarray(hidden_attention(config, params, images[:1], layers=[start], channels=[0, 1, 2, 3]))
        path = out / f"attention_layer{start}.png"
        attention_matrices_figure(alpha[0, 0], [0, 1, 2, 3], start, path, cls_pos=config.cls_pos)
        figures.append(path)

        batches = ((np.asarray(x), np.asarray(y), np.asarray(m))
                   for x, y, m in shapes_batches(batch_size, seed, stop=n_eval, normalized=False))
        results = evaluate(config, params, batches, methods=METHODS, modes=MODES, start_layer=start,
                           progress=progress, total=-(-n_eval // batch_size))
        results["settings"]["data"] = f"{n_eval} procedural shapes, seed {seed} (held out from training)"
        written = write_results(results, out)
    print(f"\nheld-out top-1 accuracy: {results['top1_accuracy']:.1f}% on {n_eval} images\n")
    print(markdown_table(results))
    print(f"\nwrote {len(figures)} figures and {', '.join(p.name for p in written.values())} to {out}")
    return results


def add_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="the main job on the embedded demo model (offline, a few minutes on a CPU)",
        description="Loads the embedded demo Vim (trained on procedural shapes), explains sample images with "
                    "the five methods (both modes where a method has them) and the gradient x input "
                    "baseline, writes figures, and runs the perturbation and "
                    "segmentation tests on a held-out procedural set.")
    p.add_argument("--out", default="out/demo", metavar="DIR",
                   help="output folder (default out/demo), new or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier `mamba-jax demo` run in --out (only those)")
    p.add_argument("--n-eval", type=int, default=32,
                   help="images in the evaluation set (default 32: about 8 minutes on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1000, help="seed of the evaluation set (training used 0)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=lambda a: run_demo(a.out, n_eval=a.n_eval, batch_size=a.batch_size, seed=a.seed,
                                          overwrite=a.overwrite, progress=not a.no_progress) and 0)
    return p
