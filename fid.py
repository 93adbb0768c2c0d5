"""
FID, sFID, Inception Score and precision/recall in plain PyTorch, giving the
numbers of the reference tools.

The paper reports rFID for the tokenizer (Table 2, measured with pytorch-fid) and gFID, IS,
precision and recall for the generator (Tables 3-4, OpenAI's TensorFlow evaluator from ADM,
guided-diffusion/evaluations). Both tools run the TF "inception-2015-12-05" InceptionV3; here it is
the pytorch-fid port, whose weight file pt_inception-2015-12-05-6726825d.pth loads unchanged (strict
state dict). No TensorFlow needed.

    FID  = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) on the 2048-d pool features
           (Heusel et al. 2017)
    sFID = the same on TF node mixed_6/conv (Mixed_6d.branch1x1 after ReLU): first 7 channels
           x 17 x 17, flattened (H, W, C) as ADM -> 2023-d (Nash et al. 2021)
    IS   = exp(E_x KL(p(y|x) || p(y))), mean over parts of 5,000 samples (ADM's rule), softmax of
           the 1008 logits without bias (Salimans et al. 2016)
    precision/recall: share of samples inside the union of the references' k=3-NN balls, and
           vice versa (Kynkaanniemi et al. 2019)

Resizing to 299 (images come as (N, 3, H, W) floats in [0, 1], or uint8):
  'tf'       default, for gFID, sFID, IS, precision, recall. ADM feeds 0..255 floats to the TF graph, which resizes
             with TF1 bilinear (align_corners=False and *no* half-pixel centres), then maps x -> (x
             - 128) / 128. The paper's gFID compares with ADM's reference batch
             (VIRTUAL_imagenet256_labeled.npz), whose mu/sigma were made this way, so samples must
             take the same path (torch-fidelity does the same).
  'bilinear' for rFID (`--resize bilinear`, train_tok.evaluate). pytorch-fid: F.interpolate(
             bilinear, align_corners=False) on [0, 1] floats, then 2x - 1. The official Open-MAGVIT2
             evaluation feeds (x + 1) / 2 of originals and clamped reconstructions (no uint8
             rounding) to pytorch-fid; train_tok.evaluate does the same.
  The two resizes sample different pixels: never mix statistics made with different ones (saved
  stats record theirs).

Weights: `--inception-weights PATH`, else $NANOMAGVIT2_CACHE (default ~/.cache/nanomagvit2)/<file>,
else pytorch-fid's torch.hub cache ($TORCH_HOME/hub/checkpoints/<file>), else downloaded into the
first. Whichever file it is, its sha256 must be the published one: other weights (random, retrained)
give numbers comparable to nothing. `--allow-unverified-weights` (for train_tok.py's rFID:
NANOMAGVIT2_ALLOW_UNVERIFIED_WEIGHTS=1) uses them anyway and marks every number printed.

Run (one GPU or NPU is plenty; there is no torchrun mode):
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz        # prints FID, sFID, IS, precision, recall
    python fid.py samples_dir/ ref_stats.npz --device npu --batch-size 200
    python fid.py imagenet_val_dir/ --resize bilinear --save-stats val_stats.npz    # statistics only

The features are computed in fp32 with TF32 off, as TF's: TF32 is faster but moves the features
(`python bench.py --rows fid` measures both).
"""
import argparse
import hashlib
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import data
import utils

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS_NAME
# full sha256 of the file; the name's suffix 6726825d is its first 8 hex digits (torch.hub's
# check_hash convention)
WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
# =1: load Inception weights of another sha256 where no flag reaches load_inception (train_tok.py)
ALLOW_UNVERIFIED_ENV = 'NANOMAGVIT2_ALLOW_UNVERIFIED_WEIGHTS'
UNVERIFIED = 'UNVERIFIED Inception weights: not a reportable number'

# -----------------------------------------------------------------------------
# building blocks: the FID Inception's units and Mixed blocks (module names =
# the state-dict keys of the weight file)


