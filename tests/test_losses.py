"""losses.py: LPIPS against a plain functional VGG16 on weight files in the published layouts, the
missing-weights error (offline), hinge / non-saturating / LeCAM on hand-computed values, the
discriminator's shapes and init."""
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import utils
from losses import LPIPS, LeCAM, PatchDiscriminator, d_loss, hinge_d_loss, load_lpips, non_saturating_g_loss

# torchvision's vgg16().features: conv layers (index, in, out); the rest are ReLUs and 2x2 max-pools
VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
             (14, 256, 256),
             (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
             (28, 512, 512)]
POOLS_AFTER = {2, 7, 14, 21}  # a max-pool follows the ReLU after these convs (indices 4, 9, 16, 23)
TAPS_AFTER = {2, 7, 14, 21, 28}  # LPIPS taps the ReLU after these convs (indices 3, 8, 15, 22, 29)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A random VGG16 saved as torchvision's vgg16-397923af.pth (features.* plus classifier.* keys)
    and random non-negative heads saved as LPIPS v0.1 vgg.pth (lin{i}.model.1.weight)."""
    folder = tmp_path_factory.mktemp("weights")
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for index, cin, cout in VGG_CONVS:
        weight = torch.randn(cout, cin, 3, 3, generator=g)
        vgg[f"features.{index}.weight"] = weight * math.sqrt(2 / (9 * cin))
        vgg[f"features.{index}.bias"] = torch.randn(cout, generator=g) * 0.01
    # the real classifier is 472 MB; small stand-ins under the same keys show they are ignored
    for index in (0, 3, 6):
        vgg[f"classifier.{index}.weight"] = torch.randn(4, 4, generator=g)
        vgg[f"classifier.{index}.bias"] = torch.randn(4, generator=g)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1
           for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder, vgg, lin


@pytest.fixture(scope="module")
def lpips(weight_files):
    folder, _, _ = weight_files
    return LPIPS(vgg_weights=folder / "vgg16-397923af.pth", lin_weights=folder / "vgg.pth")


def reference_lpips(x, y, vgg, lin):
    """LPIPS written out from the raw weight dicts, one image pair at a time, with the LPIPS repo's
    formulas."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    out = []
    for a, b in zip(x, y):
        feats = []
        for img in (a[None], b[None]):
            h, taps = (img - shift) / scale, []
            for index, _, _ in VGG_CONVS:
                h = F.relu(F.conv2d(h, vgg[f"features.{index}.weight"],
                                    vgg[f"features.{index}.bias"], padding=1))
                if index in TAPS_AFTER:
                    taps.append(h / (torch.sqrt(torch.sum(h ** 2, dim=1, keepdim=True)) + 1e-10))
                if index in POOLS_AFTER:
                    h = F.max_pool2d(h, 2)
            feats.append(taps)
        total = sum(F.conv2d((fa - fb) ** 2, lin[f"lin{i}.model.1.weight"]).mean()
                    for i, (fa, fb) in enumerate(zip(*feats)))
        out.append(total)
    return torch.stack(out)


def test_lpips_matches_reference_on_published_layouts(lpips, weight_files):
    _, vgg, lin = weight_files
    torch.manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    ours = lpips(x, y)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, reference_lpips(x, y, vgg, lin), rtol=1e-4, atol=1e-6)
    # the loaded weights are exactly the file's
    torch.testing.assert_close(lpips.features[28].weight, vgg["features.28.weight"], rtol=0, atol=0)
    torch.testing.assert_close(lpips.lins[4], lin["lin4.model.1.weight"], rtol=0, atol=0)


def test_lpips_zero_positive_symmetric(lpips):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert (d > 1e-4).all()
    torch.testing.assert_close(d, lpips(y, x), rtol=1e-5, atol=1e-7)
    # a bigger change is farther
    assert (lpips(x, (x + 0.8 * torch.randn_like(x)).clamp(-1, 1)) > d).all()


