"""
The MAGVIT-v2 / Open-MAGVIT2 image tokenizer: a convolutional encoder, the lookup-free quantizer
(quantizer.py, paper Eq. 1-3) and a decoder with Adaptive GroupNorm. An image (B, 3, H, W) in
[-1, 1] becomes an (H/f, W/f) grid of 18-bit tokens (f = 16 for the 256px model, 8 for the 128px
one, 4 for the 64px one) and back.

The network is the official v2 one (Open-MAGVIT2 `improved_model.py`, `lfqgan.py`), module for
module and with the same parameter names, so the released checkpoints load with an almost-identity
mapping (`convert_official_tokenizer`). No attention anywhere; 115.13M parameters at 256px,
112.02M at 128px, 36.16M in the 64px tin64 (not a released model).

Quick look at a reconstruction on one GPU (writes input | reconstruction side by side):
    python tokenizer.py --reconstruct photo.jpg --ckpt out/tok.pt --out rec.png   # our checkpoint
    python tokenizer.py --reconstruct photo.jpg --ckpt open-magvit2:imagenet_256_L.ckpt  # released
    python tokenizer.py --reconstruct photo.jpg --ckpt out/tok.pt --device npu    # Ascend NPU
Without --ckpt, --preset NAME builds an untrained tokenizer (its output is noise: a smoke test
only). Training is in train_tok.py.
"""

import argparse
import math
import types
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import crop_image, open_image
from quantizer import LFQ, indices_to_codes
from utils import DEVICES, load_checkpoint, save_image_grid, setup

# -----------------------------------------------------------------------------
# building blocks


