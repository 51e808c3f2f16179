"""Reliability under bad or unusual input (issue 11).

Every case drives a command or a public function the way a new or careless user would, with
one bad or unusual input, and asserts the named error (one line at the command line, no
traceback) and that no file was lost, changed or left half-written (``Workspace.assert_intact``:
every file that existed before the case is unchanged, no temporary file is left anywhere).

Commands run in-process through their ``main(argv)``: an exception escaping ``main`` is what a
user sees as a traceback. Three run as real subprocesses (the offline hub, ``--debug``, a SIGINT
during a conversion). Models are tiny random ones (or the embedded demo model for the API).

``python tests/test_reliability.py [--json FILE]`` prints what every case does with the code as it
is, without asserting anything (the case table of the issue's closing note).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import xai  # noqa: E402
from convert.__main__ import main as convert_main  # noqa: E402
from convert.checkpoint import export_state_dict, save_params  # noqa: E402
from mamba_jax import VimConfig, normalize, preprocess, vim_apply  # noqa: E402
from xai.__main__ import main as xai_main  # noqa: E402
from xai.app import report
from xai.app.demo import demo_model  # noqa: E402
from xai.eval import evaluate as ev  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY32 = VimConfig(embed_dim=16, depth=2, img_size=32, patch_size=8, stride=8, num_classes=5)
TINY224 = VimConfig(embed_dim=16, depth=2, img_size=224, patch_size=16, stride=16, num_classes=10)
FAST = ["--methods", "raw_attention", "--mode", "exact", "--batch-size", "1"]  # one method, one batch shape
HUB = "hustvl/Vim-tiny-midclstok"


# ------------------------------------------------------------------ running a case
class Outcome:
    """What a command (``rc``, ``out``, ``err``) or an API call (``value``) did; ``exc`` is the
    exception raised by the API call, or the one escaping a command (a traceback for a user)."""

    def __init__(self):
        self.rc, self.out, self.err, self.exc, self.value = None, "", "", None, None
        self.note = ""  # anything else the case observed

    def summary(self) -> str:
        def first(text, n=170):
            text = " ".join(str(text).split())
            return text if len(text) <= n else text[: n - 3] + "..."

        if self.rc is None:  # an API call
            if self.exc is None:
                s = f"returns {first(self.value, 90)}" if self.value is not None else "returns"
            else:
                s = f"raises {type(self.exc).__name__}: {first(self.exc)}"
        elif self.exc is not None:
            s = f"traceback ({type(self.exc).__name__}: {first(self.exc)})"
        else:
            lines = [x for x in self.err.splitlines() if x.strip()]
            s = f"exit {self.rc}"
            if lines:
                s += f", {len(lines)} stderr line{'s' * (len(lines) > 1)}: `{first(lines[-1])}`"
        return s + (f"; {self.note}" if self.note else "")


def cli(main, argv) -> Outcome:
    """Run ``main(argv)`` as a command would run: status, stdout, stderr; an escaping exception is kept."""
    o = Outcome()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            o.rc = int(main([str(a) for a in argv]) or 0)
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
                o.rc = 1
            else:
                o.rc = int(e.code or 0)
        except Exception as e:  # noqa: BLE001 - this is what the test is about
            o.exc, o.rc = e, 1
    o.out, o.err = out.getvalue(), err.getvalue()
    return o


def api(fn) -> Outcome:
    o = Outcome()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            o.value = fn()
        if caught:
            o.note = "warns: " + "; ".join(str(w.message) for w in caught)[:200]
    except Exception as e:  # noqa: BLE001
        o.exc = e
    return o


def sh(args, *, env=None, timeout=120) -> Outcome:
    """A real subprocess with the project's interpreter."""
    o = Outcome()
    full_env = {**os.environ, "TQDM_DISABLE": "1", "JAX_PLATFORMS": "cpu", **(env or {})}
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=full_env, capture_output=True, text=True,
                       timeout=timeout)
    o.rc, o.out, o.err = p.returncode, p.stdout, p.stderr
    return o


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _hub_offline(repo_id, filename, **kw):
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                  "find the requested files in the local cache. Please check your connection "
                                  "and try again or make sure your Internet connection is on.")


def _hub_missing_repo(repo_id, filename, **kw):
    from huggingface_hub.errors import RepositoryNotFoundError

    response = types.SimpleNamespace(headers={}, request=None)
    raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/"
                                  f"{repo_id}/resolve/main/{filename}.", response=response)


# ------------------------------------------------------------------ the workspace
TEMP_NAME = re.compile(r"\.tmp-|\.old-|\.tmp$|orbax-checkpoint-tmp")


class Workspace:
    """A case's folder: user files made by the case, the frozen state, and the shared models."""

    def __init__(self, root: Path, assets: dict):
        self.root, self.a = Path(root), assets
        self.frozen: dict[str, str] = {}
        self.allowed: tuple[str, ...] = ()  # outputs of an earlier run that this case may replace

    def path(self, rel) -> Path:
        return self.root / rel

    def photos(self, folder="photos", names=("photo.png",), size=(48, 40)) -> Path:
        d = self.root / folder
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(names))
        for n in names:
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(d / n)
        return d

    def text(self, rel, content="my notes\n") -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        return p

    def _files(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file()}

    def freeze(self) -> None:
        self.frozen = self._files()

    def changes(self, allowed=None) -> tuple[list[str], list[str]]:
        """(user files lost or changed since ``freeze``, temporary files left anywhere)."""
        allowed = self.allowed if allowed is None else allowed
        now = self._files()
        lost = [f for f, h in self.frozen.items() if now.get(f) != h and not f.startswith(tuple(allowed))]
        temps = [str(p.relative_to(self.root)) for p in self.root.rglob("*") if TEMP_NAME.search(p.name)]
        return lost, temps

    def describe_changes(self) -> str:
        lost, temps = self.changes()
        parts = []
        if lost:
            parts.append("lost/changed: " + ", ".join(lost[:4]) + (" ..." if len(lost) > 4 else ""))
        if temps:
            parts.append("left: " + ", ".join(temps[:3]))
        return "; ".join(parts)

    def assert_intact(self, allowed=None) -> None:
        lost, temps = self.changes(allowed)
        assert not lost, f"files lost or changed: {lost}"
        assert not temps, f"temporary files left: {temps}"


