"""The data loaders of xai/eval/data.py on small files written in the real formats: the
ImageNet class-folder and flat layouts (labels files, wnid subsets, errors), the segmentation
.mat file, and load_image01 as exactly the transform of mamba_jax.preprocess (whose geometry
and values test_preprocess.py checks).

Tolerances: none; every comparison is exact (assert_array_equal or ==).
"""

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from mamba_jax.preprocess import to_unit
from xai.eval import data


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_load_image01_is_the_preprocess_transform(tmp_path):
    img = _rgb(200, 301)
    Image.fromarray(img).save(tmp_path / "x.png")
    got = data.load_image01(tmp_path / "x.png")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, to_unit(tmp_path / "x.png"))
    np.testing.assert_array_equal(data.load_image01(Image.fromarray(img), size=64), to_unit(img, 64))


# --------------------------------------------------------------------------- ImageNet folder


def _write_tree(root, classes, per_class=2):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(_rgb(40 + k, 50, seed=10 * c + k)).save(root / name / f"img{k}.JPEG")


def test_class_folder_layout(tmp_path):
    _write_tree(tmp_path, ["dog", "cat", "bird"])
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = data.ImageNetVal(tmp_path)
    assert ds.classes == ["bird", "cat", "dog"]
    assert len(ds) == 6
    assert [lb for _, lb in ds.samples] == [0, 0, 1, 1, 2, 2]
    assert Path(ds.samples[2][0]).parts[-2:] == ("cat", "img0.JPEG")
    batches = list(ds.batches(4, progress=False))
    assert [b[0].shape for b in batches] == [(4, 224, 224, 3), (2, 224, 224, 3)]
    assert batches[0][1].dtype == np.int32 and batches[1][1].tolist() == [2, 2]
    assert batches[1][2] == [p for p, _ in ds.samples[4:]]
    np.testing.assert_array_equal(batches[0][0][2], data.load_image01(ds.samples[2][0]))
    image, label, path = ds[5]
    assert label == 2 and image.shape == (224, 224, 3)
    sub = list(ds.batches(2, progress=False, start=1, limit=3))
    assert [len(b[1]) for b in sub] == [2, 1] and sub[0][2][0] == ds.samples[1][0]