class ConvBN(nn.Module):
    """TF's 'conv' unit: conv without bias, batch norm (TF's eps 1e-3), ReLU.
    Keys <name>.conv.*, <name>.bn.*"""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's 3x3 'SAME' average pool divides by the number of real pixels, not 9 (pytorch-fid's FID
    # patch)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7s: 1x1 | 1x1-1x7-7x1 |
    1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, c_in, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(self.branch7x7x3_3(b7)),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.
    The TF graph's last block (Mixed_7c) max-pools where the paper
    average-pools; FID keeps that quirk."""

    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pooled)], 1)


def tf1_resize(x, size):
    """(N, C, H, W) float -> (N, C, size, size) as TF1's resize_bilinear(align_corners=False):
    source coordinate = dst * (in / out) in float32 (no half-pixel offset); interpolate along x on
    the two rows, then along y."""
    def grid(in_size):
        # float32, as TF's CalculateResizeScale
        scale = torch.tensor(in_size, dtype=torch.float32) / size
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.floor().long()
        # the last row / column repeats at the edge, as TF's
        hi = (lo + 1).clamp(max=in_size - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo).to(x.device, x.dtype)
    y_lo, y_hi, y_frac = grid(x.shape[2])
    x_lo, x_hi, x_frac = grid(x.shape[3])
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]  # (N, C, size, W)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * x_frac  # (N, C, size, size)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * x_frac
    # y_frac (size,) -> (size, 1): one weight per output row
    return top + (bottom - top) * y_frac[:, None]


# -----------------------------------------------------------------------------
# the network and its weights


class InceptionV3(nn.Module):
    """The FID InceptionV3 (TF 2015-12-05 graph). Build it with load_inception(): the bare
    constructor has random weights, which must never produce a reported metric."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes (1000 ImageNet + 8 unused)

    def preprocess(self, images, resize='tf', size=299):
        """(N, 3, H, W) floats in [0, 1] or uint8 -> (N, 3, size, size) network input in [-1, 1]."""
        if resize == 'tf':  # ADM: resize 0..255 floats the TF1 way, then (x - 128) / 128
            x = images.float() if images.dtype == torch.uint8 else images.float() * 255
            return (tf1_resize(x, size) - 128) / 128
        # pytorch-fid: resize [0, 1] floats with half-pixel centres, then 2x - 1
        if resize == 'bilinear':
            x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
            return 2 * F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False) - 1
        raise ValueError(f"resize must be 'tf' or 'bilinear', got {resize!r}")

    def forward(self, images, resize='tf', size=299):
        """images (N, 3, H, W) in [0, 1] (or uint8) -> dict of pool (N, 2048), logits (N, 1008),
        spatial (N, 2023). size: network input side; only the tests use less than 299 (any size >=
        75 runs, spatial shrinks)."""
        x = self.preprocess(images, resize, size)  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        # sFID's TF node mixed_6/conv is Mixed_6d's 1x1 branch: recomputed here (one 1x1 conv)
        # rather than hooked out of Mixed_6d
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # (N, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean((2, 3))  # (N, 2048): TF's pool_3
        # IS uses TF's softmax/logits/MatMul: the fc weight without its bias (ADM, improved-gan,
        # torch-fidelity)
        logits = pool @ self.fc.weight.T  # (N, 1008)
        # ADM's HWC order
        return {'pool': pool, 'logits': logits, 'spatial': spatial.permute(0, 2, 3, 1).flatten(1)}


def _cache_paths():
    """Where the Inception weights are looked for: our cache, then pytorch-fid's (torch hub)
    cache."""
    return (os.path.join(utils.CACHE_DIR, WEIGHTS_NAME),
            os.path.join(torch.hub.get_dir(), 'checkpoints', WEIGHTS_NAME))


def local_weights():
    """The first cached Inception weight file that exists, or None. Never downloads (training-time
    rFID uses it)."""
    return next((p for p in _cache_paths() if os.path.isfile(p)), None)