def expect_cli_error(o: Outcome, pattern: str, *, usage: bool = False) -> None:
    """The command failed with one line on stderr (argparse: its usage, then one line) matching ``pattern``."""
    assert o.exc is None, f"a traceback: {type(o.exc).__name__}: {o.exc}"
    assert o.rc not in (0, None), f"exit {o.rc}; stderr {o.err!r}"
    lines = [x for x in o.err.splitlines() if x.strip() and not x.startswith("mamba-jax: warning")]
    assert lines and "Traceback" not in o.err, o.err
    if not usage:
        assert len(lines) == 1, f"more than one line on stderr: {o.err!r}"
    assert re.search(pattern, lines[-1], re.I), f"{lines[-1]!r} does not match {pattern!r}"


def expect_api_error(o: Outcome, exc_type, pattern: str) -> None:
    assert o.exc is not None, f"no error; returned {o.value!r:.200}"
    assert isinstance(o.exc, exc_type), f"{type(o.exc).__name__}: {o.exc}"
    assert re.search(pattern, str(o.exc), re.I | re.S), f"{str(o.exc)!r} does not match {pattern!r}"


def expect_ok(o: Outcome) -> None:
    assert o.exc is None, f"{type(o.exc).__name__}: {o.exc}"
    assert o.rc in (0, None), f"exit {o.rc}: {o.err}"


# ------------------------------------------------------------------ the cases
CASES: dict[str, tuple[str, object]] = {}


def case(cid: str, text: str):
    """A case is a generator: set up, ``freeze``, act, ``yield`` the outcome, then assert."""
    def deco(fn):
        assert cid not in CASES
        CASES[cid] = (text, fn)
        return fn
    return deco


def explain_cli(ws, *args, ckpt=None) -> Outcome:
    return cli(xai_main, ["explain", "--checkpoint", ckpt or ws.a["tiny32"], *FAST, *args])


# --- explain: outputs never touch inputs or unrelated files
@case("E01", "`mamba-jax explain photos --out photos` (the input folder)")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    yield explain_cli(ws, photos, "--out", photos)
    expect_cli_error(yield_last(), "holds (the )?input")


@case("E02", "`explain photos/photo.png --out photos` (the folder of an input file)")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    yield explain_cli(ws, photos / "photo.png", "--out", photos)
    expect_cli_error(yield_last(), "holds (the )?input")


@case("E03", "`explain photo --out notes` (a folder of unrelated files)")
def _(ws):
    photos = ws.photos()
    ws.text("notes/photo.png", "my own figure, not an image")
    ws.text("notes/todo.txt")
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("notes"))
    expect_cli_error(yield_last(), "not empty")


@case("E04", "rerun into the same --out (without --overwrite)")
def _(ws):
    photos = ws.photos(names=("a.png", "b.png"))
    expect_ok(explain_cli(ws, photos, "--out", ws.path("out")))
    ws.freeze()
    yield explain_cli(ws, photos / "a.png", "--out", ws.path("out"))
    expect_cli_error(yield_last(), "not empty.*--overwrite")


@case("E05", "rerun into the same --out with --overwrite and fewer images")
def _(ws):
    photos = ws.photos(names=("a.png", "b.png"))
    expect_ok(explain_cli(ws, photos, "--out", ws.path("out")))
    ws.freeze()
    ws.allowed = ("out/",)
    o = explain_cli(ws, photos / "a.png", "--out", ws.path("out"), "--overwrite")
    o.note = "out/ now: " + " ".join(sorted(p.name for p in ws.path("out").iterdir()))
    yield o
    expect_ok(o)
    names = {p.name for p in ws.path("out").iterdir()}
    assert names == {"a.png", "a_raw_attention_exact.npy", "predictions.json", ".mamba-jax-output.json"}, names
    preds = json.loads(ws.path("out/predictions.json").read_text())
    assert [r["image"] for r in preds["images"]] == ["a.png"]


@case("E06", "`--overwrite` into a folder of unrelated files")
def _(ws):
    photos = ws.photos()
    ws.text("notes/todo.txt")
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("notes"), "--overwrite")
    expect_cli_error(yield_last(), "did not write")


@case("E07", "`--out notes.txt/out` (under a file)")
def _(ws):
    photos = ws.photos()
    ws.text("notes.txt")
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("notes.txt/out"))
    expect_cli_error(yield_last(), "notes.txt.*(is a file|not a folder)")


@case("E08", "`--out notes.txt` (an existing file)")
def _(ws):
    photos = ws.photos()
    ws.text("notes.txt")
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("notes.txt"))
    expect_cli_error(yield_last(), "notes.txt.*(is a file|not a folder)")


# --- explain: checkpoints
@case("E09", "explain with a converted checkpoint holding one NaN weight")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    o = explain_cli(ws, photos, "--out", ws.path("out"), ckpt=ws.a["nan32"])
    pj = ws.path("out/predictions.json")
    if pj.exists():
        o.note = "predictions.json holds NaN" if "NaN" in pj.read_text() else "predictions.json written"
    yield o
    expect_cli_error(o, r"head/bias.*(NaN|non-finite)")
    assert not pj.exists()


@case("E10", "explain --checkpoint ckpts/vim_s.pth (mistyped, a suffix)")
def _(ws):
    photos = ws.photos()
    ws.path("ckpts").mkdir()
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("out"), ckpt="ckpts/vim_s.pth")
    expect_cli_error(yield_last(), "no such file.*ckpts/vim_s.pth")


