"""Image discovery, odd formats, corrupt files, deterministic order and augmentation."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkmim.data import EpochSampler, ImageFiles, list_images, load_image, pretrain_transform


def _rgb(h=40, w=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_folders_are_searched_recursively_and_lists_are_read(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / "deep").mkdir(parents=True)
    _rgb().save(tmp_path / "a.jpg")
    _rgb().save(tmp_path / "cats" / "b.PNG")
    _rgb().save(tmp_path / "dogs" / "deep" / "c.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    found = list_images(tmp_path)
    assert [p.name for p in found] == ["a.jpg", "b.PNG", "c.webp"]
    listing = tmp_path / "list.txt"
    listing.write_text("# training images\ncats/b.PNG\n\n" + str(tmp_path / "a.jpg") + "\n")
    assert list_images(listing) == [tmp_path / "cats" / "b.PNG", tmp_path / "a.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_odd_formats_are_converted(tmp_path):
    gray = Image.fromarray(np.full((20, 30), 77, np.uint8), "L")
    gray.save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (20, 30), (10, 20, 30, 128))
    rgba.save(tmp_path / "rgba.png")
    pal = _rgb().convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png")
    _rgb().convert("CMYK").save(tmp_path / "cmyk.jpg")
    _rgb().save(tmp_path / "img.bmp")
    _rgb().save(tmp_path / "img.tiff")
    _rgb().save(tmp_path / "img.webp")
    arr16 = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(arr16).save(tmp_path / "deep16.png")
    Image.fromarray(arr16).save(tmp_path / "deep16.tiff")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "float.tiff")
    for name in ["gray.png", "rgba.png", "pal.png", "cmyk.jpg", "img.bmp", "img.tiff", "img.webp", "deep16.png",
                 "deep16.tiff", "float.tiff"]:
        for channels, mode in ((3, "RGB"), (1, "L"), (4, "RGBA")):
            im = load_image(tmp_path / name, channels)
            assert im.mode == mode, (name, channels)
    assert np.asarray(load_image(tmp_path / "gray.png", 3))[0, 0].tolist() == [77, 77, 77]
    for name in ("deep16.png", "deep16.tiff"):
        assert np.asarray(load_image(tmp_path / name, 1))[0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(tmp_path / "float.tiff", 1))[0].tolist() == [0, 128, 255]


def test_small_images_are_upscaled_to_the_crop():
    """A 10x12 image becomes a 64x64 crop of its own content: a flat colour stays that colour
    (normalised), and a left/right split keeps its two colours on the two sides (the crop keeps at
    least 67 % of the area, so both halves are in it; a flip only swaps them)."""
    from sparkmim.data import IMAGENET_MEAN, IMAGENET_STD

    tf = pretrain_transform(64)
    out = tf(Image.new("RGB", (12, 10), (200, 100, 50)))
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 64, 64), atol=2e-2, rtol=0)
    split = np.zeros((10, 12, 3), np.uint8)
    split[:, 6:] = 255
    out = tf(Image.fromarray(split)).mean(0)  # (64, 64), dark on one side, bright on the other
    left, right = out[:, :8].mean(), out[:, -8:].mean()
    assert abs(float(left - right)) > 3.0


def test_corrupt_files_are_left_out_of_their_batch_and_reported(tmp_path):
    _rgb(seed=1).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    buf = io.BytesIO()
    _rgb(seed=2).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    ds = ImageFiles(list_images(tmp_path), pretrain_transform(32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading reports, it does not warn (the run announces each file once)
        items = [ds[(0, 0, i)] for i in range(len(ds))]
    # sorted: bad.jpg, good.png, truncated.jpg
    assert [im is None for im, _, _ in items] == [True, False, True]
    assert [p and Path(p[0]).name for _, p, _ in items] == ["bad.jpg", None, "truncated.jpg"]
    assert all("Error" in p[1] for _, p, _ in items if p)  # the reason, one line
    images, bad = ds.collate(items)
    assert images.shape == (1, 3, 32, 32) and torch.equal(images[0], items[1][0])  # no stand-in image
    assert [Path(p).name for p, _ in bad] == ["bad.jpg", "truncated.jpg"]
    # a batch of unreadable files only gets the next readable file, so every step has data
    images, bad = ds.collate([items[2], items[0]])
    assert images.shape == (1, 3, 32, 32) and [Path(p).name for p, _ in bad] == ["truncated.jpg", "bad.jpg"]


def test_bad_files_are_counted_once_each(tmp_path):
    from sparkmim.data import BadFiles

    bad = BadFiles({"a.jpg": "gone"})
    assert bad.merge([("b.jpg", "x"), ("a.jpg", "gone"), ("b.jpg", "x")]) == [("b.jpg", "x")]
    assert len(bad) == 2
    BadFiles.write(tmp_path / "bad_images.txt", [("b.jpg", "x")])
    assert (tmp_path / "bad_images.txt").read_text() == "b.jpg\tx\n"


def test_sampler_order_is_seeded_per_epoch_resumable_and_sharded():
    s = EpochSampler(50, batch_size=4, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert len(e0) == 48 and e0 == list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [k[2] for k in e0] != [k[2] for k in e1]
    s.set_epoch(1, start_batch=5)
    assert list(s) == e1[20:] and len(s) == 28
    ranks = [EpochSampler(50, 4, seed=3, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    a, b = (list(r) for r in ranks)
    assert len(a) == len(b) == 24 and not {k[2] for k in a} & {k[2] for k in b}
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochSampler(3, 4)


def test_augmentation_depends_only_on_the_key(tmp_path):
    _rgb(seed=5).save(tmp_path / "x.png")
    ds = ImageFiles(list_images(tmp_path), pretrain_transform(32))
    a, b, c = ds[(0, 0, 0)][0], ds[(0, 0, 0)][0], ds[(0, 1, 0)][0]
    torch.manual_seed(123)  # the global RNG does not matter
    d = ds[(0, 0, 0)][0]
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


def test_normalisation_statistics_from_the_data(tmp_path):
    from sparkmim.data import compute_stats

    Image.new("RGB", (16, 16), (51, 102, 204)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (153, 102, 0)).save(tmp_path / "b.png")
    mean, std = compute_stats(list_images(tmp_path), 3)
    assert mean == pytest.approx((0.4, 0.4, 0.4), abs=1e-6)
    assert std == pytest.approx((0.2, 0.0, 0.4), abs=1e-4)


def _photo(w, h, seed=0):
    """A smooth synthetic photograph (JPEG-friendly): gradients plus a few soft blobs."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([np.sin(6 * xx + c) * 0.5 + 0.5 * np.cos(4 * yy - c) for c in range(3)], -1)
    for _ in range(5):
        cx, cy, r = g.random(), g.random(), 0.05 + 0.1 * g.random()
        img += 0.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r**2)[..., None] * g.random(3)
    return Image.fromarray((np.clip(img / img.max(), 0, 1) * 255).astype(np.uint8))


