"""Datasets: determinism of augmentation, both npz layouts, corrupt images skipped and counted,
resumable order. 16-bit and transparent files become 8-bit RGB."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data import (BACKGROUND, EpochSampler, ImageFolder, NpzImages, SyntheticShapes, build_dataset,
                  check_bad_fraction, collate_skip_bad, open_image, to_rgb)


def test_synthetic_is_deterministic_and_class_dependent():
    ds = SyntheticShapes(n=20, size=32, seed=3)
    x1, y1 = ds[(0, 5)]
    x2, y2 = ds[(0, 5)]
    assert x1.shape == (3, 32, 32) and torch.equal(x1, x2) and y1 == y2 == 5
    assert -1 <= x1.min() and x1.max() <= 1
    assert not torch.equal(ds[(0, 5)][0], ds[(0, 15)][0])  # same class, different image


def _jpeg_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='JPEG', quality=95)
    return np.frombuffer(buf.getvalue(), np.uint8)


def test_npz_raw_and_jpeg_layouts(tmp_path):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 16)[None, :, None] + np.zeros((4, 16, 16, 3))
    # smooth pictures JPEG keeps well
    imgs = (ramp + rng.integers(0, 40, (4, 1, 1, 3))).astype(np.uint8)
    np.savez(tmp_path / 'raw.npz', images=imgs, labels=np.array([0, 1, 2, 3], np.int16))
    blobs = [_jpeg_bytes(a) for a in imgs]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(tmp_path / 'jpg.npz', jpeg=np.concatenate(blobs), offsets=offsets,
             labels=np.array([4, 5, 6, 7]))
    ds = NpzImages(f"{tmp_path / 'raw.npz'},{tmp_path / 'jpg.npz'}", size=16, train=False)
    assert len(ds) == 8 and ds.num_classes == 8
    x, y = ds[2]
    assert y == 2 and torch.allclose(x, torch.from_numpy(imgs[2]).permute(2, 0, 1).float() / 127.5 - 1)
    xj, yj = ds[6]
    assert yj == 6 and (xj - x).abs().mean() < 0.05  # JPEG q95 of the same picture
    with pytest.raises(FileNotFoundError):
        NpzImages(str(tmp_path / 'missing.npz'), 16)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    for cls in ('a', 'b'):
        (tmp_path / cls).mkdir()
        for k in range(3):
            Image.fromarray(np.full((20, 24, 3), 40 * k,
                                    np.uint8)).save(tmp_path / cls / f'{k}.png')
    (tmp_path / 'b' / 'bad.jpg').write_bytes(b'not a jpeg at all')
    # ImageNet's extension
    Image.fromarray(np.full((20, 24, 3), 99, np.uint8)).save(tmp_path / 'a' / 'upper.JPEG')
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')  # not listed at all
    ds = ImageFolder(str(tmp_path), size=16, train=True)
    assert len(ds) == 8 and ds.num_classes == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_skip_bad)
    images, labels, num_bad = next(iter(loader))
    assert images.shape == (7, 3, 16, 16) and num_bad == 1
    check_bad_fraction(1, 200)  # 0.5%: fine
    with pytest.raises(RuntimeError, match='could not be read'):
        check_bad_fraction(3, 200)


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    # 16-bit grey k * 257 + 100 is 8-bit grey k (100 / 257 rounds away); convert('RGB') gives 255
    grey = np.arange(256).reshape(16, 16)
    sixteen = np.minimum(grey * 257 + 100, 65535).astype(np.uint16)  # 65535 = 255 * 257
    (tmp_path / 'cls').mkdir()
    Image.fromarray(sixteen).save(tmp_path / 'cls' / 'deep.png')  # a 16-bit grey PNG
    assert Image.open(tmp_path / 'cls' / 'deep.png').mode == 'I;16'
    x, _ = ImageFolder(str(tmp_path), size=16, train=False)[0]  # the training path (no resize)
    assert torch.equal(x, torch.from_numpy(grey).float().expand(3, 16, 16) / 127.5 - 1)
    expected = np.repeat(grey.astype(np.uint8)[..., None], 3, 2)  # (16, 16, 3)
    big_endian = Image.frombytes('I;16B', (16, 16), sixteen.astype('>u2').tobytes())
    as_int32 = Image.fromarray(sixteen.astype(np.int32))  # mode I: older Pillows' 16-bit PNGs
    for img in (open_image(tmp_path / 'cls' / 'deep.png'), to_rgb(big_endian), to_rgb(as_int32)):
        assert img.mode == 'RGB' and np.array_equal(np.asarray(img), expected)


def test_transparent_images_are_composited_onto_the_background(tmp_path):
    colour = np.array([10, 200, 60])
    alpha = np.array([[0, 255], [128, 255]], np.uint8)  # (2, 2): clear, opaque / half, opaque
    rgb = np.broadcast_to(colour, (2, 2, 3))
    rgba = np.concatenate([rgb, alpha[..., None]], 2).astype(np.uint8)  # (2, 2, 4)
    blend = (colour * 128 + np.array(BACKGROUND) * 127) / 255  # the half-transparent pixel
    expected = np.stack([[BACKGROUND, colour], [blend, colour]])  # (2, 2, 3)
    Image.fromarray(rgba).save(tmp_path / 'rgba.png')
    assert np.abs(np.asarray(open_image(tmp_path / 'rgba.png')) - expected).max() <= 1
    grey_alpha = np.stack([np.full((2, 2), 60, np.uint8), alpha], 2)  # mode LA
    Image.fromarray(grey_alpha).save(tmp_path / 'la.png')
    opacity = alpha[..., None] / 255  # (2, 2, 1)
    expected_grey = 60 * opacity + np.array(BACKGROUND) * (1 - opacity)
    assert np.abs(np.asarray(open_image(tmp_path / 'la.png')) - expected_grey).max() <= 1
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), 'P')  # index 0 is transparent
    palette.putpalette([0, 0, 0] + colour.tolist() + [0, 0, 0] * 254)
    palette.save(tmp_path / 'palette.png', transparency=0)
    expected = np.stack([[BACKGROUND, colour], [colour, BACKGROUND]])
    assert np.array_equal(np.asarray(open_image(tmp_path / 'palette.png')), expected)


def test_epoch_sampler_shards_and_resumes():
    full = list(EpochSampler(10, seed=1))
    assert sorted(i for _, i in full) == list(range(10))
    s = EpochSampler(10, seed=1)
    s.set_epoch(0, start=4)
    assert list(s) == full[4:]
    r0, r1 = list(EpochSampler(11, 0, 2, seed=1)), list(EpochSampler(11, 1, 2, seed=1))
    assert len(r0) == len(r1) == 5 and not set(r0) & set(r1)
    s.set_epoch(1)
    assert list(s) != full  # reshuffled every epoch


def test_epoch_sampler_global_batches_do_not_depend_on_world_size():
    """What lets a checkpoint move between GPU counts at a fixed global batch: step k of 2 ranks x 4
    images holds the same 8 images as step k of 1 rank x 8, also when resumed mid-epoch (start
    counts this rank's samples)."""
    one = [i for _, i in EpochSampler(24, seed=3)]
    two = [[i for _, i in EpochSampler(24, r, 2, seed=3)] for r in (0, 1)]
    for k in range(3):
        assert sorted(two[0][4 * k:4 * k + 4] + two[1][4 * k:4 * k + 4]) == sorted(one[8 * k:8 * k + 8])
    resumed = EpochSampler(24, 1, 2, seed=3)
    resumed.set_epoch(0, start=1 * 4)  # 2-rank run resumed after one step of 4 images per rank
    assert [i for _, i in resumed] == two[1][4:]
    ds = build_dataset('synthetic', 32)
    assert ds[(0, 7)][0].shape == (3, 32, 32)