@case("E11", "explain --checkpoint <dir>/vim_s (a mistyped converted folder, one separator)")
def _(ws):
    photos = ws.photos()
    ws.path("models").mkdir()
    calls = []
    ws.freeze()
    with patched(__import__("huggingface_hub"), "hf_hub_download",
                 lambda *a, **k: calls.append(a) or _hub_offline(*a, **k)):
        o = explain_cli(ws, photos, "--out", ws.path("out"), ckpt="models/vim_s")
    o.note = f"hub lookups: {len(calls)}"
    yield o
    expect_cli_error(o, "no such file or folder.*models/vim_s")
    assert calls == []


@case("E12", "explain --checkpoint ./vim_s (a relative path that does not exist)")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("out"), ckpt="./vim_s")
    expect_cli_error(yield_last(), r"no such file.*\./vim_s|no such file.*vim_s")


@case("E13", "explain --checkpoint hustvl/Vim-tiny-midclstok, offline with an empty cache")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    with patched(__import__("huggingface_hub"), "hf_hub_download", _hub_offline):
        yield explain_cli(ws, photos, "--out", ws.path("out"), ckpt=HUB)
    expect_cli_error(yield_last(), "hustvl/Vim-tiny-midclstok.*(offline|HF_HUB_OFFLINE)")


@case("E14", "explain --checkpoint someone/no-such-model:w.pth (no such hub repo)")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    with patched(__import__("huggingface_hub"), "hf_hub_download", _hub_missing_repo):
        yield explain_cli(ws, photos, "--out", ws.path("out"), ckpt="someone/no-such-model:w.pth")
    expect_cli_error(yield_last(), "someone/no-such-model.*not found")


@case("E15", "explain --checkpoint notes.pth (a text file)")
def _(ws):
    photos = ws.photos()
    ws.text("notes.pth")
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("out"), ckpt=ws.path("notes.pth"))
    expect_cli_error(yield_last(), "notes.pth.*not a PyTorch checkpoint")


# --- explain: inputs
@case("E16", "explain a folder of .png, .bmp, .tif, .gif and .txt files")
def _(ws):
    photos = ws.photos(names=("a.png", "b.bmp", "c.tif", "d.gif"))
    ws.text("photos/readme.txt")
    ws.freeze()
    o = explain_cli(ws, photos, "--out", ws.path("out"))
    if ws.path("out").is_dir():
        o.note = "explained: " + " ".join(sorted(p.stem for p in ws.path("out").glob("*.npy")))
    yield o
    expect_ok(o)
    assert sorted(p.name for p in ws.path("out").glob("*.npy")) == [
        "a_raw_attention_exact.npy", "b_raw_attention_exact.npy", "c_raw_attention_exact.npy"]
    assert re.search(r"skipped 2 .*d\.gif.*readme\.txt", o.err), o.err


@case("E17", "explain --batch-size 0")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("out"), "--batch-size", "0")
    expect_cli_error(yield_last(), "--batch-size")


@case("E18", "explain --start-layer 9 (2 layers)")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("out"), "--start-layer", "9")
    expect_cli_error(yield_last(), "--start-layer 9")


@case("E19", "explain --target 7 (5 classes)")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("out"), "--target", "7")
    expect_cli_error(yield_last(), "--target 7")


@case("E20", "explain an empty file named photo.png")
def _(ws):
    ws.text("photos/photo.png", "")
    ws.freeze()
    yield explain_cli(ws, ws.path("photos"), "--out", ws.path("out"))
    expect_cli_error(yield_last(), "cannot read image.*photo.png")


@case("E21", "explain two inputs with the same stem (a/x.png, b/x.jpg)")
def _(ws):
    ws.photos("a", ("x.png",))
    ws.photos("b", ("x.jpg",))
    ws.freeze()
    yield explain_cli(ws, ws.path("a"), ws.path("b"), "--out", ws.path("out"))
    expect_cli_error(yield_last(), "share the name")
    assert not ws.path("out").exists()


@case("E23", "explain where a method's map comes out NaN (finite weights; simulated)")
def _(ws):
    import xai.app.explain_cli as ec

    photos = ws.photos()
    ws.freeze()
    with patched(ec, "explain", lambda config, *a, **k: jnp.full((1, *config.grid), jnp.nan)):
        o = explain_cli(ws, photos, "--out", ws.path("out"))
    if ws.path("out").exists():
        o.note = "out/ holds " + " ".join(sorted(p.name for p in ws.path("out").iterdir()))
    yield o
    expect_cli_error(o, r"raw_attention \(exact\) map is not finite.*photo.png")
    assert not ws.path("out").exists()  # a run that wrote nothing leaves nothing


# --- convert
@case("C01", "`python -m convert vim.pth notes --overwrite` (a folder of notes)")
def _(ws):
    ws.text("notes/todo.txt")
    ws.freeze()
    yield cli(convert_main, [ws.a["tiny224_pth"], ws.path("notes"), "--overwrite"])
    expect_cli_error(yield_last(), "did not write|not a converted")


@case("C02", "convert twice into the same folder, the second time with --overwrite")
def _(ws):
    expect_ok(cli(convert_main, [ws.a["tiny224_pth"], ws.path("conv")]))
    ws.freeze()
    ws.allowed = ("conv/",)
    yield cli(convert_main, [ws.a["tiny224_pth"], ws.path("conv"), "--overwrite"])
    expect_ok(yield_last())


@case("C03", "convert into a folder of notes (no --overwrite)")
def _(ws):
    ws.text("notes/todo.txt")
    ws.freeze()
    yield cli(convert_main, [ws.a["tiny224_pth"], ws.path("notes")])
    expect_cli_error(yield_last(), "not empty|exists")