def find_weights(path=None):
    """Path of the Inception weight file: `path`, else a cached copy, else a fresh download (sha256
    checked)."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--inception-weights {path}: no such file ({WEIGHTS_NAME} is at {WEIGHTS_URL})')
        return path
    cached = local_weights()
    if cached is not None:
        return cached
    ours, pytorch_fid = _cache_paths()
    try:
        utils.download(WEIGHTS_URL, ours, WEIGHTS_SHA256)
    # no network (URLError is an OSError) or a wrong checksum
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f'no Inception weights: {WEIGHTS_NAME} is not in {utils.CACHE_DIR} (or {os.path.dirname(pytorch_fid)}) and '
            f'the download failed ({error}). Download it from {WEIGHTS_URL} (sha256 {WEIGHTS_SHA256}) into '
            f'{utils.CACHE_DIR}, or pass --inception-weights PATH (set NANOMAGVIT2_CACHE to use another folder).'
        ) from error
    return ours


def load_inception(weights=None, device='cpu', allow_unverified=None):
    """The FID InceptionV3 with the standard weights, loaded strictly (same keys and shapes), eval
    mode, frozen. The file must have the published sha256: one of the right layout with other
    values (random, retrained, damaged) loads and gives numbers that compare with nothing.
    allow_unverified=True loads it anyway, with a warning (None: the variable ALLOW_UNVERIFIED_ENV
    decides). model.weights_verified says which it was."""
    path = find_weights(weights)
    with open(path, 'rb') as f:
        digest = hashlib.file_digest(f, 'sha256').hexdigest()
    verified = digest == WEIGHTS_SHA256
    if allow_unverified is None:
        allow_unverified = os.environ.get(ALLOW_UNVERIFIED_ENV) == '1'
    if not verified and not allow_unverified:
        raise ValueError(
            f'{path}: sha256 {digest} is not that of {WEIGHTS_NAME} ({WEIGHTS_SHA256}). '
            f'Download the real file from {WEIGHTS_URL} (a damaged cached copy: delete it and '
            f'fid.py downloads it again). To use these weights anyway: fid.py '
            f'--allow-unverified-weights, or {ALLOW_UNVERIFIED_ENV}=1 for training-time rFID.')
    if not verified:
        print(f'WARNING: {UNVERIFIED}. {path} has sha256 {digest}, not that of {WEIGHTS_NAME} '
              f'({WEIGHTS_SHA256}): every metric computed with it is meaningless.', flush=True)
    model = InceptionV3()
    model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    model.weights_verified = verified  # fid.py's CLI marks every printed metric when False
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# metrics


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, through scipy's sqrtm as
    pytorch-fid and ADM."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f'fid: statistics of different sizes (mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape}): make both with one network')
    # (S1 S2)^(1/2): the product is not symmetric, so scipy's general sqrtm, which may go complex
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    # near-singular product: the standard fix adds eps to both diagonals
    if not np.isfinite(covmean).all():
        print(f'fid: singular covariance product; adding {eps} to the diagonals')
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # rounding can leave a tiny imaginary part; a large one means broken statistics
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'fid: imaginary component {np.abs(covmean.imag).max()} in sqrtm(S1 S2)')
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def compute_statistics(features, device='cpu'):
    """(N, D) features -> mean (D,) and covariance (D, D) with N - 1 (as np.cov), float64 numpy."""
    feats = torch.as_tensor(features).to(device, torch.float64)
    mu = feats.mean(0)
    centred = feats - mu
    # (D, D) in float64, as np.cov in pytorch-fid and ADM
    sigma = centred.T @ centred / (len(feats) - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) with ADM's rule (compute_inception_score, split_size=5000):
    score each run of `split_size` consecutive samples with its own p(y) (parts start at
    range(0, N, split_size): the last may be shorter), then average the scores, every part weighted
    equally. 50k samples -> 10 parts of 5,000; 12,345 -> 5,000 + 5,000 + 2,345.
    logits (N, C); pass log-probabilities to score probabilities (softmax(log p) = p)."""
    log_p = torch.as_tensor(logits).double().log_softmax(1)  # (N, C) log p(y|x)
    scores = []
    for part in log_p.split(split_size):  # (split_size, C) parts, the last one shorter
        log_marginal = part.exp().mean(0).log()  # (C,) log p(y) over this split
        # KL(p(y|x) || p(y)) per sample (N,), averaged, exp: this part's score
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def precision_recall(real, fake, k=3, device='cpu', batch_size=4096):
    """Improved precision/recall (k-NN manifolds) as ADM's ManifoldEstimator: a point is inside a
    set's manifold if it lies within the k-th-neighbour radius of one of its points. precision =
    fake inside real's manifold, recall = real inside fake's. The rule is ADM's; the distances are
    fp32 on `device`. A deliberate difference: ADM's shipped evaluator computes the distances in
    float16 (fp32 only where that overflows), which rounds them, so its figures can differ slightly
    from those of the exact distances used here."""
    real = torch.as_tensor(real).to(device, torch.float32)
    fake = torch.as_tensor(fake).to(device, torch.float32)

    def sq_distances(a, b):  # (A, D), (B, D) -> (A, B) squared Euclidean, as ADM
        return (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)

    # (N,) squared distance to the k-th neighbour; the point itself is the 1st smallest
    def radii(feats):
        return torch.cat([sq_distances(chunk, feats).kthvalue(k + 1, dim=1).values
                          for chunk in feats.split(batch_size)])

    def inside(feats, ref, ref_radii):  # fraction of feats within some ball of ref
        hits = [(sq_distances(chunk, ref) <= ref_radii).any(1) for chunk in feats.split(batch_size)]
        return torch.cat(hits).float().mean().item()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


