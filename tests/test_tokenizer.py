"""Tests for tokenizer.py: shapes, decode paths, parameter counts of the official presets, Adaptive
GroupNorm and depth-to-space against hand-written references, and loading official Open-MAGVIT2
checkpoints (random weights in the official layout, written here)."""
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from tokenizer import (AdaptiveGroupNorm, GroupNorm, Tokenizer, TokenizerConfig,
                       convert_official_tokenizer, depth_to_space)
from utils import save_checkpoint
from conftest import ROOT



def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('hw', [(32, 32), (48, 64)])
def test_tiny_shapes(hw):
    torch.manual_seed(0)
    model = Tokenizer.from_preset('tiny')
    assert model.downsample == 4
    x = torch.rand(2, 3, *hw) * 2 - 1
    z_q, indices, losses = model.encode(x)
    h, w = hw[0] // 4, hw[1] // 4
    assert z_q.shape == (2, 18, h, w) and indices.shape == (2, h, w) and indices.dtype == torch.int64
    assert set(z_q.unique().tolist()) <= {-1.0, 1.0}
    assert set(losses) == {'per_sample_entropy', 'codebook_entropy', 'entropy_loss', 'commitment_loss'}
    x_rec, indices2, _ = model(x)
    assert x_rec.shape == x.shape and torch.equal(indices, indices2)
    # gradients reach the encoder through the straight-through estimator
    x_rec.square().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        model.encode(torch.zeros(1, 3, 30, 32))


def test_decode_indices_equals_decode():
    torch.manual_seed(0)
    model = Tokenizer.from_preset('tiny').eval()
    with torch.no_grad():
        z_q, indices, _ = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert torch.equal(model.decode_indices(indices), model.decode(z_q))


def test_channels_last_matches():
    torch.manual_seed(0)
    model = Tokenizer.from_preset('tiny').eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref, ref_idx, _ = model(x)
        model = model.to(memory_format=torch.channels_last)
        out, idx, _ = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(idx, ref_idx) and torch.allclose(out, ref, atol=1e-4)


def test_tin64_makes_the_papers_token_grid_at_64px():
    """tin64: 64px -> 16x16 tokens (4x downsampling), 36.16M parameters, as its preset says."""
    model = Tokenizer.from_preset('tin64')
    assert model.downsample == 4 and model.config.image_size == 64
    assert abs(n_params(model) / 1e6 - 36.16) < 0.01
    with torch.no_grad():
        z_q, indices, _ = model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert indices.shape == (1, 16, 16) and z_q.shape == (1, 18, 16, 16)


@pytest.mark.parametrize('name, total, enc, dec', [('imagenet256', 115.13, 49.75, 65.38),
                                                   ('imagenet128', 112.02, 48.42, 63.60)])
def test_official_parameter_counts(name, total, enc, dec):
    with torch.device('meta'):  # no memory, no init time
        model = Tokenizer.from_preset(name)
    got = [n_params(m) / 1e6 for m in (model, model.encoder, model.decoder)]
    print(f"{name}: {got[0]:.2f}M (encoder {got[1]:.2f}M, decoder {got[2]:.2f}M); official {total}M ({enc}M, {dec}M)")
    for g, want in zip(got, (total, enc, dec)):
        assert abs(g - want) / want < 0.005


