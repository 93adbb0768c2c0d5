"""
The tokenizer's training losses, besides the quantizer's own (entropy and
commitment live in quantizer.py):

    LPIPS       perceptual distance on VGG16 features (Zhang et al. 2018, Eq. (1)):
                d(x, y) = sum_l mean_hw || w_l * (norm(f_l(x)) - norm(f_l(y))) ||^2
    PatchGAN    discriminator of pix2pix / taming (NLayerDiscriminator, n_layers=3), one logit per patch
    hinge       D loss  0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))           (as the official code)
    LeCAM       R_LC = mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x_hat))^2  (Tseng et al. 2021)
    non-sat.    G loss  mean_images softplus(-mean_patches D(x_hat))   (= -log sigmoid, on per-image mean logits)

train_tok.py puts them together (defaults of the paper's runs):
    G: L1 + 1.0 * LPIPS + 0.1 * non-saturating GAN + 0.1 * entropy + 0.25 * commitment   (GAN on from step 0)
    D: hinge + lecam_weight * LeCAM   (0.01 at 128px, 0.05 at 256px)

LPIPS reads the two published weight files unchanged: torchvision's vgg16-397923af.pth and LPIPS
v0.1 vgg.pth. `load_lpips` finds them (explicit path, then ~/.cache/nanomagvit2 or
$NANOMAGVIT2_CACHE) or downloads them there with a sha256 check. Nothing here is run directly;
tests/test_losses.py checks the values by hand.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# -----------------------------------------------------------------------------
# LPIPS (VGG16, v0.1 linear heads)

# file -> (url, sha256, size, command-line flag). vgg16's sha256 starts with the 397923af in its
# name; vgg.pth's (7,289 bytes, MD5 d507d734... as taming checks) is the digest that projects
# pinning LPIPS v0.1 list for it.
VGG_FILE = "vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
WEIGHT_SOURCES = {
    VGG_FILE: ("https://download.pytorch.org/models/vgg16-397923af.pth",
               "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0", "528 MB", "--vgg-weights"),
    LIN_FILE: ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
               "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868", "7 KB", "--lpips-weights"),
}
# torchvision 'D'
VGG_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# indices in vgg16().features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG. forward(x, y) with images (N, 3, H, W) in [-1, 1] ->
    (N,) distances (0 iff x == y)."""

    def __init__(self, vgg_weights, lin_weights):
        super().__init__()
        # LPIPS' ScalingLayer: maps [-1, 1] images to torchvision's ImageNet normalisation ((x+1)/2
        # - mean) / std
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        # VGG16 `features` up to relu5_3 (index 29), built with torchvision's indices so
        # `features.N.*` keys load as is
        layers, in_ch = [], 3
        for v in VGG_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        # the weights of LPIPS' 1x1 linear heads (no bias), (1, C, 1, 1) each; its dropout before
        # them is left out
        self.lins = nn.ParameterList(torch.zeros(1, c, 1, 1) for c in TAP_CHANNELS)

        vgg_state = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        # the torchvision file also holds classifier.* (the fc layers, 472 MB of it); LPIPS needs
        # only features.*
        self.features.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items()
                                       if k.startswith("features.")})
        lin_state = torch.load(lin_weights, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            # LPIPS' NetLinLayer: model = Sequential(Dropout, Conv2d)
            key = f"lin{i}.model.1.weight"
            if key not in lin_state or lin_state[key].shape != lin.shape:
                raise ValueError(f"{lin_weights}: expected key {key} of shape {tuple(lin.shape)} "
                                 "(an LPIPS v0.1 vgg.pth file)")
            lin.data.copy_(lin_state[key])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # always eval: the network is a fixed metric, even inside a training module
        return super().train(False)

    def forward(self, x, y):
        n = x.shape[0]
        # (2N, 3, H, W): one VGG pass for both images
        h = (torch.cat([x, y]) - self.shift) / self.scale
        distance = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                # unit-normalise over channels in float32 (bf16 autocast would round the tiny
                # norms), eps as LPIPS
                f = h.float()
                f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # (2N, C, h, w)
                diff = (f[:n] - f[n:]).pow(2)  # (N, C, h, w)
                # the 1x1 conv without bias is a channel-weighted sum; written so it stays in
                # float32 under autocast
                weighted = (diff * self.lins[TAPS.index(i)].float()).sum(1)  # (N, h, w)
                # Eq. (1): spatial mean, summed over the 5 taps, (N,)
                distance = distance + weighted.mean((1, 2))
        return distance


def load_lpips(vgg_weights=None, lin_weights=None):
    """LPIPS from explicit paths, else from the cache folder (torch hub's copy of VGG16 counts too),
    else downloaded there. Under torchrun, call it on rank 0 first and barrier, so that only one
    process downloads."""
    paths, problems = {}, []
    for name, explicit in ((VGG_FILE, vgg_weights), (LIN_FILE, lin_weights)):
        url, sha256, size, flag = WEIGHT_SOURCES[name]
        if explicit is not None:
            if not os.path.isfile(explicit):
                raise FileNotFoundError(f"{flag} {explicit}: no such file")
            paths[name] = explicit
            continue
        candidates = [os.path.join(utils.CACHE_DIR, name)]
        if name == VGG_FILE:  # torchvision.models.vgg16(pretrained=True) leaves the same file here
            candidates.append(os.path.join(torch.hub.get_dir(), "checkpoints", name))
        found = [p for p in candidates if os.path.isfile(p)]
        if found:
            paths[name] = found[0]
            continue
        try:
            utils.download(url, candidates[0], sha256)
            paths[name] = candidates[0]
        # no network, HTTP error, timeout (OSError); wrong checksum
        except (OSError, RuntimeError) as error:
            problems.append(f"  {name} ({size}): could not download ({error}).\n"
                            f"    Download {url}\n    and put it at {candidates[0]}, or pass {flag} PATH.")
    if problems:
        raise FileNotFoundError("LPIPS weights are missing:\n" + "\n".join(problems) +
                                "\n  Or train without the perceptual loss: --perceptual-weight 0")
    return LPIPS(paths[VGG_FILE], paths[LIN_FILE])


# -----------------------------------------------------------------------------
# PatchGAN discriminator


class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator (pix2pix PatchGAN) with BatchNorm, as Open-MAGVIT2 uses it.
    (B, 3, H, W) -> (B, 1, H/8 - 2, W/8 - 2) patch logits: 6x6 at 64px, 14x14
    at 128px, 30x30 at 256px."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        # first conv: stride 2, bias, no norm; then n_layers-1 more stride-2 convs and one stride-1
        # conv, each without bias (BatchNorm follows); channels double up to 8 * ndf; last conv to 1
        # channel, with bias
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        out_ch = ndf
        for n in range(1, n_layers + 1):
            in_ch, out_ch = out_ch, ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(out_ch, 1, 4, stride=1, padding=1))
        # named as taming's, so its state-dict keys (main.N.*) match
        self.main = nn.Sequential(*layers)
        # taming's weights_init: conv weights N(0, 0.02) (conv biases keep PyTorch's default), BN
        # N(1, 0.02) and 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