# -----------------------------------------------------------------------------
# inputs, features, statistics files


def read_images(path, batch_size):
    """(count, iterator of uint8 (B, H, W, 3) batches) from a folder of images or the arr_0 of an
    .npz (ADM's sample and reference-batch format), streamed so 50k images never sit in memory at
    once. count 0: no images. A folder is checked here, before any feature is computed: every file's
    header must open, all of one size. data.open_image reads them (16-bit, transparency)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                       for name in names if name.lower().endswith(data.IMAGE_EXTENSIONS))

        def read(file, decode):  # decode=False: PIL reads the header only (a few kB per file)
            try:
                if decode:
                    return np.asarray(data.open_image(file))  # (H, W, 3) uint8
                with Image.open(file) as img:
                    return img.size
            except Exception as error:  # not an image, truncated, unreadable
                raise ValueError(f'{file}: cannot read this image ({error}); delete or replace '
                                 f'it, or move it out of {path}') from None  # has PIL's message

        with ThreadPoolExecutor(8) as pool:  # file reads and PIL decoding release the GIL
            sizes = list(pool.map(lambda file: read(file, False), files))
        if len(set(sizes)) > 1:
            other = next(i for i, size in enumerate(sizes) if size != sizes[0])
            (w, h), (other_w, other_h) = sizes[0], sizes[other]
            raise ValueError(f'{path}: images of different sizes ({files[0]} is {w}x{h}, '
                             f'{files[other]} {other_w}x{other_h}); resize them to one size')

        def folder_batches():
            with ThreadPoolExecutor(8) as pool:
                for start in range(0, len(files), batch_size):
                    chunk = files[start:start + batch_size]
                    yield np.stack(list(pool.map(lambda file: read(file, True), chunk)))
        return len(files), folder_batches()
    archive = zipfile.ZipFile(path)
    if 'arr_0.npy' not in archive.namelist():
        archive.close()
        return 0, iter(())
    array = archive.open('arr_0.npy')
    # only the header: the pixels are streamed below, a batch at a time
    version = np.lib.format.read_magic(array)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(array)
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f'{path}: arr_0 must be uint8 (N, H, W, 3) as ADM, got {dtype} {shape}')

    def npz_batches():
        with archive, array:
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                # n images of H x W x 3 bytes -> (n, H, W, 3) uint8; bytearray: a writable copy for
                # torch
                yield np.frombuffer(bytearray(array.read(n * shape[1] * shape[2] * 3)),
                                    np.uint8).reshape(n, *shape[1:])
    return shape[0], npz_batches()


@torch.no_grad()
def extract_features(model, batches, resize='tf'):
    """Features of an iterable of uint8 (B, H, W, 3) numpy batches or (B, 3, H, W) [0, 1] tensors ->
    dict of float32 numpy arrays pool (N, 2048), logits (N, 1008), spatial (N, 2023)."""
    device = next(model.parameters()).device
    outputs = {'pool': [], 'logits': [], 'spatial': []}
    for batch in batches:
        if isinstance(batch, np.ndarray):
            # uint8 stays uint8: exact 0..255 for 'tf'
            batch = torch.from_numpy(batch).permute(0, 3, 1, 2)
        # pool (B, 2048), logits (B, 1008), spatial (B, 2023)
        for name, value in model(batch.to(device), resize).items():
            outputs[name].append(value.float().cpu())
    return {name: torch.cat(values).numpy() for name, values in outputs.items()}


def save_statistics(path, stats, resize):
    """Write mu, sigma, mu_s, sigma_s (float64) as ADM's reference files, plus the resize they were
    made with."""
    np.savez(path, resize=resize,
             **{key: stats[key] for key in ('mu', 'sigma', 'mu_s', 'sigma_s') if key in stats})


# the statistics' shapes: pool features (2048) for FID, mixed_6/conv (7 x 17 x 17 = 2023) for sFID
STATISTICS_SHAPES = {'mu': (2048,), 'sigma': (2048, 2048),
                     'mu_s': (2023,), 'sigma_s': (2023, 2023)}


def open_input(path, batch_size, resize):
    """Check SAMPLES or REF before any feature is computed (a bad input fails in seconds, not after
    minutes). Returns (statistics stored in the .npz, number of images, iterator of their uint8
    (B, H, W, 3) batches)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such file or folder (give images or an .npz)')
    stored = {}
    if not os.path.isdir(path):
        if not zipfile.is_zipfile(path):  # np.savez writes a zip archive
            raise ValueError(f'{path}: neither a folder of images nor an .npz (np.savez) archive')
        with np.load(path) as npz:  # read only the statistics: arr_0 is streamed by read_images
            stored = {key: npz[key] for key in ('mu', 'sigma', 'mu_s', 'sigma_s',
                                                'resize') if key in npz.files}
    if 'resize' in stored and str(stored['resize']) != resize:
        made_with = stored['resize']
        raise ValueError(f"{path} holds statistics made with --resize {made_with}, not {resize}: "
                         f"pass --resize {made_with}, or make new statistics with --save-stats")
    for key, shape in STATISTICS_SHAPES.items():
        if key in stored and stored[key].shape != shape:
            raise ValueError(f'{path}: {key} has shape {stored[key].shape}, not {shape} (the FID '
                             f'Inception\'s): use ADM\'s reference batches or fid.py --save-stats')
    if ('mu' in stored) != ('sigma' in stored) or ('mu_s' in stored) != ('sigma_s' in stored):
        raise ValueError(f'{path}: holds {sorted(stored)}; mu needs sigma, mu_s needs sigma_s')
    count, batches = read_images(path, batch_size)
    if not count and 'mu' not in stored:
        kinds = '/'.join(data.IMAGE_EXTENSIONS)
        raise ValueError(f'{path}: neither images (a folder of {kinds} files, an .npz with arr_0) '
                         f'nor statistics (an .npz with mu, sigma)')
    return stored, count, batches


