"""Tests for fid.py. The Inception weights are random (made here, saved in the official layout,
loaded through the real loading path): they check the plumbing and the math, never a reportable
number. The loading path accepts them only when told to (allow_unverified,
--allow-unverified-weights)."""
import hashlib
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fid
import utils
from conftest import rfid, write_random_inception


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return write_random_inception(tmp_path_factory.mktemp('weights') / fid.WEIGHTS_NAME)


@pytest.fixture(scope='module')
def model(weights):
    return fid.load_inception(weights, allow_unverified=True)  # random: not the published sha256


def test_official_layout_and_feature_shapes(weights, model, tmp_path):
    state = torch.load(weights, weights_only=True)
    # pt_inception-2015-12-05-6726825d.pth holds 566 tensors: 94 conv+BN units x 6 (with
    # num_batches_tracked) + fc
    assert len(state) == 566
    # torchvision's inception_v3 (27,161,264 parameters) - AuxLogits (3,326,696) + 8 more classes
    # (16,392)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert state['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)
    assert state['Mixed_6d.branch7x7dbl_2.conv.weight'].shape == (160, 160, 7, 1)
    assert state['Mixed_7c.branch3x3dbl_3b.bn.running_var'].shape == (384,)
    assert state['fc.weight'].shape == (1008, 2048)
    # the FID graph's quirks: average pools ignore the zero padding, and Mixed_7c max-pools
    assert torch.equal(fid.tf_avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool
    # the file must load unchanged: a missing (or extra, or reshaped) tensor is an error
    del state['fc.bias']
    torch.save(state, tmp_path / 'broken.pth')
    with pytest.raises(RuntimeError, match='fc.bias'):
        fid.load_inception(str(tmp_path / 'broken.pth'), allow_unverified=True)

    branch = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: branch.append(output))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)  # the full path: resize to 299
    hook.remove()
    assert out['pool'].shape == (2, 2048) and out['logits'].shape == (2, 1008) and out['spatial'].shape == (2, 2023)
    # IS logits: TF's MatMul, no bias
    assert torch.allclose(out['logits'], out['pool'] @ model.fc.weight.T)
    # spatial = first 7 channels of the branch1x1 output inside Mixed_6d (the hook's 2nd call; the
    # 1st is the recomputation in forward), 17 x 17, flattened (H, W, C) as ADM's NHWC TF graph
    assert len(branch) == 2
    assert torch.equal(out['spatial'].view(2, 17, 17, 7), branch[1][:, :7].permute(0, 2, 3, 1))
    # the random net is not dead, so the tests below see real variation
    assert out['pool'].std() > 0.01
    with torch.no_grad():  # uint8 input = the same images in [0, 1]
        as_uint8 = model((images * 255).round().to(torch.uint8), size=75)['pool']
        as_float = model((images * 255).round() / 255, size=75)['pool']
    assert torch.allclose(as_uint8, as_float, atol=1e-4)


def tf1_resize_reference(image, size):
    """TF1 resize_bilinear(align_corners=False) pixel by pixel in float32, after
    resize_bilinear_op.cc."""
    in_h, in_w = image.shape
    out = np.zeros((size, size), np.float32)
    for i in range(size):
        y = np.float32(i) * (np.float32(in_h) / np.float32(size))
        y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), in_h - 1)
        for j in range(size):
            x = np.float32(j) * (np.float32(in_w) / np.float32(size))
            x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), in_w - 1)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * (x - np.float32(x0))
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * (x - np.float32(x0))
            out[i, j] = top + (bottom - top) * (y - np.float32(y0))
    return out


def half_pixel_resize_reference(image, size):
    """pytorch-fid's resize (bilinear, align_corners=False): source = (dst + 0.5) * in / out - 0.5,
    clamped at 0."""
    def taps(in_size, i):
        src = max((i + 0.5) * in_size / size - 0.5, 0.0)
        lo = int(np.floor(src))
        return lo, min(lo + 1, in_size - 1), src - lo
    out = np.zeros((size, size))
    for i in range(size):
        y0, y1, dy = taps(image.shape[0], i)
        for j in range(size):
            x0, x1, dx = taps(image.shape[1], j)
            out[i, j] = ((1 - dy) * ((1 - dx) * image[y0, x0] + dx * image[y0, x1])
                         + dy * ((1 - dx) * image[y1, x0] + dx * image[y1, x1]))
    return out