@case("C04", "convert into an existing empty folder")
def _(ws):
    ws.path("empty").mkdir()
    ws.freeze()
    yield cli(convert_main, [ws.a["tiny224_pth"], ws.path("empty")])
    expect_ok(yield_last())
    assert (ws.path("empty") / "config.json").is_file()


@case("C05", "convert into notes.txt/out (under a file)")
def _(ws):
    ws.text("notes.txt")
    ws.freeze()
    yield cli(convert_main, [ws.a["tiny224_pth"], ws.path("notes.txt/out")])
    expect_cli_error(yield_last(), "notes.txt.*(is a file|not a folder)")


@case("C06", "convert into notes.txt --overwrite (an existing file)")
def _(ws):
    ws.text("notes.txt")
    ws.freeze()
    yield cli(convert_main, [ws.a["tiny224_pth"], ws.path("notes.txt"), "--overwrite"])
    expect_cli_error(yield_last(), "notes.txt.*(is a file|not a folder)")


@case("C07", "convert a checkpoint with one NaN weight")
def _(ws):
    ws.freeze()
    o = cli(convert_main, [ws.a["nan224_pth"], ws.path("out")])
    o.note = "out/ written" if ws.path("out").exists() else ""
    yield o
    expect_cli_error(o, r"head\.bias.*(NaN|non-finite)")
    assert not ws.path("out").exists()


@case("C08", "convert ckpts/vim.pth (missing, a suffix)")
def _(ws):
    ws.freeze()
    yield cli(convert_main, ["ckpts/vim.pth", ws.path("out")])
    expect_cli_error(yield_last(), "no such file.*ckpts/vim.pth")


@case("C09", "convert validate ckpts/vim.pth (missing)")
def _(ws):
    ws.freeze()
    yield cli(convert_main, ["validate", "ckpts/vim.pth"])
    expect_cli_error(yield_last(), "no such file.*ckpts/vim.pth")


@case("C10", "convert validate hustvl/Vim-tiny-midclstok, offline")
def _(ws):
    ws.freeze()
    with patched(__import__("huggingface_hub"), "hf_hub_download", _hub_offline):
        yield cli(convert_main, ["validate", HUB])
    expect_cli_error(yield_last(), "hustvl/Vim-tiny-midclstok.*(offline|HF_HUB_OFFLINE)")


@case("C11", "convert validate vim.pth --json notes.txt/report.json (under a file)")
def _(ws):
    ws.text("notes.txt")
    ws.freeze()
    calls = []
    import convert.validate as cv

    real = cv.validate
    with patched(cv, "validate", lambda *a, **k: calls.append(1) or real(*a, **k)):
        o = cli(convert_main, ["validate", ws.a["tiny224_pth"], "--json", ws.path("notes.txt/report.json")])
    o.note = "validation ran first" if calls else "validation not run"
    yield o
    expect_cli_error(o, "notes.txt.*(is a file|not a folder)")
    assert not calls


@case("C12", "convert validate notes.pth (a text file)")
def _(ws):
    ws.text("notes.pth")
    ws.freeze()
    yield cli(convert_main, ["validate", ws.path("notes.pth")])
    expect_cli_error(yield_last(), "not a PyTorch checkpoint")


@case("C13", "convert validate a NaN checkpoint --json report.json")
def _(ws):
    ws.freeze()
    o = cli(convert_main, ["validate", ws.a["nan224_pth"], "--json", ws.path("report.json")])
    if ws.path("report.json").exists():
        o.note = "report.json holds NaN" if "NaN" in ws.path("report.json").read_text() else "report written"
    yield o
    expect_cli_error(o, r"head\.bias.*(NaN|non-finite)")
    assert not ws.path("report.json").exists()


# --- evaluate
def evaluate_cli(ws, *args, ckpt=None) -> Outcome:
    return cli(xai_main, ["evaluate", "--checkpoint", ckpt or ws.a["tiny224_pth"], "--shapes", "2", "--methods",
                          "raw_attention", "--mode", "exact", "--no-progress", *args])


def _spy_evaluate(o_calls):
    from xai.app import evaluate_cli  # the command's own name for evaluate (imported from xai.eval.evaluate)

    real = evaluate_cli.evaluate
    return patched(evaluate_cli, "evaluate", lambda *a, **k: o_calls.append(1) or real(*a, **k))


@case("V01", "`evaluate --out notes.txt/seg` (under a file)")
def _(ws):
    ws.text("notes.txt")
    ws.freeze()
    calls = []
    with _spy_evaluate(calls):
        o = evaluate_cli(ws, "--out", ws.path("notes.txt/seg"))
    o.note = "the evaluation ran first" if calls else "evaluation not run"
    yield o
    expect_cli_error(o, "notes.txt.*(is a file|not a folder)")
    assert not calls


@case("V02", "`evaluate --out notes.txt` (an existing file)")
def _(ws):
    ws.text("notes.txt")
    ws.freeze()
    calls = []
    with _spy_evaluate(calls):
        o = evaluate_cli(ws, "--out", ws.path("notes.txt"))
    o.note = "the evaluation ran first" if calls else "evaluation not run"
    yield o
    expect_cli_error(o, "notes.txt.*(is a file|not a folder)")
    assert not calls


@case("V03", "evaluate a checkpoint with one NaN weight")
def _(ws):
    ws.freeze()
    o = evaluate_cli(ws, "--out", ws.path("out"), ckpt=ws.a["nan224_pth"])
    if "| raw_attention |" in o.out:
        o.note = "printed a results table"
    yield o
    expect_cli_error(o, r"head\.bias.*(NaN|non-finite)")
    assert not ws.path("out").exists()