def load_input(path, opened, model, batch_size, resize, device):
    """Features (when the input has images) and statistics of SAMPLES or REF, from open_input's
    (stored, count, batches), with ADM's rule: statistics stored in the .npz (mu, sigma[, mu_s,
    sigma_s]) win over those of its arr_0, whose features still feed IS and P/R."""
    stored, count, batches = opened
    batches = tqdm(batches, total=math.ceil(count / batch_size), desc=path)
    result = extract_features(model, batches, resize) if count else {}
    if 'mu' in stored:
        result.update({key: stored[key] for key in ('mu', 'sigma', 'mu_s', 'sigma_s')
                       if key in stored})
    else:  # open_input made sure there are images
        result['mu'], result['sigma'] = compute_statistics(result['pool'], device)
        result['mu_s'], result['sigma_s'] = compute_statistics(result['spatial'], device)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description='FID, sFID, IS, precision and recall with the FID InceptionV3.')
    parser.add_argument('samples',
                        help='folder of images, .npz with arr_0 (uint8 NHWC), or statistics .npz')
    parser.add_argument('ref', nargs='?',
                        help='the same kinds, e.g. ADM\'s VIRTUAL_imagenet256_labeled.npz')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cuda, npu or cpu')
    parser.add_argument('--batch-size', type=int, default=100)
    parser.add_argument('--inception-weights', default=None,
                        help=f'path of {WEIGHTS_NAME} (else cache/download)')
    parser.add_argument('--resize', choices=('tf', 'bilinear'), default='tf',
                        help="tf: ADM's evaluator (gFID, the paper's Tables 3-4); bilinear: pytorch-fid (rFID)")
    parser.add_argument('--save-stats', default=None,
                        help='write the statistics of SAMPLES to this .npz (ADM keys)')
    parser.add_argument('--allow-unverified-weights', action='store_true',
                        help='use weights of another sha256 (every number printed is marked)')
    args = parser.parse_args(argv)
    # whatever can be wrong with the inputs fails here, before the minutes of feature extraction
    if args.ref is None and args.save_stats is None:
        parser.error('nothing to report: give REF to compare SAMPLES with, or --save-stats FILE')
    stats_folder = args.save_stats and os.path.dirname(os.path.abspath(args.save_stats))
    if stats_folder and not os.path.isdir(stats_folder):
        parser.error(f'--save-stats {args.save_stats}: no folder {stats_folder}; create it first')
    paths = [path for path in (args.samples, args.ref) if path]
    opened = [open_input(path, args.batch_size, args.resize) for path in paths]
    device = utils.setup(args.device).device  # cuda, npu (imports torch_npu) or cpu
    # fp32 features, as TF's
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = load_inception(args.inception_weights, device, args.allow_unverified_weights)
    mark = '' if model.weights_verified else f'  ({UNVERIFIED})'  # next to every number printed
    samples = load_input(args.samples, opened[0], model, args.batch_size, args.resize, device)
    if args.save_stats:
        save_statistics(args.save_stats, samples, args.resize)
        print(f'saved statistics of {args.samples} to {args.save_stats}{mark}')
    if args.ref is None:
        return
    ref = load_input(args.ref, opened[1], model, args.batch_size, args.resize, device)
    # printed for what an input lacks: sFID needs mu_s, IS sample images, P/R images on both sides
    nan = float('nan')
    fid_value = frechet_distance(samples['mu'], samples['sigma'], ref['mu'], ref['sigma'])
    print(f"FID: {fid_value:.4f}{mark}")
    sfid = frechet_distance(samples['mu_s'], samples['sigma_s'], ref['mu_s'], ref['sigma_s']) \
        if 'mu_s' in samples and 'mu_s' in ref else nan
    print(f"sFID: {sfid:.4f}{mark}")
    score = inception_score(samples['logits']) if 'logits' in samples else nan
    print(f"Inception Score: {score:.4f}{mark}")
    precision, recall = precision_recall(ref['pool'], samples['pool'], device=device) \
        if 'pool' in samples and 'pool' in ref else (nan, nan)
    print(f'Precision: {precision:.4f}{mark}\nRecall: {recall:.4f}{mark}')


if __name__ == '__main__':
    main()