def test_resize_conventions(model):
    torch.manual_seed(0)
    images = torch.rand(1, 3, 7, 9)
    for size in (13, 5):  # up- and down-sampling
        tf_ref = np.stack([tf1_resize_reference(channel,
                                                size) for channel in (images[0] * 255).numpy()])
        assert np.abs(fid.tf1_resize(images * 255, size)[0].numpy() - tf_ref).max() < 1e-4
        assert np.allclose(model.preprocess(images, 'tf', size)[0].numpy(), (tf_ref - 128) / 128, atol=1e-6)
        bilinear_ref = np.stack([half_pixel_resize_reference(channel, size)
                                 for channel in images[0].double().numpy()])
        assert np.allclose(model.preprocess(images, 'bilinear', size)[0].numpy(), 2 * bilinear_ref - 1, atol=1e-5)
    # TF1 has no half-pixel offset: halving picks the even pixels exactly
    square = torch.rand(1, 3, 8, 8)
    assert torch.equal(fid.tf1_resize(square, 4), square[:, :, ::2, ::2])
    # and the two conventions really differ at 256 -> 299
    big = torch.rand(1, 3, 256, 256)
    assert (model.preprocess(big, 'tf') - model.preprocess(big, 'bilinear')).abs().mean() > 0.05


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(model):
    torch.manual_seed(1)
    images = torch.rand(16, 3, 32, 32)

    def pool(x):
        with torch.no_grad():
            return model(x, size=75)['pool'].double().numpy()
    base = pool(images)
    mu, sigma = fid.compute_statistics(base)
    assert np.allclose(mu, base.mean(0)) and np.allclose(sigma, np.cov(base, rowvar=False))
    # 8 dims < 16 images: full-rank covariances, and sqrtm stays cheap
    dims = np.argsort(base.var(0))[-8:]

    def fid_to(x):
        return fid.frechet_distance(*fid.compute_statistics(base[:, dims]),
                                    *fid.compute_statistics(pool(x)[:, dims]))
    assert abs(fid_to(images)) < 1e-8 * np.trace(sigma)
    small, large = fid_to((images + 0.1).clamp(0, 1)), fid_to((images + 0.3).clamp(0, 1))
    assert 0 < small < large
    mu, sigma = mu[dims], sigma[np.ix_(dims, dims)]  # shifting the mean by d adds exactly |d|^2
    assert fid.frechet_distance(mu, sigma, mu + 0.5, sigma) == pytest.approx(8 * 0.25, abs=1e-6)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # dense but commuting covariances Q E Q^T: (S1 S2)^(1/2) = Q (E1 E2)^(1/2) Q^T
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    e1, e2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(e1) - np.sqrt(e2)) ** 2).sum()
    assert fid.frechet_distance(mu1, q * e1 @ q.T, mu2, q * e2 @ q.T) == pytest.approx(expected, rel=1e-9)
    # general covariances: Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), through symmetric
    # eigen-decompositions
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d, b @ b.T / d
    w, v = np.linalg.eigh(s1)
    root1 = v * np.sqrt(w) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    one_d = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                                 np.array([[9.0]]))
    assert one_d == pytest.approx(2 ** 2 + (2 - 3) ** 2)


def test_inception_score_limits_and_reference():
    rng = np.random.default_rng(0)
    identical = np.tile(rng.standard_normal(1008), (100, 1))
    assert fid.inception_score(identical) == pytest.approx(1.0, abs=1e-9)
    # confident, distinct and uniform over classes: every split of 20 holds each class once
    classes = 20
    confident = 50 * np.tile(np.eye(classes), (10, 1))
    assert fid.inception_score(confident) == pytest.approx(classes, rel=1e-9)
    # probabilities via logs
    assert fid.inception_score(np.log(np.full((40, 8), 1 / 8))) == pytest.approx(1.0)
    # ADM's loop (improved-gan's formula) on random logits, 5 splits of 10
    logits = rng.standard_normal((50, 30)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1)))
              for p in np.split(probs, 5)]
    assert fid.inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-9)