def test_fast_decode_reduces_large_jpegs_and_keeps_the_crops(tmp_path):
    """A 12 MP JPEG is decoded at reduced scale (never below what the smallest crop needs) and
    gives nearly the same training crop as the full decode; a small JPEG goes through
    torchvision's decoder and equals Pillow's decode to within JPEG decoder differences."""
    from sparkmim.data import _draft_factor, read_image

    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    _photo(4000, 3000).save(big, quality=92)
    _photo(500, 375).save(small, quality=92)
    assert _draft_factor((4000, 3000), 224, 0.67) == 8
    assert _draft_factor((4000, 3000), 224, 0.08) == 2  # smaller crops allowed: less reduction
    assert _draft_factor((500, 375), 224, 0.67) == 1
    reduced = read_image(big, 3, 224, 0.67)
    assert reduced.size == (500, 375)
    shortest = (0.67 * 500 * 375 * 3 / 4) ** 0.5
    assert shortest >= 224
    tf = pretrain_transform(224)
    full = ImageFiles([big], tf)[(0, 0, 0)][0]
    fast = ImageFiles([big], tf, fast_decode=(224, 0.67))[(0, 0, 0)][0]
    assert full.shape == fast.shape == (3, 224, 224)
    corr = torch.corrcoef(torch.stack([full.flatten(), fast.flatten()]))[0, 1]
    assert corr > 0.99, f"crops from the reduced decode differ: correlation {corr:.4f}"
    t = read_image(small, 3, 224, 0.67)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == (3, 375, 500)
    ref = torch.from_numpy(np.array(load_image(small, 3))).permute(2, 0, 1)
    assert (t.float() - ref.float()).abs().mean() < 1.5
    gray = read_image(small, 1, 224, 0.67)
    assert gray.shape == (1, 375, 500)
    # PNGs and calls without a crop size use the general reader
    _photo(64, 48).save(tmp_path / "p.png")
    assert isinstance(read_image(tmp_path / "p.png", 3, 224, 0.67), Image.Image)
    assert isinstance(read_image(small, 3), Image.Image)