@case("V04", "evaluate twice into the same --out (without --overwrite)")
def _(ws):
    # the earlier run's results, as evaluate writes them (a real run costs a compile of every test)
    for name in ("results.json", "results.md", "perturbation_curves.png"):
        ws.text(f"out/{name}", "earlier results")
    ws.text("out/.mamba-jax-output.json",
            '{"command": "evaluate"}\nresults.json\nresults.md\nperturbation_curves.png\n')
    ws.freeze()
    calls = []
    with _spy_evaluate(calls):
        o = evaluate_cli(ws, "--out", ws.path("out"))
    yield o
    expect_cli_error(o, "not empty.*--overwrite")
    assert not calls


@case("V05", "evaluate --overwrite into a folder of unrelated files")
def _(ws):
    ws.text("notes/todo.txt")
    ws.freeze()
    yield evaluate_cli(ws, "--out", ws.path("notes"), "--overwrite")
    expect_cli_error(yield_last(), "did not write")


@case("V06", "evaluate --imagenet-seg notes.mat (not an HDF5 file)")
def _(ws):
    ws.text("notes.mat")
    ws.freeze()
    yield cli(xai_main, ["evaluate", "--checkpoint", ws.a["tiny224_pth"], "--imagenet-seg", ws.path("notes.mat"),
                         "--out", ws.path("out")])
    expect_cli_error(yield_last(), "notes.mat")


@case("V07", "evaluate --imagenet-val val --labels labels.txt (a label that is not a number)")
def _(ws):
    ws.photos("val", ("a.png",))
    ws.text("labels.txt", "a.png cat\n")
    ws.freeze()
    yield cli(xai_main, ["evaluate", "--checkpoint", ws.a["tiny224_pth"], "--imagenet-val", ws.path("val"),
                         "--labels", ws.path("labels.txt"), "--out", ws.path("out")])
    expect_cli_error(yield_last(), "labels.txt:1.*not an integer")


@case("V08", "evaluate --imagenet-val val --labels labels.txt --target label (label 50 of 10 classes)")
def _(ws):
    ws.photos("val", ("a.png", "b.png"), size=(224, 224))
    ws.text("labels.txt", "a.png 50\nb.png 1\n")
    ws.freeze()
    o = cli(xai_main, ["evaluate", "--checkpoint", ws.a["tiny224_pth"], "--imagenet-val", ws.path("val"),
                       "--labels", ws.path("labels.txt"), "--target", "label", "--methods", "raw_attention",
                       "--mode", "exact", "--out", ws.path("out"), "--no-progress"])
    yield o
    expect_cli_error(o, "label.*50.*10 classes")
    assert not ws.path("out").exists()


# --- the API
def _demo_images(n=1):
    config, _ = demo_model()
    rng = np.random.default_rng(0)
    return normalize(rng.random((n, config.img_size, config.img_size, 3), dtype=np.float32))


@case("A01", 'xai.explain(..., "mamba_attribution", target=5000)')
def _(ws):
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), _demo_images(), "mamba_attribution", target=5000,
                                             start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "target.*5000.*10 classes")


@case("A02", 'xai.explain(..., "mamba_attribution", target=-1)')
def _(ws):
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), _demo_images(), "mamba_attribution", target=-1,
                                             start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "target.*-1")


@case("A03", 'xai.explain(..., "mamba_attribution", target=[1, 10]) (one class per image, one out of range)')
def _(ws):
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), _demo_images(2), "mamba_attribution",
                                             target=np.array([1, 10]), start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "target.*10")


@case("A04", 'xai.explain(..., "mamba_attribution", target=2.5)')
def _(ws):
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), _demo_images(), "mamba_attribution", target=2.5,
                                             start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "target.*integer")


@case("A05", "xai.explain on uint8 images in 0..255")
def _(ws):
    x = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), x, "raw_attention", start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "uint8.*preprocess|preprocess.*uint8")


@case("A06", "xai.explain on float images in 0..255 (not normalized)")
def _(ws):
    x = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3)).astype(np.float32)
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), x, "raw_attention", start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "255.*normalize|normalize.*255")


@case("A07", "xai.explain on an empty batch [0, 224, 224, 3]")
def _(ws):
    o = api(lambda: xai.explain(*demo_model(), np.zeros((0, 224, 224, 3), np.float32), "raw_attention", start_layer=5))
    yield o
    expect_api_error(o, ValueError, "empty")


@case("A08", "xai.explain on an image with one NaN pixel")
def _(ws):
    x = _demo_images()
    x[0, 5, 5, 1] = np.nan
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), x, "raw_attention", start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "not finite|NaN")


