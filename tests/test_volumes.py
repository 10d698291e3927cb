"""Volume files: readers (NIfTI, .npy, TIFF stacks), their axes, odd and corrupt files, the 3-D
augmentation and its exact repeatability."""

import gzip

import numpy as np
import pytest
import torch

from sparkmim.volumes import (
    VolumeFiles,
    demo_volume_paths,
    list_samples,
    list_volumes,
    parse_intensity,
    read_volume,
    volume_transform,
)

nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("monai")


def _nifti(path, arr):
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def test_readers_give_channels_depth_height_width(tmp_path):
    rng = np.random.default_rng(0)
    ijk = rng.normal(size=(5, 6, 7)).astype(np.float32)  # NIfTI voxel axes (i, j, k)
    vol = read_volume(_nifti(tmp_path / "a.nii.gz", ijk))
    assert vol.shape == (1, 7, 6, 5) and vol.dtype == np.float32
    assert np.array_equal(vol[0], ijk.transpose(2, 1, 0))  # depth = k, height = j, width = i
    dhw = rng.normal(size=(4, 6, 8))
    np.save(tmp_path / "b.npy", dhw)
    assert np.array_equal(read_volume(tmp_path / "b.npy")[0], dhw.astype(np.float32))
    cdhw = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", cdhw)
    assert np.array_equal(read_volume(tmp_path / "c.npy", channels=2), cdhw)
    stack = rng.integers(0, 4000, size=(5, 9, 11), dtype=np.uint16)  # pages, height, width
    tifffile.imwrite(tmp_path / "d.tif", stack)
    assert np.array_equal(read_volume(tmp_path / "d.tif")[0], stack.astype(np.float32))
    assert list(list_volumes(tmp_path)) == sorted(tmp_path / n for n in ("a.nii.gz", "b.npy", "c.npy", "d.tif"))


def test_a_folder_search_never_takes_label_maps(tmp_path):
    """nnU-Net keeps label maps beside the images (labelsTr/, gt_segmentations/, CASE_seg.*): a
    folder search lists the images only, at any depth; hidden folders are not entered."""
    for name in ("imagesTr/case0_0000.nii.gz", "labelsTr/case0.nii.gz", "gt_segmentations/case0.nii.gz",
                 "deep/er/case1.npy", "deep/er/case1_seg.npy", "deep/labelsTs/x.npy", ".hidden/y.npy", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list(list_volumes(tmp_path)) == [tmp_path / "deep/er/case1.npy", tmp_path / "imagesTr/case0_0000.nii.gz"]


def test_a_4d_series_is_one_sample_per_volume_or_its_channels(tmp_path):
    series = np.random.default_rng(1).normal(size=(5, 6, 7, 3)).astype(np.float32)
    path = _nifti(tmp_path / "s.nii", series)
    samples = list_samples([path, tmp_path / "missing.nii"])
    assert samples == [(path, 0), (path, 1), (path, 2), (tmp_path / "missing.nii", None)]
    assert np.array_equal(read_volume(path, 1, index=1)[0], series[..., 1].T)
    as_channels = read_volume(path, channels=3)
    assert as_channels.shape == (3, 7, 6, 5) and np.array_equal(as_channels[2], series[..., 2].T)
    with pytest.raises(ValueError, match="a 4-D series of 3 volumes, read as 2 channel"):
        read_volume(path, channels=2)


@pytest.mark.parametrize("content, reason", [
    (np.full((4, 5, 6), np.nan, dtype=np.float32), "120 NaN or infinite voxels"),
    (np.zeros((4, 5)), "2-D array of shape \\(4, 5\\)"),
    (np.zeros((1, 2, 3, 4, 5)), "5-D array"),
    (np.zeros((3, 4, 5, 6)), "3 channel\\(s\\) of shape \\(4, 5, 6\\), the run reads 1"),
    (np.array(["a", "b"], dtype=object), "Object arrays cannot be loaded"),
], ids=["nan", "2d", "5d", "channels", "objects"])
def test_odd_files_are_refused_with_the_reason(tmp_path, content, reason):
    np.save(tmp_path / "x.npy", content, allow_pickle=True)
    with pytest.raises(ValueError, match=reason):
        read_volume(tmp_path / "x.npy")


def test_unreadable_volumes_are_reported_and_left_out_of_their_batch(tmp_path):
    rng = np.random.default_rng(2)
    good = [_nifti(tmp_path / f"g{i}.nii.gz", rng.normal(size=(20, 18, 12)).astype(np.float32)) for i in range(3)]
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(good[0].read_bytes())[:300])
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((4, 4, 4), np.nan, dtype=np.float32))
    data = VolumeFiles(list_samples([good[0], cut, good[1], nan, good[2]]), volume_transform((8, 16, 16)))
    items = [data[(0, 0, i)] for i in range(5)]
    assert [it[1] is None for it in items] == [True, False, True, False, True]
    assert items[1][1][0] == str(cut) and items[3][1] == (str(nan), "ValueError: 64 NaN or infinite voxels")
    batch, bad = data.collate(items)
    assert batch.shape == (3, 1, 8, 16, 16) and [p for p, _ in bad] == [str(cut), str(nan)]
    alone, bad = data.collate([items[1]])  # a batch of unreadable files alone gets the next readable one
    assert alone.shape == (1, 1, 8, 16, 16) and torch.equal(alone[0], data[(0, 0, 2)][0])


def test_augmentation_depends_on_the_key_only(tmp_path):
    vol = np.random.default_rng(3).normal(5.0, 3.0, size=(30, 24, 20)).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    data = VolumeFiles(list_samples([tmp_path / "v.npy"]), volume_transform((8, 16, 16)))
    a, b, c = data[(0, 0, 0)][0], data[(0, 0, 0)][0], data[(0, 1, 0)][0]
    assert a.shape == (1, 8, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std(unbiased=False)) - 1) < 1e-3  # per-volume z-score


def test_ct_window(tmp_path):
    hu = np.random.default_rng(4).uniform(-2000, 2000, size=(16, 16, 16)).astype(np.float32)
    np.save(tmp_path / "ct.npy", hu)
    data = VolumeFiles(list_samples([tmp_path / "ct.npy"]), volume_transform((16, 16, 16), "window:-1000:400",
                                                                            scale=(1.0, 1.0)))
    out = data[(0, 0, 0)][0]
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    expected = torch.from_numpy(np.clip((hu + 1000) / 1400, 0, 1) * 2 - 1)  # the whole volume: no crop
    assert torch.allclose(out[0], expected, atol=1e-5) or torch.allclose(out[0], expected.flip(2), atol=1e-5)
    assert parse_intensity("window:-1000:400") == ("window", (-1000.0, 400.0))
    for bad in ("window:400:-1000", "window:1", "minmax"):
        with pytest.raises(ValueError, match="intensity must be"):
            parse_intensity(bad)


def test_demo_volumes_ship_with_nibabel_and_read():
    paths = demo_volume_paths()
    samples = list_samples(paths)
    assert len(paths) >= 3 and len(samples) > len(paths)  # 4-D series give one sample per volume
    for path, index in samples:
        vol = read_volume(path, 1, index)
        assert vol.ndim == 4 and vol.shape[0] == 1 and np.isfinite(vol).all()