def test_official_key_names_and_shapes():
    """A few keys of the released 256px checkpoint, listed by hand from the official
    improved_model.py."""
    with torch.device('meta'):
        shapes = {k: tuple(v.shape) for k,
                  v in Tokenizer.from_preset('imagenet256').state_dict().items()}
    expected = {
        'encoder.conv_in.weight': (128, 3, 3, 3),
        'encoder.down.0.block.3.conv2.weight': (128, 128, 3, 3),
        'encoder.down.2.block.0.nin_shortcut.weight': (256, 128, 1, 1),
        'encoder.down.3.downsample.bias': (256,),
        'encoder.mid_block.3.norm2.weight': (512,),
        'encoder.norm_out.bias': (512,),
        'encoder.conv_out.weight': (18, 512, 1, 1),
        'decoder.conv_in.weight': (512, 18, 3, 3),
        'decoder.mid_block.0.conv1.weight': (512, 512, 3, 3),
        'decoder.adaptive.4.gamma.weight': (512, 18),
        # runs last; its input comes from level 1 (128 channels)
        'decoder.adaptive.0.beta.bias': (128,),
        'decoder.up.4.upsample.conv1.weight': (2048, 512, 3, 3),
        'decoder.up.1.block.0.nin_shortcut.weight': (128, 256, 1, 1),
        'decoder.up.1.upsample.conv1.bias': (512,),
        'decoder.conv_out.weight': (3, 128, 3, 3),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, k
    assert not any('upsample' in k for k in shapes if k.startswith('decoder.up.0.'))
    assert not any('downsample' in k for k in shapes if k.startswith('encoder.down.4.'))
    # no state there
    assert not any(k.startswith(('quantizer.', 'decoder.adaptive.0.gn')) for k in shapes)
    for name in ('imagenet256', 'imagenet128'):  # LitEma's dot-free names must stay unambiguous
        with torch.device('meta'):
            keys = list(Tokenizer.from_preset(name).state_dict())
        assert len({k.replace('.', '') for k in keys}) == len(keys)


def test_adaptive_group_norm_reference():
    torch.manual_seed(0)
    agn = AdaptiveGroupNorm(18, 64)
    x = torch.randn(2, 64, 6, 5) * 3 + 1
    z_q = torch.randn(2, 18, 4, 3).sign()
    out = agn(x, z_q).double()  # the reference below runs in float64
    x, z_q, agn = x.double(), z_q.double(), agn.double()
    ref = torch.empty_like(x)
    for b in range(2):
        zz = z_q[b].reshape(18, -1)
        n = zz.shape[1]
        mean = zz.sum(1) / n
        # unbiased, like the official code
        std = ((((zz - mean[:, None]) ** 2).sum(1) / (n - 1)) + 1e-6).sqrt()
        scale = agn.gamma.weight @ std + agn.gamma.bias  # (64,)
        shift = agn.beta.weight @ mean + agn.beta.bias
        for g in range(32):  # GroupNorm(32) by hand: 2 channels per group, biased variance
            xs = x[b, 2 * g:2 * g + 2]
            normed = (xs - xs.mean()) / (((xs - xs.mean()) ** 2).mean() + 1e-6).sqrt()
            ref[b, 2 * g:2 * g + 2] = scale[2 * g:2 * g + 2, None,
                                            None] * normed + shift[2 * g:2 * g + 2, None, None]
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('size', [(6, 5), (64, 64)])  # statistics over 1 band of rows, and over 4
# float64: the two forms agree to far below fp32's rounding, so that a wrong term cannot hide in it
@pytest.mark.parametrize('dtype, atol', [(torch.float32, 1e-4), (torch.float64, 1e-11)])
def test_group_norm_keeps_channels_last(affine, size, dtype, atol):
    """GroupNorm's written-out form (GroupNormNHWC, what torch.compile traces for NHWC input) gives
    F.group_norm's values and gradients (x, weight, bias), in NHWC; eager, it is F.group_norm
    itself."""
    torch.manual_seed(0)
    gn = GroupNorm(8, 32, eps=1e-6, affine=affine).to(dtype)
    if affine:  # not the 1 / 0 of a fresh norm, so that a swapped weight and bias would show
        torch.nn.init.normal_(gn.weight)
        torch.nn.init.normal_(gn.bias)
    # channels of one group with different means: the group's variance includes their spread
    x = torch.randn(2, 32, *size, dtype=dtype) * 3 + 1 + torch.randn(1, 32, 1, 1, dtype=dtype) * 2
    x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    x_ref = x.detach().contiguous().requires_grad_(True)  # NCHW
    graphs = []

    def backend(gm, example_inputs):  # runs the traced graph as it is, no fusion
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    y = torch.compile(gn, backend=backend)(x)
    y_ref = F.group_norm(x_ref, 8, gn.weight, gn.bias, 1e-6)
    # written out, with its own backward
    assert 'autograd_function_apply' in graphs[0].code and 'group_norm' not in graphs[0].code
    grad = torch.randn_like(y)  # NHWC, as a convolution's backward hands it on
    grads = torch.autograd.grad(y, [x] + list(gn.parameters()), grad)  # weight, bias if affine
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + list(gn.parameters()), grad)
    torch._dynamo.reset()
    assert y.dtype == dtype and torch.allclose(y, y_ref, atol=atol / 10)
    assert all(torch.allclose(g, g_ref, atol=atol) for g, g_ref in zip(grads, grads_ref))
    for t in (y, grads[0]):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    assert torch.equal(gn(x), F.group_norm(x, 8, gn.weight, gn.bias, 1e-6))  # eager


