"""Data loaders for the evaluation protocols (SPEC section 5).

- ``load_image01``: the official evaluation transform without normalization
  (shorter side to ``size`` with PIL bilinear, longer side
  ``int(size * long / short)``, centre crop with top-left corner
  ``(round((h - size) / 2), round((w - size) / 2))`` using Python's ``round``,
  then ``/ 255``), i.e. torchvision ``Resize(size)``, ``CenterCrop(size)``,
  ``ToTensor()`` on a PIL image, in NHWC.
- ``ImageNetVal``: an ImageNet validation folder, either one sub-folder per class
  (sorted folder names give class indices 0..999, as torchvision's
  ``ImageFolder``) or a flat folder plus a labels text file.
- ``ImagenetSegmentation``: ImageNet-Segmentation ``gtsegs_ijcv.mat`` (HDF5 /
  MATLAB v7.3), images resized to ``size x size`` (PIL bilinear, no crop) and
  masks with PIL nearest neighbour.
- ``prefetch``: runs any batch iterator a few batches ahead in a background thread, so
  that decoding (and the copy to the device) overlaps the evaluation of earlier batches.

Every batch iterator yields host (numpy) arrays of images in [0, 1]; the model's
normalization is ``normalize``. ``h5py`` is imported only by
``ImagenetSegmentation``.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from einops import rearrange, repeat
from PIL import Image
from tqdm import tqdm

from mamba_jax.preprocess import (  # noqa: F401  (re-exported: the data tools' one transform)
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_box,
    normalize,
    resized_size,
    to_pil,
    to_unit,
)

# Extensions torchvision's ImageFolder accepts (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_WNID = re.compile(r"n\d{8}")


# ---------------------------------------------------------------------------
# The official evaluation transform lives in mamba_jax.preprocess (imported above).


def load_image01(path_or_pil, size: int = 224) -> np.ndarray:
    """The official evaluation transform without normalization: float32 [size, size, 3]."""
    return to_unit(path_or_pil, size)


def resize_square01(path_or_pil, size: int = 224) -> np.ndarray:
    """Resize to ``size x size`` with PIL bilinear (no crop), float32 [size, size, 3]."""
    image = path_or_pil if isinstance(path_or_pil, Image.Image) else to_pil(path_or_pil)
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / np.float32(255.0)


# ---------------------------------------------------------------------------
# Prefetching.

_DONE = object()


def prefetch(items: Iterable, depth: int = 2, transform: Callable | None = None) -> Iterator:
    """Yields ``items`` (each passed through ``transform``, if given) in order, produced up to
    ``depth`` items ahead by a background thread; ``depth`` 0 is the plain iterator.

    An exception raised by the iterator or ``transform`` is raised here, at the item where it
    happened. Closing the generator early (a ``break``, an error in the consumer) stops the
    thread after the item it is producing. Decoding with PIL and copies to a JAX device release
    the interpreter lock, so they run while the consumer waits on the device.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    transform = transform or (lambda item: item)
    if depth == 0:
        yield from map(transform, items)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    source = iter(items)

    def produce():
        try:
            for item in source:
                if not put((True, transform(item))):
                    return
            put((True, _DONE))
        except BaseException as err:  # handed to the consumer, raised there
            put((False, err))
        finally:
            close = getattr(source, "close", None)
            if close is not None:  # a generator's cleanup (its open files, its pools) runs here
                close()

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, entry = ready.get()
            if not ok:
                raise entry
            if entry is _DONE:
                return
            yield entry
    finally:
        stop.set()
        worker.join()


# ---------------------------------------------------------------------------
# ImageNet validation folder.


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _warn_skipped(folder, names) -> None:
    """Say which files a folder scan leaves out (hidden files excepted): none is skipped silently."""
    skipped = sorted(n for n in names if not _is_image(n) and not n.startswith("."))
    if skipped:
        shown = ", ".join(skipped[:6]) + (f" and {len(skipped) - 6} more" if len(skipped) > 6 else "")
        warnings.warn(f"skipped {len(skipped)} file(s) in {folder} that are not {'/'.join(IMAGE_EXTENSIONS)} "
                      f"images: {shown}", stacklevel=3)


