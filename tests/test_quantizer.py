"""LFQ: the fast exact entropy against a brute-force softmax over all 2^K codes, bit order,
factorization, STE, DDP."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import codebook_usage
from quantizer import LFQ, codes_to_indices, entropy_terms, indices_to_codes, merge_indices, split_indices


def codemap(indices, num_bits):
    """(B, H, W) indices -> (B, K, H, W) +-1 code map, as Tokenizer.decode_indices makes it."""
    return indices_to_codes(indices, num_bits).permute(0, 3, 1, 2)


def brute_force_entropies(z, temperature):
    """The official definition, written out: softmax of 2<z,c>/T over every code c in {-1,1}^K
    (float64)."""
    K = z.shape[1]
    # (2^K, K), row c is the code of index c
    codes = indices_to_codes(torch.arange(2 ** K), K).double()
    probs = F.softmax(2 * z.double() @ codes.T / temperature, dim=1)  # (N, 2^K)
    per_sample = -(probs * torch.log(probs.clamp_min(1e-300))).sum(1).mean()
    avg = probs.mean(0)
    codebook = -(avg * torch.log(avg.clamp_min(1e-300))).sum()
    return per_sample, codebook


@pytest.mark.parametrize("K", [4, 7, 10])
@pytest.mark.parametrize("scale", [0.003, 0.02, 0.3])
def test_entropy_matches_brute_force_value_and_gradient(K, scale):
    torch.manual_seed(K)
    z = (torch.randn(64, K, dtype=torch.float64) * scale).requires_grad_()
    fast_ps, fast_cb = entropy_terms(z, 0.01)
    slow_ps, slow_cb = brute_force_entropies(z, 0.01)
    # float64 in, float64 all the way: equal to the brute force up to float64 rounding
    assert fast_ps.dtype == fast_cb.dtype == torch.float64
    assert torch.allclose(fast_ps, slow_ps, rtol=1e-10, atol=1e-12)
    assert torch.allclose(fast_cb, slow_cb, rtol=1e-10, atol=1e-12)
    # gradient of the whole Eq. (3) loss w.r.t. z
    g_fast, = torch.autograd.grad(fast_ps - fast_cb, z)
    g_slow, = torch.autograd.grad(slow_ps - slow_cb, z)
    assert torch.allclose(g_fast, g_slow, rtol=1e-10, atol=1e-10 * g_slow.abs().max().item())


def test_entropy_upcasts_half_precision_only():
    torch.manual_seed(0)
    z = torch.randn(32, 6) * 0.02
    reference = entropy_terms(z.double(), 0.01)
    for dtype in (torch.float16, torch.bfloat16):  # autocast's dtypes: computed in float32
        rounded = z.to(dtype)
        terms = entropy_terms(rounded, 0.01)
        assert all(t.dtype == torch.float32 for t in terms)
        expected = entropy_terms(rounded.double(), 0.01)  # the same rounded inputs, in float64
        assert all(torch.allclose(t.double(), e, rtol=1e-5) for t, e in zip(terms, expected))
    assert all(t.dtype == torch.float32 for t in entropy_terms(z, 0.01))
    assert all(t.dtype == torch.float64 for t in reference)


def test_entropy_limits():
    K = 18
    # confident, all codes distinct -> per-sample entropy ~0, codebook entropy = ln N
    idx = torch.randperm(2 ** K)[:1024]
    z = indices_to_codes(idx, K)
    ps, cb = entropy_terms(z, 0.01)
    assert ps.item() < 1e-6 and abs(cb.item() - torch.log(torch.tensor(1024.)).item()) < 1e-4
    # z = 0: every code equally likely -> both entropies are K ln 2
    ps, cb = entropy_terms(torch.zeros(8, K), 0.01)
    assert abs(ps.item() - K * 0.6931472) < 1e-3 and abs(cb.item() - K * 0.6931472) < 1e-3


def test_bit_order_and_round_trips():
    K = 18
    codes = -torch.ones(K)
    codes[0] = 1; codes[3] = 1; codes[17] = 1  # channel 0 is the least significant bit
    assert codes_to_indices(codes).item() == 1 + 8 + 2 ** 17
    assert torch.equal(indices_to_codes(codes_to_indices(codes), K), codes)
    idx = torch.randint(0, 2 ** K, (3, 5, 7))
    assert torch.equal(codes_to_indices(indices_to_codes(idx, K)), idx)
    pre, post = split_indices(idx)
    assert pre.max() < 64 and post.max() < 4096
    assert torch.equal(merge_indices(pre, post), idx)
    # pre holds channels 0-5, post channels 6-17
    assert torch.equal(indices_to_codes(pre, 6), indices_to_codes(idx, K)[..., :6])
    assert torch.equal(indices_to_codes(post, 12), indices_to_codes(idx, K)[..., 6:])
    cmap = codemap(idx, K)  # (B, K, H, W)
    assert cmap.shape == (3, K, 5, 7) and torch.equal(codes_to_indices(cmap.permute(0, 2, 3, 1)), idx)
    assert codebook_usage(torch.tensor([0, 1, 1, 3]), 2) == 0.75


def test_lfq_forward_ste_and_commitment():
    lfq = LFQ(num_bits=6).train()
    z = torch.randn(2, 6, 4, 4, requires_grad=True)
    z_q, idx, losses = lfq(z)
    assert set(torch.unique(z_q.detach()).tolist()) <= {-1.0, 1.0}
    bit_weights = 2 ** torch.arange(6)[:, None, None]  # (K, 1, 1): channel k is worth 2^k (Eq. 2)
    assert torch.equal(idx, ((z.detach() > 0).long() * bit_weights).sum(1))
    assert torch.equal(z_q, codemap(idx, 6))
    # zero maps to -1
    z0, _, _ = lfq(torch.zeros(1, 6, 1, 1))
    assert (z0 == -1).all()
    # straight-through: d(sum z_q)/dz = 1
    z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    expected = ((z.detach() - torch.sign(z.detach())) ** 2).mean()
    assert torch.allclose(losses['commitment_loss'], expected)
    # the sign of Eq. (3): lower per-sample entropy (confident bits), higher codebook entropy (all
    # codes used)
    assert torch.allclose(losses['entropy_loss'], losses['per_sample_entropy'] - losses['codebook_entropy'])
    lfq.eval()
    _, _, losses = lfq(z)
    assert losses['entropy_loss'].item() == 0


# ------------------------------------------------------------------ DDP:
# global batch entropy, gloo, 2 processes

def _ddp_worker(rank, world_size, store_path, x_all, result_path):
    import torch.distributed as dist
    # a file store, not TCP: no port to race for, and no store server that dies with rank 0 while
    # rank 1 still exits
    dist.init_process_group('gloo', init_method=f'file://{store_path}', rank=rank,
                            world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(3, 8, 1)
    model = torch.nn.parallel.DistributedDataParallel(proj)
    lfq = LFQ(num_bits=8).train()
    x = x_all.chunk(world_size)[rank]
    _, _, losses = lfq(model(x))
    losses['entropy_loss'].backward()
    # the per-sample term is a local mean; averaged over ranks (as DDP averages gradients) it is the
    # global mean
    loss = losses['entropy_loss'].detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({'loss': loss / world_size, 'cb': losses['codebook_entropy'].detach(),
                    'grad': proj.weight.grad.clone()}, result_path)
    del model  # DDP's reducer must go before its process group
    dist.barrier()  # no rank leaves while the other still talks to it (gloo aborts otherwise)
    dist.destroy_process_group()
    # skip interpreter teardown: with torch 2.13 + gloo it sometimes aborts (SIGABRT) after the work
    os._exit(0)


def test_ddp_entropy_equals_single_process(tmp_path):
    x_all = torch.randn(4, 3, 4, 4) * 0.05
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(3, 8, 1)
    _, _, ref = LFQ(num_bits=8).train()(proj(x_all))
    ref['entropy_loss'].backward()
    path = str(tmp_path / 'rank0.pt')
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'store'), x_all, path), nprocs=2, join=True)
    got = torch.load(path)
    assert torch.allclose(got['cb'], ref['codebook_entropy'], atol=1e-5)
    assert torch.allclose(got['loss'], ref['entropy_loss'], atol=1e-5)
    assert torch.allclose(got['grad'], proj.weight.grad, rtol=1e-4, atol=1e-6)