def test_depth_to_space_official_order():
    B, C, H, W = 2, 3, 4, 5
    x = torch.randn(B, 4 * C, H, W)
    out = depth_to_space(x)
    assert out.shape == (B, C, 2 * H, 2 * W)
    for i in range(2):
        for j in range(2):
            # official channel (i*2 + j)*C + c -> pixel (2h + i, 2w + j), channel c
            for c in range(C):
                assert torch.equal(out[:, c, i::2, j::2], x[:, (i * 2 + j) * C + c])
    assert not torch.equal(out, F.pixel_shuffle(x, 2))  # PixelShuffle's order differs
    cl = depth_to_space(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(cl, out)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert out.is_contiguous()  # NCHW in, NCHW out


def test_channels_last_network_keeps_its_layout():
    """Every 4-d activation of a channels_last tokenizer is channels_last: an NCHW one in between
    (as depth_to_space's reshape makes) would be converted back at every later convolution."""
    model = Tokenizer.from_preset('tiny').eval().to(memory_format=torch.channels_last)
    seen = []

    def record(module, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        seen.extend((type(module).__name__, t) for t in outputs
                    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1)
    for module in model.modules():
        module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert {name for name, _ in seen} >= {'Upsampler', 'AdaptiveGroupNorm', 'ResBlock', 'Conv2d'}
    nchw = [name for name, t in seen if not t.is_contiguous(memory_format=torch.channels_last)]
    assert not nchw, f"NCHW activations after {sorted(set(nchw))}"


# -----------------------------------------------------------------------------
# official checkpoints


def fake_official_state_dict(config, seed=0):
    """Random tensors under the official Lightning key names: raw weights, LitEma copies (dots
    removed), loss.*."""
    gen = torch.Generator().manual_seed(seed)
    # == official names (test above)
    shapes = {k: v.shape for k, v in Tokenizer(config).state_dict().items()}
    sd = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    sd.update({'model_ema.' + k.replace('.', ''): torch.randn(s, generator=gen) for k,
               s in shapes.items()})
    sd.update({'loss.discriminator.main.0.weight': torch.randn(8, 3, 4, 4),
               'loss.logvar': torch.zeros(()),
               'model_ema.lossdiscriminatormain0weight': torch.randn(8, 3, 4, 4),
               'model_ema.decay': torch.tensor(0.999), 'model_ema.num_updates': torch.tensor(1000)})
    return sd


@pytest.fixture
def small_config():
    return TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, num_bits=18, image_size=32)


def test_convert_official_ema_and_raw(small_config):
    sd = fake_official_state_dict(small_config)
    for ema in (True, False):
        model = Tokenizer.from_checkpoint({'state_dict': sd, 'epoch': 3}, ema=ema)
        assert (model.config.ch, tuple(model.config.ch_mult), model.config.num_res_blocks) == (32, (1, 2), 2)
        for k, v in model.state_dict().items():  # every tensor where it belongs
            want = sd['model_ema.' + k.replace('.', '')] if ema else sd[k]
            assert torch.equal(v, want), k


def test_official_upsampler_weights_through_our_module(small_config):
    """An official upsampler conv that copies channel c, times (i*2+j+1), into official channel
    (i*2+j)*C + c must put that value at output pixel (2h+i, 2w+j), channel c, of our decoder's
    upsampler."""
    sd = fake_official_state_dict(small_config)
    C = 32 * 2  # decoder.up.1 works at ch * ch_mult[1]
    weight, bias = torch.zeros(4 * C, C, 3, 3), torch.zeros(4 * C)
    for i in range(2):
        for j in range(2):
            for c in range(C):
                weight[(i * 2 + j) * C + c, c, 1, 1] = i * 2 + j + 1
    conv_in = torch.zeros(32, 3, 3, 3)
    # official encoder.conv_in as identity on the first 3 channels
    conv_in[:3, :, 1, 1] = torch.eye(3)
    sd.update({'decoder.up.1.upsample.conv1.weight': weight,
               'decoder.up.1.upsample.conv1.bias': bias,
               'encoder.conv_in.weight': conv_in})
    model = Tokenizer.from_checkpoint({'state_dict': sd}, ema=False)
    x = torch.randn(1, C, 3, 4)
    out = model.decoder.up[1]['upsample'](x)
    for i in range(2):
        for j in range(2):
            assert torch.allclose(out[:, :, i::2, j::2], (i * 2 + j + 1) * x)
    image = torch.randn(1, 3, 8, 8)
    assert torch.allclose(model.encoder.conv_in(image)[:, :3], image, atol=1e-6)


def test_truncated_or_wrong_official_checkpoint(small_config, tmp_path):
    sd = fake_official_state_dict(small_config)
    no_ema = {k: v for k, v in sd.items() if k != 'model_ema.decoderconv_outweight'}
    with pytest.raises(KeyError, match='model_ema.decoderconv_outweight'):
        Tokenizer.from_checkpoint({'state_dict': no_ema})
    Tokenizer.from_checkpoint({'state_dict': no_ema}, ema=False)  # the raw weights are complete
    truncated = {k: v for k, v in sd.items() if 'conv_out' not in k or 'encoder' in k}
    with pytest.raises(RuntimeError, match=r'decoder\.conv_out\.weight'):
        Tokenizer.from_checkpoint({'state_dict': truncated})
    with pytest.raises(KeyError, match='transformer.wte.weight'):
        Tokenizer.from_checkpoint({'state_dict': {**sd, 'transformer.wte.weight': torch.zeros(1)}})
    with pytest.raises(KeyError, match='model_ema.encoderextraweight'):
        convert_official_tokenizer({**sd, 'model_ema.encoderextraweight': torch.zeros(1)})
    path = tmp_path / 'official.ckpt'  # from a path, with the explicit prefix
    torch.save({'state_dict': sd, 'global_step': 10}, path)
    model = Tokenizer.from_checkpoint(f'open-magvit2:{path}')
    assert torch.equal(model.encoder.conv_in.weight, sd['model_ema.encoderconv_inweight'])


def test_our_checkpoint_ema_and_raw(tmp_path):
    torch.manual_seed(0)
    raw, ema = Tokenizer.from_preset('tiny'), Tokenizer.from_preset('tiny')
    path = str(tmp_path / 'tok.pt')
    save_checkpoint(path,
                    {'kind': 'tokenizer', 'config': asdict(raw.config), 'model': raw.state_dict(),
                           'ema': ema.state_dict()})
    for use_ema, src in ((True, ema), (False, raw)):
        model = Tokenizer.from_checkpoint(path, ema=use_ema)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ValueError, match='not a tokenizer checkpoint'):
        Tokenizer.from_checkpoint({'kind': 'gpt', 'config': {}, 'model': {}})


def test_reconstruct_cli(tmp_path):
    from PIL import Image
    torch.manual_seed(0)
    model = Tokenizer.from_preset('tiny')
    ckpt = str(tmp_path / 'tok.pt')
    save_checkpoint(ckpt,
                    {'kind': 'tokenizer', 'config': asdict(model.config),
                     'model': model.state_dict()})
    Image.fromarray(torch.randint(0, 256, (40, 50, 3),
                                  dtype=torch.uint8).numpy()).save(tmp_path / 'in.png')
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    cmd = [sys.executable, os.path.join(ROOT, 'tokenizer.py'), '--ckpt', ckpt, '--device', 'cpu']
    out = tmp_path / 'rec.png'
    run = subprocess.run(cmd + ['--reconstruct', str(tmp_path / 'in.png'), '--out', str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (2 * 32 + 6, 32 + 4)  # two 32px images side by side, 2px borders
    run = subprocess.run(cmd + ['--reconstruct', str(tmp_path / 'bad.png')], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode != 0 and 'cannot read image' in run.stderr