# -----------------------------------------------------------------------------
# adversarial losses and the LeCAM regulariser


def hinge_d_loss(logits_real, logits_fake):
    """Hinge loss on patch logits, with the official (taming) factor 0.5: D's loss is the average of
    its two terms."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake):
    """(B, 1, h, w) patch logits -> scalar. Like the official non_saturate_gen_loss, the patch
    logits of each image are averaged first, then -log sigmoid(mean) = softplus(-mean) is averaged
    over the images."""
    per_image = logits_fake.flatten(1).mean(1)  # (B,)
    return F.softplus(-per_image).mean()


class LeCAM(nn.Module):
    """LeCAM regulariser with EMAs (decay 0.999, start 0) of D's mean logit on
    real and on fake images.

    The EMAs are buffers, so they are in state_dict() and survive a checkpoint (the official
    LeCAM_EMA is a plain object and restarts from 0 on resume). Order as the official code:
    update(real, fake) with this batch first,
    then forward(real, fake) with the updated EMAs. Each process keeps its own EMAs of its own
    batches (as the official code); the penalty's gradient is all-reduced with the rest of D's
    gradient by DDP."""

    def __init__(self, decay=0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real, logits_fake):
        # lerp_(v, 1 - decay): ema = decay * ema + (1 - decay) * v, without the official .item()
        # host sync
        self.ema_real.lerp_(logits_real.detach().float().mean(), 1 - self.decay)
        self.ema_fake.lerp_(logits_fake.detach().float().mean(), 1 - self.decay)

    def forward(self, logits_real, logits_fake):
        # pull real logits down to the fake EMA and fake logits up to the real EMA, one-sided as
        # MAGVIT
        return (F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake.float()).pow(2).mean())


def d_loss(disc, real, fake, lecam, lecam_weight):
    """The discriminator's step loss: real and fake in separate forward passes (BatchNorm sees each
    set alone, as the official code), hinge, then the LeCAM EMAs updated with this batch and the
    penalty with the new EMAs. Returns (loss, dict of detached parts for logging)."""
    logits_real = disc(real.detach())
    logits_fake = disc(fake.detach())
    hinge = hinge_d_loss(logits_real, logits_fake)
    lecam.update(logits_real, logits_fake)
    penalty = lecam(logits_real, logits_fake)
    parts = {"d_hinge": hinge.detach(), "d_lecam": penalty.detach(),
             "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
    return hinge + lecam_weight * penalty, parts