def test_wnid_subset_warns_and_class_names(tmp_path):
    _write_tree(tmp_path, ["n01443537", "n01440764"], per_class=1)
    with pytest.warns(UserWarning, match="not 1000"):
        ds = data.ImageNetVal(tmp_path)
    assert [lb for _, lb in ds.samples] == [0, 1]
    names = ["n01440764", "n01443537", "n01484850"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = data.ImageNetVal(tmp_path, class_names=names[::-1])
    assert [lb for _, lb in ds.samples] == [2, 1]  # folders sorted, indices from the list
    with pytest.raises(ValueError, match="not in class_names"):
        data.ImageNetVal(tmp_path, class_names=["n01484850"])


def test_flat_folder_with_labels(tmp_path):
    for name in ["b.JPEG", "a.JPEG", "c.png"]:
        Image.fromarray(_rgb(30, 30)).save(tmp_path / name)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# filename label\nc.png 7\na.JPEG 3\n\n")
    ds = data.ImageNetVal(tmp_path, pairs)
    assert [(Path(p).name, lb) for p, lb in ds.samples] == [("c.png", 7), ("a.JPEG", 3)]
    plain = tmp_path / "plain.txt"
    plain.write_text("5\n6\n9\n")
    ds = data.ImageNetVal(tmp_path, plain)  # sorted filenames: a, b, c
    assert [(Path(p).name, lb) for p, lb in ds.samples] == [("a.JPEG", 5), ("b.JPEG", 6), ("c.png", 9)]
    images, labels, paths = next(ds.batches(8, progress=False))
    assert images.shape == (3, 224, 224, 3) and labels.tolist() == [5, 6, 9]
    unlabeled = data.ImageNetVal(tmp_path)
    assert [lb for _, lb in unlabeled.samples] == [-1, -1, -1]

    (tmp_path / "short.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="2 labels but"):
        data.ImageNetVal(tmp_path, tmp_path / "short.txt")
    (tmp_path / "missing.txt").write_text("a.JPEG 1\nzzz.JPEG 2\n")
    with pytest.raises(FileNotFoundError, match="zzz.JPEG"):
        data.ImageNetVal(tmp_path, tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a.JPEG dog\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        data.ImageNetVal(tmp_path, tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="labels file"):
        data.ImageNetVal(tmp_path, tmp_path / "nope.txt")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.ImageNetVal(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.ImageNetVal(tmp_path / "empty")
    (tmp_path / "tree" / "cls_a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="cls_a"):
        data.ImageNetVal(tmp_path / "tree")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.JPEG").write_bytes(b"this is not a jpeg")
    ds = data.ImageNetVal(broken)
    with pytest.raises(OSError, match="bad.JPEG"):
        next(ds.batches(1, progress=False))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        data.load_image01(tmp_path / "gone.png")


# --------------------------------------------------------------------------- gtsegs_ijcv.mat


def _write_gtsegs(path, images, masks):
    """A gtsegs_ijcv.mat look-alike: MATLAB v7.3 cell arrays of object references."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        img_refs = value.create_dataset("img", (len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = value.create_dataset("gt", (len(images), 1), dtype=h5py.ref_dtype)
        for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0)).ref
            target = refs.create_dataset(f"mask{i}", data=mask.T.astype(np.uint8))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = target.ref
            gt_refs[i, 0] = cell.ref


@pytest.fixture
def gtsegs(tmp_path):
    rng = np.random.default_rng(0)
    images = [_rgb(20, 30, seed=1), _rgb(37, 25, seed=2), _rgb(224, 224, seed=3)]
    masks = [rng.random(im.shape[:2]) < 0.4 for im in images]
    path = tmp_path / "gtsegs_ijcv.mat"
    _write_gtsegs(path, images, masks)
    return path, images, masks


def test_segmentation_file(gtsegs):
    path, images, masks = gtsegs
    with data.ImagenetSegmentation(path) as ds:
        assert len(ds) == 3
        for i in range(3):
            img, mask = ds.raw(i)
            np.testing.assert_array_equal(img, images[i])  # [H, W, 3], not transposed
            np.testing.assert_array_equal(mask, masks[i])
        image01, mask = ds[1]
        want = np.asarray(Image.fromarray(images[1]).resize((224, 224), Image.BILINEAR))
        np.testing.assert_array_equal(image01, want.astype(np.float32) / np.float32(255))
        want_mask = np.asarray(Image.fromarray(masks[1].astype(np.uint8)).resize((224, 224), Image.NEAREST))
        np.testing.assert_array_equal(mask, want_mask > 0)
        assert mask.dtype == bool
        # Same size: the mask is unchanged.
        np.testing.assert_array_equal(ds[2][1], masks[2])
        np.testing.assert_array_equal(ds[-1][1], masks[2])
        with pytest.raises(IndexError):
            ds[3]
        batches = list(ds.batches(2, progress=False))
        assert [b[0].shape for b in batches] == [(2, 224, 224, 3), (1, 224, 224, 3)]
        assert batches[0][1].shape == (2, 224, 224) and batches[0][1].dtype == bool
        np.testing.assert_array_equal(batches[1][1][0], masks[2])


def test_segmentation_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.mat"):
        data.ImagenetSegmentation(tmp_path / "absent.mat")
    other = tmp_path / "other.mat"
    with h5py.File(other, "w") as f:
        f.create_group("value").create_dataset("img", data=np.zeros((1, 1)))
    with pytest.raises(KeyError, match="value/gt"):
        data.ImagenetSegmentation(other)
    not_hdf5 = tmp_path / "v5.mat"
    not_hdf5.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(OSError, match="v5.mat"):
        data.ImagenetSegmentation(not_hdf5)


# --------------------------------------------------------------------------- prefetch


def test_prefetch_order_errors_and_early_close():
    import threading

    from xai.eval.data import prefetch

    for depth in (0, 1, 3):
        assert list(prefetch(range(7), depth, transform=lambda i: i * i)) == [i * i for i in range(7)]

    def failing():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(failing(), 2):
            got.append(item)
    assert got == [1]  # the items before the failure, then the failure itself

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    ahead = prefetch(endless(), 2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()  # stops the thread, which closes the source
    assert closed.wait(5)
    with pytest.raises(ValueError):
        list(prefetch([], -1))