def test_lpips_frozen_gradient_to_input_only(lpips):
    lpips.train()  # must stay in eval mode
    assert not lpips.training and not any(m.training for m in lpips.modules())
    assert all(not p.requires_grad for p in lpips.parameters())
    torch.manual_seed(2)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    lpips(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_load_lpips_explicit_and_cache(weight_files, tmp_path, monkeypatch):
    folder, _, _ = weight_files
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    assert isinstance(load_lpips(vgg_weights=folder / "vgg16-397923af.pth", lin_weights=folder / "vgg.pth"), LPIPS)
    # both files found in the cache folder, no download
    monkeypatch.setattr(utils, "CACHE_DIR", str(folder))
    assert isinstance(load_lpips(), LPIPS)
    with pytest.raises(FileNotFoundError, match="--vgg-weights"):
        load_lpips(vgg_weights=tmp_path / "nope.pth", lin_weights=folder / "vgg.pth")


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable (test)")


def test_missing_weights_clear_error_offline(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(utils, "CACHE_DIR", str(cache))
    # no torchvision copy of VGG16 to fall back on
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)  # what utils.download calls
    with pytest.raises(FileNotFoundError) as info:
        load_lpips()
    message = str(info.value)
    for text in ("vgg16-397923af.pth",
                 "https://download.pytorch.org/models/vgg16-397923af.pth", "vgg.pth",
                 "PerceptualSimilarity", str(cache), "--vgg-weights", "--lpips-weights",
                 "--perceptual-weight 0",
                 "network is unreachable"):
        assert text in message
    assert not any(p.is_file() for p in cache.rglob("*"))  # no half-written files left behind


def test_hinge_d_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6;  relu(1 + fake) = [0, 1, 2] -> mean 1;  0.5 * (5/6 +
    # 1) = 11/12
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(11 / 12))


def test_non_saturating_g_loss_by_hand():
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 3.0], [-1.0, 1.0]]]])  # (2, 1, 2, 2)
    # per-image means 0 and 1; -log sigmoid(0) = log 2, -log sigmoid(1) = log(1 + e^-1)
    expected = (math.log(2) + math.log(1 + math.exp(-1))) / 2
    torch.testing.assert_close(non_saturating_g_loss(logits), torch.tensor(expected))
    # the mean comes before the non-linearity: not the mean of per-patch losses
    assert abs(F.softplus(-logits).mean().item() - expected) > 1e-3


def test_lecam_by_hand_and_state_dict():
    lecam = LeCAM()
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 1.0])  # means 0.5 and 0.0
    lecam.update(torch.tensor([2.0]), torch.tensor([-1.0]))
    torch.testing.assert_close(lecam.ema_real, torch.tensor(0.002))  # 0.999 * 0 + 0.001 * 2
    torch.testing.assert_close(lecam.ema_fake, torch.tensor(-0.001))
    # relu(real - ema_fake) = [2.001, 0];  relu(ema_real - fake) = [1.002, 0]
    torch.testing.assert_close(lecam(real, fake), torch.tensor(2.001 ** 2 / 2 + 1.002 ** 2 / 2))
    for _ in range(99):
        lecam.update(real, fake)
    # 100 updates from 0: the first with means (2, -1), then 99 with means (0.5, 0)
    expected_real = 2 * 0.001 * 0.999 ** 99 + 0.5 * (1 - 0.999 ** 99)
    torch.testing.assert_close(lecam.ema_real, torch.tensor(expected_real))
    torch.testing.assert_close(lecam.ema_fake, torch.tensor(-0.001 * 0.999 ** 99))
    restored = LeCAM()
    restored.load_state_dict(lecam.state_dict())
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}
    assert restored.ema_real == lecam.ema_real and restored.ema_fake == lecam.ema_fake


def test_d_loss_updates_lecam_before_the_penalty():
    torch.manual_seed(3)
    disc = PatchDiscriminator(ndf=8)
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    # a fast decay and EMAs far from the logits, so that updating after the penalty instead of
    # before shows
    lecam = LeCAM(decay=0.5)
    lecam.ema_real.fill_(3.0)
    lecam.ema_fake.fill_(-3.0)
    fresh = LeCAM(decay=0.5)
    fresh.load_state_dict(lecam.state_dict())
    loss, parts = d_loss(disc, real, fake, lecam, lecam_weight=0.5)
    # separate passes in train mode: the same logits as d_loss saw (BN uses batch statistics of each
    # set)
    logits_real, logits_fake = disc(real), disc(fake)
    fresh.update(logits_real, logits_fake)
    torch.testing.assert_close(lecam.ema_real, fresh.ema_real)
    expected = hinge_d_loss(logits_real, logits_fake) + 0.5 * fresh(logits_real, logits_fake)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert set(parts) == {"d_hinge", "d_lecam", "logits_real", "logits_fake"}


@pytest.mark.parametrize("size, patches", [(64, 6), (128, 14)])
def test_discriminator_shape(size, patches):
    disc = PatchDiscriminator()
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, patches, patches)


def test_discriminator_structure_and_init():
    torch.manual_seed(4)
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.bias is not None) for c in convs] == [
        (3, 64, 2, True), (64, 128, 2, False), (128, 256, 2, False), (256, 512, 1, False),
        (512, 1, 1, True)]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert len(norms) == 3 and sum(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.2
                                   for m in disc.modules()) == 4
    weights = torch.cat([c.weight.flatten() for c in convs[1:4]])  # 2.6M values
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 1e-3
    bn_weight = torch.cat([n.weight for n in norms])
    assert abs(bn_weight.mean().item() - 1) < 5e-3 and abs(bn_weight.std().item() - 0.02) < 5e-3
    assert all((n.bias == 0).all() for n in norms)
    # state-dict keys as taming's NLayerDiscriminator, so its checkpoints load
    assert {"main.0.weight", "main.2.weight", "main.3.running_mean", "main.11.weight", "main.11.bias"} <= set(
        disc.state_dict())