def is_channels_last(x):
    """True for an NHWC tensor that is not also NCHW-contiguous (1x1 images and 1 channel are
    both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a channels_last input channels_last, forward and backward, when
    compiled. On CUDA, F.group_norm returns NCHW whatever its input's layout, and so does its
    backward. In a channels_last network each convolution next to a norm, and each convolution's
    backward, then converts its input to NHWC first: an activation-sized copy per conv and step
    that no compiled kernel absorbs (the aten::copy_ rows of bench.py --profile). Under
    torch.compile the norm is therefore written out for NHWC input (GroupNormNHWC), and Inductor
    fuses it with the swish around it. Eager, F.group_norm's own fused kernel runs (the written-out
    form would launch and keep more). Statistics in at least fp32, as F.group_norm; the result in
    fp32 under autocast (as F.group_norm's on CUDA, on autocast's fp32 list), else in x's dtype."""

    def forward(self, x):  # (B, C, H, W)
        if not (torch.compiler.is_compiling() and is_channels_last(x)):
            return super().forward(x)
        y = GroupNormNHWC.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def band_sum(t):
    """(B, C, H, W) NHWC -> (B, C, R) sums over R bands of rows (~1024 pixels each). In NHWC the
    values of one channel are a whole pixel apart, and a reduction over all of H x W per channel
    leaves B*C outputs: too few to fill a GPU at 256px. Per band there are R times as many outputs,
    and neighbouring channels (neighbours in memory) are still read together."""
    B, C, H, W = t.shape
    # a divisor of H, so that every band has H/R whole rows: 64 bands of 4 rows at 256 x 256,
    # 16 of 8 at 128 x 128, one band (all of H x W) from 32 x 32 down
    R = math.gcd(H, max(1, H * W // 1024))
    return t.view(B, C, R, H // R, W).sum(dim=(3, 4))


def per_group(t, G):
    """(B, C, R) partial sums -> (B, C, 1, 1): the sum over each group's C/G channels and R bands,
    handed back to each of its channels."""
    B, C = t.shape[:2]
    return t.reshape(B, G, -1).sum(dim=2, keepdim=True).expand(B, G, C // G).reshape(B, C, 1, 1)


class GroupNormNHWC(torch.autograd.Function):
    """GroupNorm of an NHWC x (B, C, H, W), in fp32 (fp64 stays), with its backward written out:
    the backward needs only x and the per-group mean and rstd (B, C, 1, 1), and its sums are two per
    channel and band, combined per group. Compiled, it makes both sums in one reduction kernel and
    dx in one element-wise kernel (docs/benchmarks.md, "GroupNorm's statistics"). Per group, over
    its n = C/G*H*W values:
        mean = sum(x) / n,   var = sum((x - mean)^2) / n,   rstd = 1 / sqrt(var + eps),
        xhat = (x - mean) * rstd,   y = xhat * w + b   (w = 1, b = 0 without affine)
        dxhat = dy * w,   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        dw = sum over B, H, W of dy * xhat,   db = sum of dy
    The variance takes two passes (a mean, then the squared deviations), not sum(x^2) - mean^2,
    which cancels in fp32 when the mean is large against the spread."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        B, C, H, W = x.shape
        n = C // num_groups * H * W
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # (B, C, H, W), NHWC
        mean = per_group(band_sum(xf), num_groups) / n  # (B, C, 1, 1)
        var = per_group(band_sum((xf - mean).square()), num_groups) / n
        rstd = torch.rsqrt(var + eps)  # (B, C, 1, 1)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups = num_groups
        y = (xf - mean) * rstd
        if weight is not None:
            y = y * weight.to(y.dtype)[:, None, None] + bias.to(y.dtype)[:, None, None]
        return y

    @staticmethod
    def backward(ctx, dy):  # dy (B, C, H, W), NHWC, in y's dtype
        x, weight, mean, rstd = ctx.saved_tensors
        B, C, H, W = x.shape
        G, n = ctx.num_groups, C // ctx.num_groups * H * W
        xhat = (x.to(dy.dtype) - mean) * rstd  # recomputed: cheaper than reading it back
        w = weight.to(dy.dtype) if weight is not None else dy.new_ones(C)  # (C,)
        dy_sum, dy_xhat_sum = band_sum(dy), band_sum(dy * xhat)  # (B, C, R) each
        # mean(dxhat) and mean(dxhat * xhat) over each group, dxhat = dy * w
        mean_dxhat = per_group(dy_sum * w[:, None], G) / n  # (B, C, 1, 1)
        mean_dxhat_xhat = per_group(dy_xhat_sum * w[:, None], G) / n
        dx = rstd * (dy * w[:, None, None] - mean_dxhat - xhat * mean_dxhat_xhat)  # (B, C, H, W)
        if weight is None:
            return dx.to(x.dtype), None, None, None, None
        dw, db = dy_xhat_sum.sum(dim=(0, 2)), dy_sum.sum(dim=(0, 2))  # (C,)
        return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype), None, None


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus the input (1x1 conv if
    channels change). Convs have no bias: each is followed by a GroupNorm (or by the residual sum
    and then one), as in the official code."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1 = GroupNorm(32, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = GroupNorm(32, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1,
                                      bias=False) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # silu is swish: x * sigmoid(x)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose scale and shift come from the quantized latent z_q
    (MAGVIT-v2's decoder conditioning):
        out = gamma(std_hw(z_q)) * GroupNorm(x) + beta(mean_hw(z_q))     (no "1 +" on the scale)
    std_hw / mean_hw are per-channel statistics over the token grid. Like the official code we use
    the *unbiased* variance (torch.var's default; the official comment says "not unbias" but the
    call is unbiased) plus eps under the square root, so released weights reproduce their outputs.
    Statistics are taken in fp32: z_q is +-1 and its variance is a difference of near-equal sums,
    which bf16 would round badly. Needs at least 2 tokens per image."""

    def __init__(self, z_channels, channels, eps=1e-6):
        super().__init__()
        self.gn = GroupNorm(32, channels, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x, z_q):
        z = z_q.float()  # (B, K, h, w)
        std = (z.var(dim=(2, 3)) + self.eps).sqrt().to(self.gamma.weight.dtype)  # (B, K)
        mean = z.mean(dim=(2, 3)).to(self.beta.weight.dtype)  # (B, K)
        scale = self.gamma(std)[:, :, None, None]  # (B, C, 1, 1)
        shift = self.beta(mean)[:, :, None, None]  # (B, C, 1, 1)
        # in x's dtype: under autocast GroupNorm computes and returns fp32, and an fp32 output
        # would make the whole decoder's residual stream fp32, which the encoder's is not (bf16,
        # the convolutions' output). Each later block would then read and write twice the bytes,
        # and compile a second graph for the ResBlock shapes it shares with the encoder
        return (scale * self.gn(x) + shift).to(x.dtype)


def depth_to_space(x):
    """(B, 4C, H, W) -> (B, C, 2H, 2W) in the official (TensorFlow "DCR") channel order: input
    channel (i*2 + j)*C + c lands at output pixel (2h + i, 2w + j), channel c. nn.PixelShuffle uses
    c*4 + i*2 + j instead, which would scramble the released upsampler weights, hence this function.
    The result has the memory layout of the input (NCHW or channels_last), in one copy."""
    B, C4, H, W = x.shape
    C = C4 // 4
    if is_channels_last(x):
        # the memory is (B, H, W, i, j, C): one permute of it to (B, H, i, W, j, C), then read as
        # (B, 2H, 2W, C), is the output's channels_last memory. The two-step NCHW route below
        # would copy twice, forward and backward: a channels_last network fed NCHW activations
        # converts them back at every later conv
        y = x.permute(0, 2, 3, 1).reshape(B, H, W, 2, 2, C)  # a view
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, C)  # the copy
        return y.permute(0, 3, 1, 2)  # (B, C, 2H, 2W), channels_last strides
    y = x.reshape(B, 2, 2, C, H, W)  # (B, i, j, C, H, W)
    y = y.permute(0, 3, 4, 1, 5, 2)  # (B, C, H, i, W, j)
    return y.reshape(B, C, 2 * H, 2 * W)  # the copy, NCHW-contiguous


class Upsampler(nn.Module):
    """conv3x3 C -> 4C, then depth-to-space: 2x resolution, C channels (the
    decoder's learned upsampling)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x):
        return depth_to_space(self.conv1(x))


class Encoder(nn.Module):
    """image (B, 3, H, W) -> latent z (B, K, H/f, W/f), f = 2^(len(ch_mult) - 1).
    Levels of num_res_blocks ResBlocks at ch*ch_mult[i] channels, a strided 3x3 conv between levels,
    then num_res_blocks middle ResBlocks and GroupNorm -> swish -> 1x1 conv to K channels.
    Names (down[i].block[j], down[i].downsample, mid_block, ...) are those of
    the official checkpoints."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        in_ch = ch
        for i, mult in enumerate(ch_mult):
            level = nn.ModuleDict({'block': nn.ModuleList()})
            for _ in range(num_res_blocks):
                level['block'].append(ResBlock(in_ch, ch * mult))
                in_ch = ch * mult
            if i < len(ch_mult) - 1:
                level['downsample'] = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList([ResBlock(in_ch, in_ch) for _ in range(num_res_blocks)])
        self.norm_out = GroupNorm(32, in_ch, eps=1e-6)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for block in level['block']:
                x = block(x)
            if 'downsample' in level:
                x = level['downsample'](x)  # (B, C, H/2, W/2)
        for block in self.mid_block:
            x = block(x)
        return self.head(x)  # (B, K, H/f, W/f)

    def head(self, x):
        # GroupNorm -> swish -> 1x1 conv: a method of its own, so that compile_blocks can fuse the
        # three (eager, the swish and the bf16 cast for the conv each make an fp32 pass)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """quantized latent (B, K, h, w) -> image (B, 3, h*f, w*f). conv3x3 K -> ch*ch_mult[-1],
    num_res_blocks middle ResBlocks, then per level from the deepest: AdaptiveGroupNorm conditioned
    on z_q, num_res_blocks ResBlocks, and (except at the last level) an Upsampler; GroupNorm ->
    swish -> conv3x3 to RGB. up[i] / adaptive[i] are indexed like the encoder's down[i] (up[0] runs
    last), as in the official code."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        in_ch = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(in_ch, in_ch) for _ in range(num_res_blocks)])
        up, adaptive = [], []
        for i in reversed(range(len(ch_mult))):
            adaptive.insert(0, AdaptiveGroupNorm(z_channels, in_ch))
            level = nn.ModuleDict({'block': nn.ModuleList()})
            for _ in range(num_res_blocks):
                level['block'].append(ResBlock(in_ch, ch * ch_mult[i]))
                in_ch = ch * ch_mult[i]
            if i > 0:
                level['upsample'] = Upsampler(in_ch)
            up.insert(0, level)
        self.up, self.adaptive = nn.ModuleList(up), nn.ModuleList(adaptive)
        self.norm_out = GroupNorm(32, in_ch, eps=1e-6)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    def forward(self, z_q):
        x = self.conv_in(z_q)  # (B, C, h, w)
        for block in self.mid_block:
            x = block(x)
        for i in reversed(range(len(self.up))):
            x = self.adaptive[i](x, z_q)
            for block in self.up[i]['block']:
                x = block(x)
            if 'upsample' in self.up[i]:
                x = self.up[i]['upsample'](x)  # (B, C, 2h, 2w)
        return self.head(x)  # (B, 3, H, W)

    def head(self, x):  # GroupNorm -> swish -> conv3x3, compiled by compile_blocks as the encoder's
        return self.conv_out(F.silu(self.norm_out(x)))


# -----------------------------------------------------------------------------
# config and presets


@dataclass
class TokenizerConfig:
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 1, 2, 2, 4)  # one entry per level; downsampling f = 2^(len - 1)
    num_res_blocks: int = 4  # ResBlocks per level, and in the middle
    num_bits: int = 18  # K: latent channels = bits per token, 2^K codes
    image_size: int = 256  # the training resolution (the network itself takes any multiple of f)


PRESETS = {
    # 256px -> 16x16 tokens, 115.13M
    'imagenet256': TokenizerConfig(ch_mult=(1, 1, 2, 2, 4), image_size=256),
    # 128px -> 16x16 tokens, 112.02M
    'imagenet128': TokenizerConfig(ch_mult=(1, 2, 2, 4), image_size=128),
    # 64px -> 16x16 tokens, 36.16M: not a released model. The paper's grid of 16x16 tokens at 64px
    # (Tiny-ImageNet): the 128px model one level short, without its 512-wide 8x8 level, and 10%
    # fewer FLOPs per 64px image than imagenet128 (which makes only 8x8 tokens of it)
    'tin64': TokenizerConfig(ch_mult=(1, 2, 2), image_size=64),
    # 32px -> 8x8, CPU minutes
    'tiny': TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, image_size=32),
}

# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer(nn.Module):
    """Encoder + LFQ + decoder. Images are (B, 3, H, W) in [-1, 1], H and W
    multiples of `downsample`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        args = (config.ch, tuple(config.ch_mult), config.num_res_blocks, config.num_bits)
        self.encoder = Encoder(*args)
        self.quantizer = LFQ(config.num_bits)
        self.decoder = Decoder(*args)

    @property
    def downsample(self):
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x):
        """x (B, 3, H, W) -> z_q (B, K, H/f, W/f) in {-1, +1}, indices (B, H/f, W/f) int64, losses
        (see LFQ)."""
        f = self.downsample
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the downsampling factor {f}")
        return self.quantizer(self.encoder(x))

    def decode(self, z_q):
        """z_q (B, K, h, w) -> images (B, 3, h*f, w*f), not clamped."""
        return self.decoder(z_q)

    def decode_indices(self, indices):
        """indices (B, h, w) int64 -> images (B, 3, h*f, w*f): tokens to their +-1 code map, then
        decode."""
        z_q = indices_to_codes(indices, self.config.num_bits).permute(0, 3, 1, 2)  # (B, K, h, w)
        z_q = z_q.contiguous()
        return self.decode(z_q.to(self.decoder.conv_in.weight.dtype))

    def forward(self, x):
        z_q, indices, losses = self.encode(x)
        return self.decode(z_q), indices, losses

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(TokenizerConfig(**{**asdict(PRESETS[name]), **overrides}))

    @classmethod
    def from_checkpoint(cls, path_or_state, ema=True):
        """Build from our checkpoint ({'kind': 'tokenizer', 'config', 'model', optional 'ema'}) or
        from an official Open-MAGVIT2 one (a Lightning dict with 'state_dict'), given as a path or
        as the loaded dict. Which of the two it is comes from its keys. ema=True takes the EMA
        weights when the checkpoint has them. A released file that holds pickled Lightning objects
        must be named 'open-magvit2:PATH': utils.load_checkpoint unpickles only such paths in
        full."""
        ckpt = path_or_state
        if isinstance(ckpt, str):
            ckpt = load_checkpoint(ckpt)
        ours = isinstance(ckpt, dict) and ckpt.get('kind') == 'tokenizer'
        if not (ours or isinstance(ckpt, dict) and 'state_dict' in ckpt):
            kind = ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"not a tokenizer checkpoint (kind {kind!r}): expected ours (kind "
                             "'tokenizer') or an official Open-MAGVIT2 Lightning checkpoint "
                             "(with 'state_dict')")
        if ckpt.get('kind') == 'tokenizer':
            model = cls(TokenizerConfig(**ckpt['config']))
            state = ckpt['ema'] if ema and ckpt.get('ema') is not None else ckpt['model']
        else:
            state = convert_official_tokenizer(ckpt['state_dict'], ema=ema)
            # the architecture is read off the tensor shapes; both released models make 16x16 tokens
            ch = state['encoder.conv_in.weight'].shape[0]
            # keys look like encoder.down.{level}.block.{i}... and encoder.mid_block.{j}...: count
            # the levels / blocks
            levels = 1 + max(int(k.split('.')[2]) for k in state if k.startswith('encoder.down.'))
            ch_mult = tuple(state[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in range(levels))
            blocks = len({k.split('.')[2] for k in state if k.startswith('encoder.mid_block.')})
            model = cls(TokenizerConfig(ch, ch_mult, blocks,
                                        state['encoder.conv_out.weight'].shape[0],
                                        image_size=16 * 2 ** (levels - 1)))
        model.load_state_dict(state, strict=True)  # lists any missing / unexpected keys
        return model


# -----------------------------------------------------------------------------
# official checkpoints


def convert_official_tokenizer(state_dict, ema=True):
    """Official Open-MAGVIT2 Lightning `state_dict` -> `Tokenizer.state_dict()` layout.

        encoder.*  -> encoder.*     identity: our modules carry the official names and shapes
        decoder.*  -> decoder.*     identity, including Upsampler.conv1: our depth_to_space uses the official
                                    channel order, so no weight is permuted
        model_ema.<name with the dots removed> -> <name>   with ema=True (LitEma stores one buffer per parameter,
                                    named without dots, e.g. model_ema.encoderconv_inweight ->
                                    encoder.conv_in.weight)
        quantize.*, loss.* (discriminator, LPIPS), model_ema.loss*, model_ema.decay,
        model_ema.num_updates -> dropped
                                    (LFQ has no learned state; the rest is only for training)
    Keys outside these groups, or EMA entries that are missing or left over, raise a KeyError that
    lists them.
    """
    known = ('encoder.', 'decoder.', 'quantize.', 'loss.', 'model_ema.')
    unknown = [k for k in state_dict if not k.startswith(known)]
    if unknown:
        raise KeyError(f"not an Open-MAGVIT2 tokenizer checkpoint, unknown keys: {unknown[:20]}")
    raw = {k: v for k, v in state_dict.items() if k.startswith(('encoder.', 'decoder.'))}
    if not ema:
        return raw
    # encoder/decoder have parameters only
    ema_name = {k: 'model_ema.' + k.replace('.', '') for k in raw}
    missing = [e for e in ema_name.values() if e not in state_dict]
    if missing:
        raise KeyError(f"checkpoint has no EMA weights for {len(missing)} tensors, e.g. {missing[:10]}; "
                       f"load with ema=False (--no-ema) to use the raw weights")
    ignored = set(ema_name.values()) | {'model_ema.decay', 'model_ema.num_updates'}
    leftover = [k for k in state_dict if k.startswith('model_ema.') and k not in ignored
                and not k.startswith('model_ema.loss')]
    if leftover:
        raise KeyError(f"EMA entries that match no encoder/decoder parameter: {leftover[:20]}")
    return {k: state_dict[e] for k, e in ema_name.items()}


# Inductor options of every compiled tokenizer graph (compile_blocks; train_tok.py's D and LPIPS):
# one launch configuration per element-wise kernel, from Inductor's size heuristic, instead of
# several that it builds and then benchmarks on the first call. Element-wise kernels here are large
# and contiguous, and on the 256px encoder's ResBlocks the heuristic's choice ran as fast; the 28
# graphs of the 256px step compile sooner (bench.py's compile_s and compile_phases)
INDUCTOR_OPTIONS = {'triton.autotune_pointwise': False}


def compile_blocks(model, **compile_options):
    """torch.compile each repeated block of a Tokenizer in place (ResBlock, AdaptiveGroupNorm, the
    LFQ loss), and the encoder's and decoder's heads (GroupNorm -> swish -> conv, so that their
    norm, too, runs GroupNorm's channels_last form, fused with the swish). Blocks of one structure,
    size and input dtype share one compiled graph, so a preset compiles in a dozen small graphs
    instead of one graph of the whole network (minutes). The Upsamplers stay eager: a conv and
    depth_to_space's one copy, which a compiled graph would not make faster, and each of their
    four sizes would be one more graph to compile.
    Within a block, Inductor fuses GroupNorm, swish and the casts around the cuDNN convolutions.
    compile_options go to torch.compile (the tests capture the same graphs with backend='aot_eager';
    bench.py compares the compiled step's losses with the eager ones)."""
    # Fixed sizes: each block shape (a level's channels and resolution) gets its own graph, and
    # its kernels are specialised for those sizes. A training run sees each shape at one size, so
    # fixed sizes cost no recompiles while training (tin64: 13 graphs)
    compile_options.setdefault('dynamic', False)
    if compile_options.get('backend', 'inductor') == 'inductor':
        # channels_last inside the graphs, forward and backward. Inductor decides this per graph,
        # and its heuristic keeps NCHW for graphs without a forward convolution (every backward
        # graph: the backward has convolution_backward nodes instead) and for some channel
        # counts, so each conv backward converted its NHWC operands to NCHW and back, one copy
        # per operand. Forcing it removes those copies. It needs fixed sizes: with symbolic
        # sizes, Inductor's forced layout fails its own stride checks (torch 2.11)
        compile_options.setdefault('options', {'force_layout_optimization': True,
                                               **INDUCTOR_OPTIONS})
    # one ResBlock.forward serves every block; each shape and variant it needs (with or without
    # the 1x1 shortcut, fp32 or bf16 input) counts towards Dynamo's limit of 8 compilations per
    # function, past which it falls back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in model.modules():
        if isinstance(module, (ResBlock, AdaptiveGroupNorm, LFQ)):
            module.compile(**compile_options)
    # the heads: Encoder.head and Decoder.head are two functions, so each compiles for its own
    # fixed sizes. Bound to the instance as a method, so that a deepcopy of the model binds its copy
    for part in (model.encoder, model.decoder):
        part.head = types.MethodType(torch.compile(type(part).head, **compile_options), part)
    return model


# -----------------------------------------------------------------------------
# python tokenizer.py --reconstruct IMAGE --ckpt PATH


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description="reconstruct one image through a tokenizer")
    parser.add_argument('--reconstruct', required=True, metavar='IMAGE',
                        help="any image Pillow can read")
    parser.add_argument('--ckpt',
                        help="our checkpoint, or an official one (open-magvit2:PATH or detected by keys)")
    parser.add_argument('--preset', default='imagenet256',
                        help="untrained model of this preset when no --ckpt")
    parser.add_argument('--no-ema', dest='ema', action='store_false',
                        help="raw weights instead of the EMA ones")
    parser.add_argument('--size', type=int,
                        help="center crop and resize to this (default: the model's image_size)")
    parser.add_argument('--out', default='rec.png')
    parser.add_argument('--device', default='cuda', choices=DEVICES)
    args = parser.parse_args()

    env = setup(args.device)
    if args.ckpt:
        model = Tokenizer.from_checkpoint(args.ckpt, ema=args.ema)
    else:
        print(f"no --ckpt: untrained {args.preset} tokenizer, the reconstruction will be noise")
        model = Tokenizer.from_preset(args.preset)
    model = model.to(env.device).eval()
    try:
        # 16-bit and transparent files converted as in training
        image = open_image(args.reconstruct)
    except (OSError, ValueError) as e:  # missing file, not an image, truncated data
        raise SystemExit(f"cannot read image {args.reconstruct}: {e}")
    size = args.size or model.config.image_size
    if size % model.downsample:
        raise SystemExit(f"--size {size} is not a multiple of the downsampling factor {model.downsample}")
    # the evaluation transform: resize the short side, centre crop
    # (1, 3, size, size)
    x = crop_image(image, size, train=False, rng=None, hflip=False)[None].to(env.device)
    with torch.no_grad():
        x_rec, indices, _ = model(x)
    print(f"{tuple(indices.shape[1:])} tokens, {indices.unique().numel()} distinct codes; "
          # MAX^2 = 2^2 on [-1, 1]
          f"PSNR {10 * torch.log10(4 / F.mse_loss(x_rec.clamp(-1, 1), x)).item():.2f} dB")
    print(f"wrote {save_image_grid(torch.cat([x, x_rec]), args.out, nrow=2)} (input | reconstruction)")