def _parse_labels_file(path: Path) -> list[tuple[str | None, int]]:
    """Lines ``filename label`` or ``label``; blank lines and ``#`` comments skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    entries: list[tuple[str | None, int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        if len(tokens) not in (1, 2):
            raise ValueError(f"{path}:{lineno}: expected 'filename label' or 'label', got {line!r}")
        try:
            label = int(tokens[-1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: label {tokens[-1]!r} is not an integer") from None
        entries.append((tokens[0] if len(tokens) == 2 else None, label))
    if not entries:
        raise ValueError(f"labels file is empty: {path}")
    if len({name is None for name, _ in entries}) > 1:
        raise ValueError(f"{path}: mixes 'filename label' lines with 'label' lines")
    return entries


class ImageNetVal:
    """An ImageNet validation folder as (path, label) samples.

    Layouts:
      - class sub-folders ``root/<wnid>/*.JPEG`` (searched recursively, files
        sorted): the class index is the folder's position among the sorted
        sub-folder names (torchvision ``ImageFolder``), or its position in
        ``class_names`` when given. With only a subset of the 1000 folders the
        sorted positions are not the ImageNet indices: pass the full sorted wnid
        list as ``class_names`` (a warning is given otherwise).
      - a flat folder of images plus ``labels_file``: lines ``filename label``
        (filenames relative to ``root``), or one ``label`` per line in sorted
        filename order. Labels are taken as given: 0-based indices in the
        model's (sorted-wnid) class order, which is NOT the order of the devkit's
        1-based ``ILSVRC2012_validation_ground_truth.txt``.
      - a flat folder without labels file: labels are -1 (unknown).

    Attributes:
      root: the folder.
      samples: list of (path, label), in iteration order.
      classes: sorted class folder names (class-folder layout) or None.
      size: output side of ``load_image01``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        labels_file: str | os.PathLike | None = None,
        *,
        class_names: Sequence[str] | None = None,
        size: int = 224,
    ):
        self.root = Path(root)
        self.size = size
        self.classes: list[str] | None = None
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"not a folder: {self.root}")
        if labels_file is not None:
            self.samples = self._flat_with_labels(Path(labels_file))
            return
        subdirs = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if subdirs:
            self.samples = self._class_folders(subdirs, class_names)
        else:
            files = self._flat_files()
            self.samples = [(p, -1) for p in files]

    def _flat_files(self) -> list[str]:
        names = [e.name for e in os.scandir(self.root) if e.is_file()]
        _warn_skipped(self.root, names)
        files = sorted(n for n in names if _is_image(n))
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {self.root}")
        return [str(self.root / f) for f in files]

    def _flat_with_labels(self, labels_file: Path) -> list[tuple[str, int]]:
        entries = _parse_labels_file(labels_file)
        if entries[0][0] is None:
            files = self._flat_files()
            if len(files) != len(entries):
                raise ValueError(
                    f"{labels_file} has {len(entries)} labels but {self.root} has "
                    f"{len(files)} images (one label per line, sorted filename order)"
                )
            return [(p, lb) for p, (_, lb) in zip(files, entries, strict=True)]
        samples = [(str(self.root / name), lb) for name, lb in entries if name is not None]
        missing = [p for p, _ in samples if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} file(s) listed in {labels_file} not found: {shown}")
        return samples

    def _class_folders(self, subdirs: list[str], class_names: Sequence[str] | None) -> list[tuple[str, int]]:
        self.classes = subdirs
        if class_names is None:
            index = {name: i for i, name in enumerate(subdirs)}
            if len(subdirs) != 1000 and all(_WNID.fullmatch(d) for d in subdirs):
                warnings.warn(
                    f"{self.root} has {len(subdirs)} wnid folders, not 1000: labels are "
                    "positions among these folders, not ImageNet indices; pass "
                    "class_names=<the 1000 sorted wnids> to get ImageNet indices",
                    stacklevel=3,
                )
        else:
            index = {name: i for i, name in enumerate(class_names)}
            unknown = [d for d in subdirs if d not in index]
            if unknown:
                raise ValueError(f"class folders not in class_names: {unknown[:5]}")
        samples: list[tuple[str, int]] = []
        empty = []
        for name in subdirs:
            found = []
            for dirpath, _, fnames in sorted(os.walk(self.root / name, followlinks=True)):
                found += [os.path.join(dirpath, f) for f in sorted(fnames) if _is_image(f)]
                _warn_skipped(dirpath, fnames)
            if not found:
                empty.append(name)
            samples += [(p, index[name]) for p in found]
        if empty:
            raise FileNotFoundError(f"class folder(s) without images in {self.root}: {', '.join(empty[:5])}")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, str]:
        path, label = self.samples[i]
        return load_image01(path, self.size), label, path

    def batches(
        self,
        batch_size: int,
        *,
        progress: bool = True,
        start: int = 0,
        limit: int | None = None,
        num_workers: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Yields (images01 float32 [B, size, size, 3], labels int32 [B], paths).

        Samples ``start`` .. ``start + limit`` (all when ``limit`` is None), in
        order; the last batch may be smaller. Images are decoded by
        ``num_workers`` threads (default: min(8, cpu count)).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = len(self) if limit is None else min(len(self), start + limit)
        samples = self.samples[start:stop]
        workers = num_workers or min(8, os.cpu_count() or 1)
        with (
            ThreadPoolExecutor(workers) as pool,
            tqdm(total=len(samples), unit="img", disable=not progress) as bar,
        ):
            for b in range(0, len(samples), batch_size):
                chunk = samples[b : b + batch_size]
                paths = [p for p, _ in chunk]
                images = list(pool.map(lambda p: load_image01(p, self.size), paths))
                bar.update(len(chunk))
                yield (
                    np.stack(images),
                    np.asarray([lb for _, lb in chunk], np.int32),
                    paths,
                )


# ---------------------------------------------------------------------------
# ImageNet-Segmentation (gtsegs_ijcv.mat).


class ImagenetSegmentation:
    """ImageNet-Segmentation ``gtsegs_ijcv.mat`` (HDF5 / MATLAB v7.3).

    ``value/img`` is [n, 1] of object references, each to a uint8 image stored
    transposed ([3, W, H] -> transpose (2, 1, 0) gives [H, W, 3]); ``value/gt``
    is [n, 1] of references, each to a [1, 1] array of references whose target
    is the mask stored transposed ([W, H] -> [H, W]). Items are (image01 float32
    [size, size, 3]: PIL bilinear resize, no crop; mask bool [size, size]: PIL
    nearest resize of ``mask != 0``).

    Attributes:
      path: the .mat file.
      size: output side.
    """

    IMG_KEY = "value/img"
    GT_KEY = "value/gt"

    def __init__(self, path: str | os.PathLike, *, size: int = 224):
        import h5py

        self.path = Path(path)
        self.size = size
        if not self.path.is_file():
            raise FileNotFoundError(f"ImageNet-Segmentation file not found: {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise OSError(f"cannot open {self.path} as an HDF5 (MATLAB v7.3) file: {err}") from err
        for key in (self.IMG_KEY, self.GT_KEY):
            if key not in self._file or not isinstance(self._file[key], h5py.Dataset):
                self._file.close()
                raise KeyError(f"{self.path} has no dataset '{key}' (not a gtsegs_ijcv.mat?)")
        n_img, n_gt = len(self._file[self.IMG_KEY]), len(self._file[self.GT_KEY])
        if n_img != n_gt:
            self._file.close()
            raise ValueError(f"{self.path}: {n_img} images but {n_gt} masks")
        self._n = n_img

    def __len__(self) -> int:
        return self._n

    def _index(self, i: int) -> int:
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"index {i} out of range for {self._n} items")
        return j

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i`` at its stored resolution: (uint8 [H, W, 3], bool [H, W])."""
        f, j = self._file, self._index(i)
        img = np.asarray(f[f[self.IMG_KEY][j, 0]])
        if img.ndim == 2:  # a grey image stored [W, H]
            img = repeat(img, "w h -> h w c", c=3)
        else:
            img = rearrange(img, "c w h -> h w c")
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
        cell = f[f[self.GT_KEY][j, 0]]
        mask = np.asarray(f[cell[0, 0]]).T != 0
        return np.ascontiguousarray(img.astype(np.uint8)), mask

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img, mask = self.raw(i)
        image01 = resize_square01(Image.fromarray(img), self.size)
        mask_img = Image.fromarray(mask.astype(np.uint8)).resize((self.size, self.size), Image.NEAREST)
        return image01, np.asarray(mask_img) > 0

    def batches(
        self,
        batch_size: int,
        *,
        progress: bool = True,
        start: int = 0,
        limit: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (images01 float32 [B, size, size, 3], masks bool [B, size, size])."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = len(self) if limit is None else min(len(self), start + limit)
        with tqdm(total=max(stop - start, 0), unit="img", disable=not progress) as bar:
            for b in range(start, stop, batch_size):
                items = [self[i] for i in range(b, min(b + batch_size, stop))]
                bar.update(len(items))
                yield np.stack([x for x, _ in items]), np.stack([m for _, m in items])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ImagenetSegmentation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