def precision_recall_reference(real, fake, k):
    """Brute force: squared distance to the k-th neighbour (self excluded) and membership by double
    loops."""
    def radii(points):
        return [sorted(((p - q) ** 2).sum() for q in points)[k] for p in points]

    def inside(points, ref, ref_radii):
        return np.mean([any(((p - q) ** 2).sum() <= r for q,
                            r in zip(ref, ref_radii)) for p in points])
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_on_known_overlaps():
    def line(start):  # 100 points spaced 1 apart on a line, in 4-D
        return torch.nn.functional.pad(torch.arange(start, start + 100.0)[:, None], (0, 3))
    real, fake = line(0), line(50)
    # k=3: an inner point's 3rd neighbour is 2 away, an end's is 3, so real's manifold is [-3, 102]:
    # fakes 50..102 are inside (53%); symmetrically reals 47..99 are inside fake's [47, 152]
    assert fid.precision_recall(real, fake, k=3) == pytest.approx((0.53, 0.53))
    # radii 1: [-1, 100], [49, 150]
    assert fid.precision_recall(real, fake, k=1) == pytest.approx((0.51, 0.51))
    assert fid.precision_recall(real, line(1000), k=3) == (0.0, 0.0)
    assert fid.precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((30, 5)), rng.standard_normal((40, 5)) * 1.3 + 0.4
    ours = fid.precision_recall(real, fake, k=3, batch_size=7)  # small chunks exercise the batching
    assert ours == pytest.approx(precision_recall_reference(real, fake, k=3))


def test_adm_npz_files_folders_and_cli(tmp_path, weights, model, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)  # 20 < 5000: IS is one part
    np.savez(tmp_path / 'samples.npz', arr_0=images)
    np.savez_compressed(tmp_path / 'compressed.npz', arr_0=images)
    (tmp_path / 'folder').mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / 'folder' / f'{i:05d}.png')
    for name in ('samples.npz', 'compressed.npz', 'folder'):
        count, batches = fid.read_images(str(tmp_path / name), batch_size=3)
        batches = list(batches)
        assert count == 20 and [len(batch) for batch in batches] == [3] * 6 + [2]
        assert np.array_equal(np.concatenate(batches), images)

    samples, stats_path = str(tmp_path / 'samples.npz'), str(tmp_path / 'stats.npz')
    common = ['--inception-weights', weights, '--device', 'cpu', '--batch-size', '4',
              '--allow-unverified-weights']
    fid.main([samples, '--save-stats', stats_path] + common)
    stats = np.load(stats_path)
    assert stats['mu'].shape == (2048,) and stats['sigma'].shape == (2048, 2048) and stats['sigma'].dtype == np.float64
    assert stats['mu_s'].shape == (2023,) and stats['sigma_s'].shape == (2023, 2023)
    with torch.no_grad():
        # 'tf' resize at 299, as the CLI's default
        features = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    pool, spatial = features['pool'].double().numpy(), features['spatial'].double().numpy()
    assert np.allclose(stats['mu'], pool.mean(0), atol=1e-5)
    assert np.allclose(stats['sigma'], np.cov(pool, rowvar=False), atol=1e-5)
    assert np.allclose(stats['mu_s'], spatial.mean(0), atol=1e-5)

    # ADM's reference-batch format: arr_0 (for precision/recall) + mu, sigma, mu_s, sigma_s (which
    # win for FID)
    reference = str(tmp_path / 'reference.npz')
    # stored means shifted by 1: the FID printed must come from them, not from arr_0 (which alone
    # would give 0)
    np.savez(reference, arr_0=images, mu=stats['mu'] + 1, sigma=stats['sigma'],
             mu_s=stats['mu_s'] + 1,
             sigma_s=stats['sigma_s'])
    # sqrtm of a 2048^2 matrix costs ~10 s of CPU: the CLI test checks the plumbing, the tests above
    # the formula
    monkeypatch.setattr(fid, 'frechet_distance', lambda mu1, sigma1, mu2,
                        sigma2: float(((mu1 - mu2) ** 2).sum()))
    fid.main([samples, reference] + common)
    printed = capsys.readouterr().out
    # |mu1 - mu2|^2 = 2048 x 1 and 2023 x 1; precision and recall of a set against itself are 1
    for line in ('FID: 2048.0000', 'sFID: 2023.0000', 'Precision: 1.0000', 'Recall: 1.0000'):
        assert line in printed
    score = float(printed.split('Inception Score: ')[1].split()[0])
    assert score == pytest.approx(fid.inception_score(features['logits'].numpy()), abs=1e-4) and score > 1.0
    # statistics made with another resize are refused
    with pytest.raises(ValueError, match='resize'):
        fid.main([samples, stats_path, '--resize', 'bilinear'] + common)


def test_rfid_uses_the_pytorch_fid_convention(model, monkeypatch):
    torch.manual_seed(2)
    originals = torch.rand(3, 3, 32, 32) * 2 - 1
    seen = []
    monkeypatch.setattr(fid, 'frechet_distance', lambda mu1, sigma1, mu2,
                        sigma2: seen.append((mu1, mu2)) or 0.0)
    rfid(originals, originals.clamp(-0.5, 0.5), model, batch_size=2)
    with torch.no_grad():
        expected = model((originals + 1) / 2, 'bilinear')['pool'].double().mean(0).numpy()
    assert np.allclose(seen[0][0], expected, atol=1e-5) and not np.allclose(seen[0][1], expected, atol=1e-3)


