"""Shared test helpers: the top-level modules made importable, few CPU threads, random weight
files, small checkpoints in our and the official layout, and the slow obviously-correct twins of
the evaluation's streamed metrics (codebook usage, rFID)."""
import os
import socket
import sys
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
import pytest  # noqa: E402
import torch  # noqa: E402

import fid  # noqa: E402
from bench import write_random_inception, write_random_lpips  # noqa: E402, F401 (re-exported)
from gpt import PRESETS  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
import utils  # noqa: E402
from utils import save_checkpoint  # noqa: E402

# small CPU tests: one thread degrades gently when cores are shared
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def allow_random_inception(monkeypatch):
    """Every test's Inception weights are random (write_random_inception), not the published
    file: let fid.load_inception take them where no argument reaches it (train_tok.py's rFID).
    tests/test_fid.py passes the override itself, and removes this to test the refusal."""
    monkeypatch.setenv('NANOMAGVIT2_ALLOW_UNVERIFIED_WEIGHTS', '1')


def free_port():
    """A free local TCP port for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def read_log(out):
    """The rows of a trainer's OUT/log.csv, as dicts of strings."""
    return utils.read_log(os.path.join(out, 'log.csv'))


def save_tokenizer(path, seed=0, **overrides):
    """An untrained tiny tokenizer in our checkpoint format (what train_tok.py writes, minus the
    training state)."""
    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_preset('tiny', **overrides)
    save_checkpoint(path, {'kind': 'tokenizer', 'config': asdict(tokenizer.config),
                           'model': tokenizer.state_dict()})
    return str(path)


def fake_official_checkpoint(num_classes=7, seed=0):
    """A Lightning-style AR checkpoint with the official key names and shapes (the 'tiny' sizes),
    random values."""
    c = PRESETS['tiny']
    # the official FFN width for dim 128: find_multiple(int(2 * 4 * 128 / 3), 256)
    D, hidden = c['dim'], 512
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3
    sd = {'transformer.pre_emb.weight': randn(64, D), 'transformer.post_emb.weight': randn(4096, D),
          'transformer.class_emb.embedding_table.weight': randn(num_classes + 1, D),
          'transformer.norm.weight': 1 + randn(D), 'transformer.head.0.weight': randn(64, D),
          'transformer.head.1.weight': randn(4096, D),
          # the tokenizer rides along
          'first_stage_model.encoder.conv_in.weight': randn(128, 3, 3, 3)}
    for stack, n in (('spatial_blocks', c['n_inter']), ('factorized_blocks', c['n_intra'])):
        for i in range(n):
            p = f'transformer.{stack}.{i}.'
            sd.update({p + 'attention_norm.weight': 1 + randn(D),
                       p + 'ffn_norm.weight': 1 + randn(D),
                       p + 'attention.wqkv.weight': randn(3 * D, D) / D ** 0.5,
                       p + 'attention.wo.weight': randn(D, D) / D ** 0.5,
                       p + 'feed_forward.w1.weight': randn(hidden, D) / D ** 0.5,
                       p + 'feed_forward.w3.weight': randn(hidden, D) / D ** 0.5,
                       p + 'feed_forward.w2.weight': randn(D, hidden) / hidden ** 0.5})
    return {'state_dict': sd, 'global_step': 0}


def codebook_usage(indices, num_bits):
    """Fraction of the 2^K codes that occur at least once in `indices` (any shape): the slow twin of
    train_tok.evaluate's streamed, all-reduced code histogram."""
    return torch.unique(indices).numel() / 2 ** num_bits


def rfid(real, fake, model, batch_size=50):
    """rFID of reconstructions in one go, as the official Open-MAGVIT2 evaluation (pytorch-fid,
    'bilinear' resize): the slow twin of train_tok.evaluate's streamed moments.
    real, fake: (N, 3, H, W) float tensors in [-1, 1] (clamped, then (x + 1) / 2 without uint8
    rounding), or uint8 (N, H, W, 3) arrays such as utils.to_uint8 returns. N >= 2."""
    stats = []
    for images in (real, fake):
        images = torch.as_tensor(images)
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2)
        else:
            images = (images.clamp(-1, 1) + 1) / 2
        pool = fid.extract_features(model, images.split(batch_size), resize='bilinear')['pool']
        stats.append(fid.compute_statistics(pool, next(model.parameters()).device))
    return fid.frechet_distance(*stats[0], *stats[1])