@case("A09", "xai.explain on an image with an inf pixel")
def _(ws):
    x = _demo_images()
    x[0, 0, 0, 0] = np.inf
    o = api(lambda: _nan_summary(xai.explain(*demo_model(), x, "raw_attention", start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "not finite|inf")


@case("A10", "xai.explain(..., start_layer=2.5)")
def _(ws):
    o = api(lambda: xai.explain(*demo_model(), _demo_images(), "raw_attention", start_layer=2.5))
    yield o
    expect_api_error(o, ValueError, "start_layer.*integer")


@case("A11", "xai.explain(..., start_layer=8) on the 8-layer demo model")
def _(ws):
    o = api(lambda: xai.explain(*demo_model(), _demo_images(), "raw_attention", start_layer=8))
    yield o
    expect_api_error(o, ValueError, "start_layer 8")


@case("A12", "xai.explain(*demo_model(), images, 'raw_attention') with the default start_layer")
def _(ws):
    o = api(lambda: np.asarray(xai.explain(*demo_model(), _demo_images(), "raw_attention")).shape)
    yield o
    expect_ok(o)


@case("A13", "xai.explain on NCHW images")
def _(ws):
    o = api(lambda: xai.explain(*demo_model(), np.zeros((1, 3, 224, 224), np.float32), "raw_attention", start_layer=5))
    yield o
    expect_api_error(o, ValueError, "NCHW")


@case("A14", "xai.hidden_attention(..., layers=[1.5])")
def _(ws):
    o = api(lambda: np.asarray(xai.hidden_attention(*demo_model(), _demo_images(), layers=[1.5],
                                                    channels=[0])).shape)
    yield o
    expect_api_error(o, ValueError, "layers.*integer")


@case("A15", "xai.hidden_attention(..., channels=[])")
def _(ws):
    o = api(lambda: np.asarray(xai.hidden_attention(*demo_model(), _demo_images(), layers=[1], channels=[])).shape)
    yield o
    expect_api_error(o, ValueError, "channels.*empty")


@case("A16", "xai.hidden_attention(..., channels=[192]) (192 channels)")
def _(ws):
    o = api(lambda: xai.hidden_attention(*demo_model(), _demo_images(), layers=[1], channels=[192]))
    yield o
    expect_api_error(o, ValueError, "channels.*192")


@case("A17", "xai.hidden_attention on uint8 images")
def _(ws):
    x = np.full((1, 224, 224, 3), 128, np.uint8)
    o = api(lambda: np.asarray(xai.hidden_attention(*demo_model(), x, layers=[1], channels=[0])).shape)
    yield o
    expect_api_error(o, ValueError, "uint8")


@case("A18", "xai.class_token_attention on an image with a NaN pixel")
def _(ws):
    x = _demo_images()
    x[0, 1, 1, 0] = np.nan
    o = api(lambda: _nan_summary(xai.class_token_attention(*demo_model(), x, layers=[7])))
    yield o
    expect_api_error(o, ValueError, "not finite|NaN")


@case("A19", "xai.channel_mean_attention(..., layers=[8]) (8 layers)")
def _(ws):
    o = api(lambda: xai.channel_mean_attention(*demo_model(), _demo_images(), layers=[8]))
    yield o
    expect_api_error(o, ValueError, "layers.*8")


@case("A20", "xai.distributed.explain_sharded(..., target=5000)")
def _(ws):
    from xai.distributed import explain_sharded

    o = api(lambda: _nan_summary(explain_sharded(*demo_model(), _demo_images(), "raw_attention", target=5000,
                                                     start_layer=5)))
    yield o
    expect_api_error(o, ValueError, "target.*5000")


def random_params(config: VimConfig, seed: int = 0) -> dict:
    """Mamba-like random parameters without ``init_params`` (whose compile costs ~10 s a config):
    A = -(1..N), D = 1, unit norms, dt about 0.01, kernels scaled by 1/sqrt(fan-in)."""
    from convert.mapping import param_shapes

    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        names = [str(getattr(k, "key", k)) for k in path]
        name, core = names[-1], shape[1:] if names[0] == "layers" else shape
        if name in ("A_log", "A_b_log"):
            value = np.broadcast_to(np.log(np.arange(1, shape[-1] + 1)), shape)
        elif name in ("D", "D_b", "weight"):
            value = np.ones(shape)
        elif name == "bias":
            value = np.full(shape, np.log(np.expm1(0.01)) if names[-2].startswith("dt_proj") else 0.0)
        elif name == "kernel":
            value = rng.normal(size=shape) / np.sqrt(np.prod(core[:-1]))
        else:  # cls_token, pos_embed
            value = rng.normal(size=shape) * 0.02
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def tiny32_params():
    return random_params(TINY32)


def _tiny_evaluate(images01, labels=None, **kw):
    return ev.evaluate(TINY32, tiny32_params(), [(images01, labels, None)],
                       methods=("raw_attention",), modes=("exact",), tests=("perturbation",), baselines=(),
                       progress=False, **kw)


@case("A21", "xai.eval.evaluate.evaluate on images in 0..255")
def _(ws):
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    o = api(lambda: _tiny_evaluate(x, start_layer=1)["rows"]["raw_attention/exact"]["perturbation"]["positive"]["auc"])
    yield o
    expect_api_error(o, ValueError, r"\[0, 1\]")


@case("A22", "xai.eval.evaluate.evaluate on images with a NaN pixel")
def _(ws):
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    x[1, 3, 3, 0] = np.nan
    o = api(lambda: _tiny_evaluate(x, start_layer=1)["rows"]["raw_attention/exact"]["perturbation"]["positive"]["auc"])
    yield o
    expect_api_error(o, ValueError, "not finite|NaN")


@case("A23", 'xai.eval.evaluate.evaluate(..., target="label") with label 7 of 5 classes')
def _(ws):
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    o = api(lambda: _tiny_evaluate(x, np.array([1, 7]), target="label", start_layer=1)["counts"])
    yield o
    expect_api_error(o, ValueError, "label.*7.*5 classes")


@case("A24", "xai.eval.evaluate.evaluate with the default start_layer (a 2-layer model)")
def _(ws):
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    o = api(lambda: _tiny_evaluate(x)["settings"]["start_layer"])
    yield o
    expect_ok(o)
    assert o.value == 1


@case("A37", "xai.eval.evaluate.write_results of results holding a NaN")
def _(ws):
    results = {"model": {}, "settings": {}, "counts": {}, "top1_accuracy": float("nan"), "steps": [], "rows": {}}
    o = api(lambda: report.write_results(results, ws.path("out")))
    o.note = "results.json: " + (ws.path("out/results.json").read_text()[:60] if ws.path("out/results.json").exists()
                                 else "absent")
    yield o
    expect_api_error(o, ValueError, "top1_accuracy.*not written")
    assert not ws.path("out/results.json").exists()


@case("A38", "xai.eval.evaluate.evaluate where a method's map comes out NaN (simulated)")
def _(ws):
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    nan_maps = lambda images, method, mode, targets: jnp.full((images.shape[0], *TINY32.grid), jnp.nan)  # noqa: E731
    o = api(lambda: _tiny_evaluate(x, start_layer=1, explainer=nan_maps)["rows"]["raw_attention/exact"]["perturbation"])
    yield o
    expect_api_error(o, ValueError, r"non-finite.*raw_attention \(exact\) map")


@case("A25", "load_checkpoint(state dict with a NaN weight)")
def _(ws):
    from convert.checkpoint import load_checkpoint
    from convert.mapping import CheckpointError, params_to_state_dict

    sd = params_to_state_dict(TINY32, tiny32_params())
    sd = {k: np.array(v) for k, v in sd.items()}
    sd["layers.1.mixer.A_log"][0, 0] = np.nan
    o = api(lambda: type(load_checkpoint(sd, variant=TINY32)[1]).__name__)
    yield o
    expect_api_error(o, CheckpointError, r"layers\.1\.mixer\.A_log.*(NaN|non-finite)")


@case("A26", "load_checkpoint(converted folder with a NaN weight)")
def _(ws):
    from convert.checkpoint import load_checkpoint
    from convert.mapping import CheckpointError

    o = api(lambda: type(load_checkpoint(ws.a["nan32"])[1]).__name__)
    yield o
    expect_api_error(o, CheckpointError, r"head/bias.*(NaN|non-finite)")


@case("A27", "load_checkpoint(a .safetensors file with an inf weight)")
def _(ws):
    from convert.checkpoint import load_checkpoint
    from convert.mapping import CheckpointError

    o = api(lambda: type(load_checkpoint(ws.a["inf224_st"])[1]).__name__)
    yield o
    expect_api_error(o, CheckpointError, r"norm_f\.weight.*(inf|non-finite)")


@case("A28", "save_params(notes_folder, ..., overwrite=True) (a folder of notes)")
def _(ws):
    ws.text("notes/todo.txt")
    ws.freeze()
    o = api(lambda: save_params(ws.path("notes"), TINY32, tiny32_params(), overwrite=True))
    yield o
    expect_api_error(o, FileExistsError, "not a converted|did not write")


@case("A29", "vim_apply on uint8 images")
def _(ws):
    config, params = demo_model()
    o = api(lambda: np.asarray(vim_apply(config, params, np.zeros((1, 224, 224, 3), np.uint8))).shape)
    yield o
    expect_api_error(o, ValueError, "uint8")


@case("A30", "vim_apply on an empty batch")
def _(ws):
    config, params = demo_model()
    o = api(lambda: np.asarray(vim_apply(config, params, np.zeros((0, 224, 224, 3), np.float32))).shape)
    yield o
    expect_api_error(o, ValueError, "empty")


@case("A31", "mamba_jax.preprocess on a float array with a NaN")
def _(ws):
    x = np.random.default_rng(0).random((40, 40, 3))
    x[3, 3, 0] = np.nan
    o = api(lambda: float(np.abs(preprocess(x)).max()))
    yield o
    expect_api_error(o, ValueError, "not finite|NaN")


@case("A32", "mamba_jax.preprocess on a uint16 array (16-bit image)")
def _(ws):
    x = np.full((40, 40, 3), 30000, np.uint16)
    o = api(lambda: float(np.abs(preprocess(x)).max()))
    yield o
    expect_api_error(o, ValueError, "uint16")


@case("A33", "mamba_jax.normalize on uint8 images")
def _(ws):
    o = api(lambda: float(np.abs(normalize(np.full((1, 4, 4, 3), 200, np.uint8))).max()))
    yield o
    expect_api_error(o, ValueError, "uint8")


@case("A34", "xai.eval.data.ImageNetVal on a flat folder with a .txt and a .gif beside the images")
def _(ws):
    from xai.eval.data import ImageNetVal

    ws.photos("val", ("a.png", "b.jpg", "c.gif"))
    ws.text("val/readme.txt")
    o = api(lambda: len(ImageNetVal(ws.path("val"))))
    yield o
    expect_ok(o)
    assert o.value == 2 and re.search(r"skipped 2 .*c\.gif.*readme\.txt", o.note), o.note


@case("A35", "load_checkpoint('ckpts/vim.pth') (missing)")
def _(ws):
    from convert.checkpoint import load_checkpoint

    o = api(lambda: load_checkpoint("ckpts/vim.pth"))
    yield o
    expect_api_error(o, FileNotFoundError, "no such file.*ckpts/vim.pth")


@case("A36", "xai.explain on bool images")
def _(ws):
    o = api(lambda: xai.explain(*demo_model(), np.zeros((1, 224, 224, 3), bool), "raw_attention", start_layer=5))
    yield o
    expect_api_error(o, ValueError, "bool")


# --- real subprocesses
@case("S01", "`python -m xai explain photos --checkpoint hustvl/Vim-tiny-midclstok` with HF_HUB_OFFLINE=1")
def _(ws):
    photos = ws.photos()
    ws.freeze()
    o = sh(["-m", "xai", "explain", photos, "--checkpoint", HUB, "--out", ws.path("out")],
           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(ws.path("hf"))})
    o.note = f"{len(o.err.splitlines())} stderr lines"
    yield o
    expect_cli_error(o, "hustvl/Vim-tiny-midclstok.*(offline|HF_HUB_OFFLINE)")
    assert not ws.path("out").exists()


@case("C14", "`python -m convert validate missing.pth --debug` (the traceback on request)")
def _(ws):
    ws.freeze()
    o = cli(convert_main, ["validate", ws.path("missing.pth"), "--debug"])
    yield o
    assert isinstance(o.exc, FileNotFoundError) and "missing.pth" in str(o.exc)  # escapes: a traceback


@case("E22", "`mamba-jax explain ... --debug` with a damaged checkpoint (the traceback on request)")
def _(ws):
    photos = ws.photos()
    ws.text("notes.pth")
    ws.freeze()
    yield explain_cli(ws, photos, "--out", ws.path("out"), "--debug", ckpt=ws.path("notes.pth"))
    assert type(yield_last().exc).__name__ == "CheckpointError"


_SIGINT_SCRIPT = r"""
import asyncio, sys
import orbax.checkpoint as ocp
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as handler
real_metadata = handler.BasePyTreeCheckpointHandler._write_metadata_after_commits
async def slow_metadata(self, *a, **k):  # a slow disk: orbax's background writer is still at work
    await asyncio.sleep(0.5)
    return await real_metadata(self, *a, **k)
handler.BasePyTreeCheckpointHandler._write_metadata_after_commits = slow_metadata
real_wait = ocp.StandardCheckpointer.wait_until_finished
def wait(self, *a, **k):
    print("SAVING", flush=True)  # the parent interrupts now, while the main thread waits for the writer
    return real_wait(self, *a, **k)
ocp.StandardCheckpointer.wait_until_finished = wait
from convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@case("S03", "SIGINT during `python -m convert vim.pth out`")
def _(ws):
    ws.freeze()
    env = {**os.environ, "TQDM_DISABLE": "1", "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen([sys.executable, "-c", _SIGINT_SCRIPT, ws.a["tiny224_pth"], ws.path("out")], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if "SAVING" in line:
        p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    time.sleep(0.5)  # any background writer left behind would show up now
    o = Outcome()
    o.rc, o.out, o.err = p.returncode, line + out, err
    o.note = (f"{len(err.splitlines())} stderr lines; " + ws.describe_changes()).strip("; ")
    yield o
    assert "SAVING" in line
    assert o.rc == 130 and not ws.path("out").exists()
    expect_cli_error(o, "interrupted", usage=True)  # "finishing the current write", then "interrupted"
    assert len(o.err.splitlines()) <= 2, o.err


def _nan_summary(maps):
    m = np.asarray(maps)
    return f"shape {m.shape}, {int(np.isnan(m).sum())} of {m.size} NaN"


# The value a case yielded, for the assertions after its ``yield`` (set by ``run_case``).
_LAST: list[Outcome] = []


def yield_last() -> Outcome:
    return _LAST[-1]


def run_case(cid: str, ws: Workspace, *, check: bool = True) -> Outcome:
    _, fn = CASES[cid]
    gen = fn(ws)
    outcome = next(gen)
    _LAST.append(outcome)
    if check:
        for _ in gen:
            pass
        ws.assert_intact()
    else:
        gen.close()
    return outcome


# ------------------------------------------------------------------ shared models
def make_assets(root: Path) -> dict:
    """Tiny checkpoints, made once: good and damaged (one NaN / inf weight)."""
    import torch  # noqa: F401  (export needs it)
    from safetensors.numpy import save_file

    from convert.mapping import params_to_state_dict

    root.mkdir(parents=True, exist_ok=True)
    p32 = tiny32_params()
    p224 = random_params(TINY224)
    a = {"tiny32": save_params(root / "tiny32", TINY32, p32),
         "tiny224_pth": export_state_dict(TINY224, p224, root / "tiny224.pth")}
    nan32 = jax.tree_util.tree_map(lambda x: x, p32)
    nan32["head"]["bias"] = nan32["head"]["bias"].at[0].set(jnp.nan)
    a["nan32"] = save_params(root / "nan32", TINY32, nan32)
    nan224 = jax.tree_util.tree_map(lambda x: x, p224)
    nan224["head"]["bias"] = nan224["head"]["bias"].at[0].set(jnp.nan)
    a["nan224_pth"] = export_state_dict(TINY224, nan224, root / "nan224.pth")
    sd = {k: np.array(v) for k, v in params_to_state_dict(TINY224, p224).items()}
    sd["norm_f.weight"][2] = np.inf
    save_file(sd, str(root / "inf224.safetensors"))
    a["inf224_st"] = root / "inf224.safetensors"
    return {k: str(v) for k, v in a.items()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.mark.parametrize("cid", list(CASES))
def test_case(cid, assets, tmp_path):
    ws_root = tmp_path / "ws"
    ws_root.mkdir()
    cwd = os.getcwd()
    os.chdir(ws_root)  # relative paths of the cases ("ckpts/vim.pth", "./vim_s") land here
    try:
        run_case(cid, Workspace(ws_root, assets))
    finally:
        os.chdir(cwd)


def test_default_start_layer_is_the_scaled_official_one():
    """Task A: start_layer=None (the default) is default_start_layer(config): 5 of the demo's 8 layers."""
    config, params = demo_model()
    x = _demo_images()
    np.testing.assert_array_equal(np.asarray(xai.explain(config, params, x, "raw_attention")),
                                  np.asarray(xai.explain(config, params, x, "raw_attention", start_layer=5)))


def test_at_least_forty_cases():
    assert len(CASES) >= 40


# ------------------------------------------------------------------ the case table
def probe(only=None) -> dict[str, str]:
    """Run every case without asserting; return {case id: what happened}."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        assets = make_assets(Path(tmp) / "assets")
        for cid in CASES:
            if only and cid not in only:
                continue
            ws_root = Path(tmp) / cid
            ws_root.mkdir()
            os.chdir(ws_root)
            ws = Workspace(ws_root, assets)
            t0 = time.time()
            try:
                o = run_case(cid, ws, check=False)
                text = o.summary()
                changes = ws.describe_changes()
                if changes and changes not in text:
                    text += f"; {changes}"
            except Exception as e:  # noqa: BLE001
                text = f"(case setup failed: {type(e).__name__}: {e})"
            os.chdir(ROOT)
            results[cid] = text
            print(f"{cid} ({time.time() - t0:.1f}s): {text}", flush=True)
            shutil.rmtree(ws_root, ignore_errors=True)
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="print what every reliability case does now")
    ap.add_argument("--json", help="also write {case: outcome} here")
    ap.add_argument("cases", nargs="*")
    args = ap.parse_args()
    res = probe(set(args.cases) or None)
    if args.json:
        Path(args.json).write_text(json.dumps({k: [CASES[k][0], v] for k, v in res.items()}, indent=1))