def test_missing_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, 'CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(RuntimeError) as error:
        fid.load_inception()
    for part in (fid.WEIGHTS_NAME, fid.WEIGHTS_URL, str(tmp_path / 'cache'), '--inception-weights'):
        assert part in str(error.value)
    with pytest.raises(FileNotFoundError, match=fid.WEIGHTS_NAME):
        fid.load_inception(str(tmp_path / 'nowhere.pth'))


def test_download_is_checked_against_the_sha256(tmp_path, monkeypatch, weights):
    cache = tmp_path / 'cache'
    monkeypatch.setattr(utils, 'CACHE_DIR', str(cache))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(fid, 'WEIGHTS_URL', Path(weights).as_uri())  # a local "server"
    monkeypatch.setattr(fid, 'WEIGHTS_SHA256', '0' * 64)
    with pytest.raises(RuntimeError, match='hash'):
        fid.find_weights()
    assert os.listdir(cache) == []  # a corrupt download never lands in the cache
    monkeypatch.setattr(fid, 'WEIGHTS_SHA256',
                        hashlib.sha256(Path(weights).read_bytes()).hexdigest())
    assert fid.find_weights() == str(cache / fid.WEIGHTS_NAME)
    # now found in the cache, no download
    monkeypatch.setattr(fid, 'WEIGHTS_URL', 'file:///nonexistent')
    assert fid.load_inception().fc.weight.shape == (1008, 2048)


def adm_inception_score(logits, split_size):
    """ADM's compute_inception_score written out in numpy: softmax, then parts starting at
    range(0, N, split_size), each scored with its own marginal, then the plain mean of scores."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


@pytest.mark.parametrize('n, split_size', [(12_345, 5000), (123, 50), (50_000, 5000), (7, 5000)])
def test_inception_score_follows_adm_split_rule(n, split_size):
    rng = np.random.default_rng(n)
    logits = rng.standard_normal((n, 12)) * 2
    logits[:, 0] += np.linspace(0, 6, n)  # class 0 grows along the samples: every part differs
    expected = adm_inception_score(logits, split_size)
    assert fid.inception_score(logits, split_size) == pytest.approx(expected, rel=1e-12)
    if n == 12_345:  # the default is ADM's 5,000; ten equal parts of 1234-1235 give another number
        assert fid.inception_score(logits) == pytest.approx(expected, rel=1e-12)
        parts = [adm_inception_score(part, len(part)) for part in np.array_split(logits, 10)]
        assert abs(np.mean(parts) - expected) > 1e-3 * expected


def test_weights_are_checked_against_the_published_sha256(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(fid.ALLOW_UNVERIFIED_ENV)  # conftest allows random weights; not here
    with pytest.raises(ValueError) as error:
        fid.load_inception(weights)  # the right layout, random values
    for part in (fid.WEIGHTS_SHA256, fid.WEIGHTS_URL, '--allow-unverified-weights',
                 fid.ALLOW_UNVERIFIED_ENV):
        assert part in str(error.value)
    # training-time rFID loads fid.local_weights() (a cached file) through the same check
    monkeypatch.setattr(utils, 'CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    os.symlink(weights, tmp_path / fid.WEIGHTS_NAME)
    assert fid.local_weights() == str(tmp_path / fid.WEIGHTS_NAME)
    with pytest.raises(ValueError, match='sha256'):
        fid.load_inception(fid.local_weights())
    capsys.readouterr()
    assert not fid.load_inception(weights, allow_unverified=True).weights_verified  # the override
    assert fid.UNVERIFIED in capsys.readouterr().out
    monkeypatch.setenv(fid.ALLOW_UNVERIFIED_ENV, '1')  # the override where no argument reaches
    assert not fid.load_inception(fid.local_weights()).weights_verified
    monkeypatch.delenv(fid.ALLOW_UNVERIFIED_ENV)
    published = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    monkeypatch.setattr(fid, 'WEIGHTS_SHA256', published)
    capsys.readouterr()
    assert fid.load_inception(weights).weights_verified  # the published file passes, silently
    assert 'UNVERIFIED' not in capsys.readouterr().out


def test_cli_marks_metrics_of_unverified_weights(tmp_path, weights, capsys, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / 'samples.npz', arr_0=images)
    samples = str(tmp_path / 'samples.npz')
    argv = [samples, samples, '--inception-weights', weights, '--device', 'cpu']
    monkeypatch.delenv(fid.ALLOW_UNVERIFIED_ENV)
    with pytest.raises(ValueError, match='--allow-unverified-weights'):
        fid.main(argv)
    small = {'pool': np.eye(6, 2048), 'logits': np.zeros((6, 1008)), 'spatial': np.eye(6, 2023)}
    monkeypatch.setattr(fid, 'extract_features', lambda *args: small)  # numbers do not matter here
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: 0.0)
    fid.main(argv + ['--allow-unverified-weights'])
    printed = capsys.readouterr().out
    assert printed.startswith('WARNING: ' + fid.UNVERIFIED)
    for name in ('FID', 'sFID', 'Inception Score', 'Precision', 'Recall'):
        line = next(line for line in printed.splitlines() if line.startswith(name + ':'))
        assert line.endswith(f'({fid.UNVERIFIED})')


def test_inputs_are_checked_before_any_feature(tmp_path, weights, capsys, monkeypatch):
    def no_features(*args, **kwargs):
        pytest.fail('features computed before the inputs were checked')
    monkeypatch.setattr(fid, 'extract_features', no_features)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    good = str(tmp_path / 'good.npz')
    np.savez(good, arr_0=images)
    common = ['--inception-weights', weights, '--device', 'cpu', '--allow-unverified-weights']

    def folder(name, sizes):
        (tmp_path / name).mkdir()
        for i, size in enumerate(sizes):
            Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / name / f'{i}.png')
        return str(tmp_path / name)
    broken = folder('broken', [16, 16])
    (tmp_path / 'broken' / 'bad.png').write_bytes(b'not a png')
    for argv in ([broken, good], [good, broken]):  # REF too is checked before SAMPLES' features
        with pytest.raises(ValueError, match=r'bad\.png: cannot read this image .*delete'):
            fid.main(argv + common)
    with pytest.raises(ValueError, match='different sizes.*resize them'):
        fid.main([folder('mixed', [16, 16, 20]), good] + common)
    other = str(tmp_path / 'other.npz')
    np.savez(other, mu=np.zeros(64), sigma=np.eye(64))  # statistics of some other network
    with pytest.raises(ValueError, match=r'mu has shape \(64,\), not \(2048,\).*--save-stats'):
        fid.main([good, other] + common)
    with pytest.raises(ValueError, match='sizes'):  # and the Frechet distance says so too
        fid.frechet_distance(np.zeros(64), np.eye(64), np.zeros(2048), np.eye(2048))
    with pytest.raises(FileNotFoundError, match='missing.npz'):
        fid.main([good, str(tmp_path / 'missing.npz')] + common)
    (tmp_path / 'notes.npz').write_text('not an archive')
    with pytest.raises(ValueError, match='notes.npz: neither a folder of images nor an .npz'):
        fid.main([good, str(tmp_path / 'notes.npz')] + common)
    capsys.readouterr()
    missing_folder = str(tmp_path / 'no' / 'stats.npz')
    for argv, parts in (([good, '--save-stats', missing_folder], ('--save-stats', 'create')),
                        ([good], ('REF', '--save-stats'))):  # no REF, no --save-stats: no output
        with pytest.raises(SystemExit):
            fid.main(argv + common)
        message = capsys.readouterr().err
        assert all(part in message for part in parts)
    # a file whose header reads but whose pixels are cut off fails when decoded, naming the file
    Image.fromarray(images[0]).save(tmp_path / 'whole.png')
    (tmp_path / 'cut').mkdir()
    (tmp_path / 'cut' / 'cut.png').write_bytes((tmp_path / 'whole.png').read_bytes()[:300])
    count, batches = fid.read_images(str(tmp_path / 'cut'), batch_size=2)
    assert count == 1
    with pytest.raises(ValueError, match=r'cut\.png: cannot read this image'):
        next(batches)


def test_folders_read_16_bit_and_transparent_images_as_training_does(tmp_path):
    grey = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(grey * 257).save(tmp_path / 'a_deep.png')  # 16-bit grey: k * 257 is 8-bit k
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba).save(tmp_path / 'b_clear.png')
    count, batches = fid.read_images(str(tmp_path), batch_size=2)
    deep, clear = next(batches)
    assert count == 2 and np.array_equal(deep, np.repeat(grey[..., None], 3, 2).astype(np.uint8))
    assert (clear == 255).all()  # composited onto data.BACKGROUND, white
    assert np.array_equal(clear, np.asarray(data.open_image(tmp_path / 'b_clear.png')))
