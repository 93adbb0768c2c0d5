"""gpt.py: causality, sub-token dependency, KV-cache decoding vs. full forward (float64), CFG,
top-k/top-p support, class dropout, Table 1 parameter counts, overfit + generate, and loading an
official-layout checkpoint against a slow re-implementation of the official forward pass written on
the official key names."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, PRESETS, convert_official_gpt, pair_attention, rope_2d, sample_from_logits, top_k_top_p_filter
from conftest import fake_official_checkpoint
from quantizer import split_indices

SMALL = dict(block_size=16, num_classes=5, dim=32, n_head=2, n_inter=2, n_intra=2, dropout=0.0)


def small_model(seed=0, **overrides):
    """A float64 model whose zero-initialised heads are made random, so that logits depend on
    everything."""
    torch.manual_seed(seed)
    model = GPT.from_preset('tiny', **{**SMALL, **overrides}).double().eval()
    torch.nn.init.normal_(model.head_pre.weight, std=0.5)
    torch.nn.init.normal_(model.head_post.weight, std=0.5)
    return model


def random_tokens(B, T, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(model.head_pre.out_features, (B, T), generator=g)
    post = torch.randint(model.head_post.out_features, (B, T), generator=g)
    labels = torch.randint(model.config.num_classes, (B,), generator=g)
    return pre, post, labels


@pytest.mark.parametrize("name, millions", [('B', 343.6), ('L', 804.4), ('XL', 1486.7)])
def test_parameter_counts_match_table_1(name, millions):
    with torch.device('meta'):
        model = GPT.from_preset(name, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.003, count


def test_zero_heads_give_uniform_first_loss():
    torch.manual_seed(0)
    model = GPT.from_preset('tiny', **SMALL)
    pre, post, labels = random_tokens(2, 16, model)
    _, _, loss = model(pre, post, labels)
    assert abs(loss.item() - (math.log(64) + math.log(4096))) < 1e-5


def test_causality_and_sub_token_dependency():
    model = small_model()
    pre, post, labels = random_tokens(2, 16, model)
    lp, lq, _ = model(pre, post, labels)
    t = 6
    # changing post_t: every logit at positions <= t is unchanged, every later position changes
    post2 = post.clone()
    post2[:, t] = (post2[:, t] + 1) % 4096
    lp2, lq2, _ = model(pre, post2, labels)
    assert torch.equal(lp[:, :t + 1], lp2[:, :t + 1]) and torch.equal(lq[:, :t + 1], lq2[:, :t + 1])
    assert ((lp[:, t + 1:] - lp2[:, t + 1:]).abs().amax(-1) > 1e-6).all()
    assert ((lq[:, t + 1:] - lq2[:, t + 1:]).abs().amax(-1) > 1e-6).all()
    # changing pre_t: pre logits at t do not see it, post logits at t do (next sub-token prediction)
    pre2 = pre.clone()
    pre2[:, t] = (pre2[:, t] + 1) % 64
    lp2, lq2, _ = model(pre2, post, labels)
    assert torch.equal(lp[:, :t + 1], lp2[:, :t + 1]) and torch.equal(lq[:, :t], lq2[:, :t])
    assert ((lq[:, t:] - lq2[:, t:]).abs().amax(-1) > 1e-6).all()
    assert ((lp[:, t + 1:] - lp2[:, t + 1:]).abs().amax(-1) > 1e-6).all()


def test_pair_attention_matches_sdpa_float64():
    q, k, v = torch.randn(3, 5, 4, 2, 8, dtype=torch.float64).unbind(0)  # (B, nh, 2, hs)
    torch.testing.assert_close(pair_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    # one query that sees the first key only
    bias = torch.tensor([[0.0, float('-inf')]], dtype=torch.float64)
    torch.testing.assert_close(pair_attention(q[:, :, 1:], k, v, bias), v[:, :, :1])
    torch.testing.assert_close(pair_attention(q[:, :, 1:], k, v, torch.zeros(1, 2, dtype=torch.float64)),
                               F.scaled_dot_product_attention(q[:, :, 1:], k, v))


def test_pair_attention_compiled_matches_sdpa():
    """The form training runs: pair_attention compiled by Inductor (its products and sums fused),
    forward and backward, against F.scaled_dot_product_attention in fp32."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 2, 2, 8).unbind(0)  # (B, nh, 2, hs) each
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    refs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch._dynamo.reset()
    y = torch.compile(pair_attention, dynamic=False)(*inputs)
    y_ref = F.scaled_dot_product_attention(*refs, is_causal=True)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad)
    grads_ref = torch.autograd.grad(y_ref, refs, grad)
    torch._dynamo.reset()
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def teacher_forced_logits(model, pre, post, labels, cfg_scale):
    """generate's loop with the given tokens fed back instead of sampled ones (teacher forcing),
    from the model's public pieces: the guided logits per position, (B, T, 64), (B, T, 4096)."""
    x, _ = model.start_generation(labels, None)  # caches for [cond; null]; x (2B, 1, C)
    logits_pre, logits_post = [], []
    with torch.no_grad():
        for t in range(pre.shape[1]):
            cond, uncond = model.decode_pre(x, torch.tensor([t])).chunk(2)
            logits_pre.append(uncond + cfg_scale[0] * (cond - uncond))
            cond, uncond = model.decode_post(pre[:, t].repeat(2)).chunk(2)
            logits_post.append(uncond + cfg_scale[1] * (cond - uncond))
            x = (model.pre_emb(pre[:, t]) + model.post_emb(post[:, t])).repeat(2, 1)[:, None]
    return torch.stack(logits_pre, dim=1), torch.stack(logits_post, dim=1)


def guided_forward(model, pre, post, labels, cfg_scale):
    """The same guided logits by full recomputation: GPT.forward with labels and the null class."""
    null = torch.full_like(labels, model.config.num_classes)
    with torch.no_grad():
        cond_pre, cond_post, _ = model(pre, post, labels)
        uncond_pre, uncond_post, _ = model(pre, post, null)
    return (uncond_pre + cfg_scale[0] * (cond_pre - uncond_pre),
            uncond_post + cfg_scale[1] * (cond_post - uncond_post))


def test_kv_cache_decoding_and_cfg_match_full_forward_float64():
    model = small_model()
    pre, post, labels = random_tokens(3, 16, model)
    with torch.no_grad():
        cond_pre, cond_post, _ = model(pre, post, labels)
    # scale 1: the guided logits are the conditional ones, at every position, both sub-tokens
    cache_pre, cache_post = teacher_forced_logits(model, pre, post, labels, (1.0, 1.0))
    torch.testing.assert_close(cache_pre, cond_pre, rtol=0, atol=1e-10)
    torch.testing.assert_close(cache_post, cond_post, rtol=0, atol=1e-10)
    # other scales: uncond + s * (cond - uncond), with its own scale per sub-token
    cache_pre, cache_post = teacher_forced_logits(model, pre, post, labels, (1.5, 3.0))
    full_pre, full_post = guided_forward(model, pre, post, labels, (1.5, 3.0))
    torch.testing.assert_close(cache_pre, full_pre, rtol=0, atol=1e-10)
    torch.testing.assert_close(cache_post, full_post, rtol=0, atol=1e-10)


def test_temperature_zero_is_greedy_per_sub_token():
    model = small_model()
    labels = torch.tensor([0, 3, 4])
    pre, post = model.generate(labels, cfg_scale=(1.5, 3.0), temperature=(0, 0))
    full_pre, full_post = guided_forward(model, pre, post, labels, (1.5, 3.0))
    assert torch.equal(pre, full_pre.argmax(-1)) and torch.equal(post, full_post.argmax(-1))
    # greedy pre, sampled post: every pre is its argmax, the posts are not all theirs
    pre, post = model.generate(labels, cfg_scale=(1.5, 3.0), temperature=(0, 1.0),
                               generator=torch.Generator().manual_seed(2))
    full_pre, full_post = guided_forward(model, pre, post, labels, (1.5, 3.0))
    assert torch.equal(pre, full_pre.argmax(-1)) and not torch.equal(post, full_post.argmax(-1))


def test_invalid_sampling_settings_raise():
    model = small_model()
    labels = torch.tensor([0])
    for bad in (dict(temperature=(-0.5, 1.0)), dict(top_p=0.0), dict(top_p=(1.0, 1.5))):
        for generate in (model.generate, model.generate_fast):
            with pytest.raises(ValueError):
                generate(labels, **bad)


@pytest.mark.parametrize("settings", [dict(top_p=0.9), dict(temperature=(0, 1.3), top_k=(0, 50))])
def test_fast_path_gives_the_plain_tokens(settings):
    """generate_fast runs decode_step eagerly off CUDA: the step a CUDA graph records on GPUs."""
    model = small_model()
    labels = torch.tensor([0, 3, 4])
    plain = model.generate(labels, generator=torch.Generator().manual_seed(5), **settings)
    fast = model.generate_fast(labels, generator=torch.Generator().manual_seed(5), **settings)
    assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1])


def test_compiled_step_gives_the_plain_tokens(monkeypatch):
    """compile=True traces the step as one graph (fullgraph: no break), its in-place writes
    functionalised. Inductor's code generation takes tens of seconds on CPU, so here the traced
    graph runs on AOT autograd's eager backend: the same trace and functionalisation, without the
    generated kernels (the CUDA test below runs inductor)."""
    model = small_model(n_inter=1, n_intra=1)
    labels = torch.tensor([0, 3])
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))
    plain = model.generate(labels, generator=torch.Generator().manual_seed(5), top_p=0.9)
    fast = model.generate_fast(labels, generator=torch.Generator().manual_seed(5), top_p=0.9,
                               compile=True)
    assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1])


def test_generate_is_reproducible_and_reuses_static_caches():
    model = small_model().float()
    labels = torch.tensor([0, 3])
    a = model.generate(labels, generator=torch.Generator().manual_seed(7))
    buffer = model.inter_cache[0][0].data_ptr()
    b = model.generate(labels, generator=torch.Generator().manual_seed(7))
    c = model.generate(labels, generator=torch.Generator().manual_seed(8))
    # same shape: the buffers are reused, not reallocated
    assert model.inter_cache[0][0].data_ptr() == buffer
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    assert a[0].shape == a[1].shape == (2, 16) and a[0].max() < 64 and a[1].max() < 4096


def test_top_k_top_p_keep_exactly_the_intended_support():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 2
    probs = logits.softmax(-1)
    for top_k, top_p in [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (10, 0.7)]:
        kept = top_k_top_p_filter(logits, top_k, top_p) > float('-inf')
        for row in range(logits.shape[0]):
            # brute force: walk the tokens from most to least likely
            order = probs[row].argsort(descending=True).tolist()
            if top_k:
                order = order[:top_k]
            # renormalised over the top-k
            p = probs[row, order].double() / probs[row, order].double().sum()
            n = 1  # the fewest most likely tokens whose probability reaches top_p
            while top_p < 1 and p[:n].sum() < top_p:
                n += 1
            n = n if top_p < 1 else len(order)
            expected = torch.zeros(50, dtype=torch.bool)
            expected[order[:n]] = True
            assert torch.equal(kept[row], expected), (top_k, top_p, row)
    # and sampling never leaves the support
    draws = sample_from_logits(logits[:1].expand(2000, -1), 1.0, 5, 1.0,
                               torch.rand(2000, generator=torch.Generator().manual_seed(0)))
    assert set(draws.tolist()) == set(logits[0].topk(5).indices.tolist())


def test_class_dropout_rate_only_in_training():
    torch.manual_seed(0)
    model = GPT.from_preset('tiny', **{**SMALL, 'vocab_bits': 8})
    seen = []
    model.class_emb.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    n = 20000
    pre, post, labels = torch.zeros(n, 1,
                                    dtype=torch.long), torch.zeros(n, 1, dtype=torch.long), torch.zeros(n).long()
    with torch.no_grad():
        model.train()(pre, post, labels)
        model.eval()(pre, post, labels)
    rate = (seen[0] == model.config.num_classes).float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.09 / n), rate  # binomial, 4 sigma
    assert set(seen[0].tolist()) == {0, model.config.num_classes}
    assert torch.equal(seen[1], labels)  # no dropout in eval mode


def test_rope_2d_is_relative_on_both_axes_and_zero_at_class():
    from gpt import apply_rope
    grid, hs = 4, 16
    rope = rope_2d(grid, hs).double()
    assert torch.equal(rope[0], torch.zeros(hs // 2, 2))
    torch.manual_seed(0)
    q, k = torch.randn(2, hs, dtype=torch.float64)

    def score(a, b):  # a, b: (row, col); <R(a) q, R(b) k>
        rq = apply_rope(q.view(1, 1, 1, hs), rope[1 + a[0] * grid + a[1]][None])
        rk = apply_rope(k.view(1, 1, 1, hs), rope[1 + b[0] * grid + b[1]][None])
        return (rq * rk).sum()

    assert torch.allclose(score((2, 3), (1, 1)), score((1, 2), (0, 0)))  # same (dr, dc) = (1, 2)
    assert torch.allclose(score((3, 0), (1, 0)), score((2, 3), (0, 3)))  # (2, 0)
    assert not torch.allclose(score((2, 3), (1, 1)), score((2, 2), (1, 1)))  # (1, 2) vs (1, 1)
    # rows and columns are not swapped
    assert not torch.allclose(score((1, 2), (0, 0)), score((2, 1), (0, 0)))


def test_overfit_a_few_sequences_then_generate_them():
    torch.manual_seed(0)
    model = GPT.from_preset('tiny', block_size=16, num_classes=4, dropout=0.0, class_dropout=0.0)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(2 ** 18, (4, 16), generator=g)  # 18-bit tokens of 4 "images"
    pre, post = split_indices(idx)  # (4, 16) 6-bit and 12-bit sub-tokens
    labels = torch.arange(4)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    model.train()
    # lr 3e-3 for 75 steps, then linearly to 0: at a constant lr Adam's loss still spikes now and
    # then (0.09 at step 99 on one CPU, 0.004 on another); decayed, it ends at ~0.003-0.007
    for step in range(150):
        for group in optimizer.param_groups:
            group['lr'] = 3e-3 * min(1.0, 2 * (1 - step / 150))
        _, _, loss = model(pre, post, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()
    gen_pre, gen_post = model.generate(labels, cfg_scale=(1.0, 1.0), top_k=1)  # greedy
    assert model.training  # mode restored
    assert torch.equal(gen_pre, pre) and torch.equal(gen_post, post)


def test_configure_optimizers_splits_decay_and_mfu():
    model = GPT.from_preset('tiny', **SMALL)
    optimizer = model.configure_optimizers(0.05, 3e-4, (0.9, 0.95), 'cpu')
    decay, no_decay = optimizer.param_groups
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    assert {id(p) for p in no_decay['params']} == {id(m.weight) for m in model.modules()
                                                   if type(m).__name__ == 'RMSNorm'}
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))
    # FLOPs per token counted by hand for SMALL (D = 32, SwiGLU hidden 256, 4 blocks, T = 16): per
    # block qkv 3D^2, proj D^2, gate/up 2*D*256, down 256*D, two RMSNorm gains; then the final norm
    # and the 64 + 4096 head rows
    D, hidden = 32, 256
    weights = 4 * (4 * D * D + 3 * D * hidden + 2 * D) + D + (64 + 4096) * D
    # + attention scores: inter blocks over 16, intra over 2
    flops = 6 * weights + 12 * D * (2 * 16 + 2 * 2)
    assert math.isclose(model.estimate_mfu(1e3, 1e12), flops * 1e3 / 1e12)


# ---- official checkpoints
# ---------------------------------------------------------------------------------------

def official_forward(sd, pre, post, labels, n_head, grid):
    """The official model (eval mode) re-written slowly on the official names: explicit softmax
    attention, RoPE with complex numbers, class RoPE row = 0, separate w1 / w3, head.0 / head.1."""
    W = lambda name: sd['transformer.' + name]
    D = W('norm.weight').shape[0]
    hs = D // n_head
    freqs = 1.0 / 10000 ** (torch.arange(0, hs // 2, 2, dtype=torch.float64) / (hs // 2))  # (hs/4,)
    angles = torch.stack([torch.cat([r * freqs,
                                     c * freqs]) for r in range(grid) for c in range(grid)])
    rot = torch.cat([torch.zeros(1, hs // 2, dtype=torch.complex128),
                     torch.polar(torch.ones_like(angles), angles)])

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def block(x, prefix, rot):
        B, S, _ = x.shape
        h = rms(x, W(prefix + 'attention_norm.weight'))
        q, k, v = (h @ W(prefix + 'attention.wqkv.weight').T).split(D, dim=-1)
        q, k, v = (t.reshape(B, S, n_head, hs) for t in (q, k, v))
        q, k = (torch.view_as_real(torch.view_as_complex(t.reshape(B, S, n_head, hs // 2, 2))
                                   * rot[:S, None]).reshape(B, S, n_head, hs) for t in (q, k))
        scores = torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(hs)
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float('-inf'))
        out = torch.einsum('bhqk,bkhd->bqhd', scores.softmax(-1), v).reshape(B, S, D)
        x = x + out @ W(prefix + 'attention.wo.weight').T
        h = rms(x, W(prefix + 'ffn_norm.weight'))
        gated = F.silu(h @ W(prefix + 'feed_forward.w1.weight').T) * (h @ W(prefix + 'feed_forward.w3.weight').T)
        return x + gated @ W(prefix + 'feed_forward.w2.weight').T

    B, T = pre.shape
    tokens = W('pre_emb.weight')[pre] + W('post_emb.weight')[post]
    x = torch.cat([W('class_emb.embedding_table.weight')[labels][:, None], tokens[:, :-1]], dim=1)
    for i in range(PRESETS['tiny']['n_inter']):
        x = block(x, f'spatial_blocks.{i}.', rot)
    h = torch.stack([x, W('pre_emb.weight')[pre]], dim=2).reshape(B * T, 2, D)
    for i in range(PRESETS['tiny']['n_intra']):
        h = block(h, f'factorized_blocks.{i}.', rot)
    h = rms(h, W('norm.weight')).reshape(B, T, 2, D)
    return h[:, :, 0] @ W('head.0.weight').T, h[:, :, 1] @ W('head.1.weight').T


def test_official_checkpoint_gives_the_official_logits(tmp_path):
    path = tmp_path / 'AR_tiny.ckpt'
    torch.save(fake_official_checkpoint(), path)
    checkpoint = torch.load(path, map_location='cpu')
    model = GPT.from_official(checkpoint, block_size=16).double().eval()
    assert model.config.num_classes == 7 and model.config.vocab_bits == 18
    pre, post, labels = random_tokens(2, 16, model)
    ref_pre, ref_post = official_forward(checkpoint['state_dict'], pre, post, labels,
                                         PRESETS['tiny']['n_head'], 4)
    with torch.no_grad():
        logits_pre, logits_post, _ = model(pre, post, labels)
    # (our RoPE table is stored in fp32, hence not 1e-12; a wrong mapping is off by O(1))
    torch.testing.assert_close(logits_pre, ref_pre, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits_post, ref_post, rtol=1e-6, atol=1e-6)
    # the fused SwiGLU input projection is [w1; w3], in that order (the model was built in fp32,
    # hence .float())
    sd = checkpoint['state_dict']
    gate, up = model.inter_blocks[1].ffn.gate_up.weight.chunk(2)
    assert torch.equal(gate.float(), sd['transformer.spatial_blocks.1.feed_forward.w1.weight'].float())
    assert torch.equal(up.float(), sd['transformer.spatial_blocks.1.feed_forward.w3.weight'].float())


def test_official_checkpoint_errors_list_missing_and_unexpected_keys():
    sd = fake_official_checkpoint()['state_dict']
    del sd['transformer.spatial_blocks.2.attention.wo.weight']
    sd['transformer.spatial_blocks.1.attention.bias'] = torch.zeros(3)
    with pytest.raises(KeyError) as error:
        convert_official_gpt(sd)
    assert 'spatial_blocks.2.attention.wo.weight' in str(error.value)
    assert 'spatial_blocks.1.attention.bias' in str(error.value)
    truncated = {k: v for k,
                 v in fake_official_checkpoint()['state_dict'].items() if 'spatial_blocks.3.' not in k}
    # 3 inter blocks: converts, but matches no preset
    with pytest.raises(ValueError, match='no preset'):
        GPT.from_official(truncated)
    with pytest.raises(KeyError, match='head.1.weight'):
        convert_official_gpt({k: v for k, v in sd.items() if not k.endswith('head.1.weight')})


def test_inverse_cdf_sampling_matches_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    u = torch.rand(40000, generator=torch.Generator().manual_seed(1))
    draws = sample_from_logits(logits.expand(40000, -1), 1.0, 0, 1.0, u)
    freq = torch.bincount(draws, minlength=5).float() / 40000
    assert (freq - logits[0].softmax(0)).abs().max() < 0.01  # 4 sigma at n = 40000
    # u = 0: first token with mass
    assert sample_from_logits(logits, 1.0, 0, 1.0, torch.zeros(1)).item() == 0
    # top-1 is greedy
    assert sample_from_logits(logits, 1.0, 1, 1.0, torch.full((1,), 0.999)).item() == 2


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the CUDA-graph sampling path needs a GPU")
def test_cuda_graph_sampling_gives_the_plain_tokens():
    torch.manual_seed(0)
    model = GPT.from_preset('tiny', num_classes=10).cuda()
    # heads are zero at init: give them weights so the samples depend on everything
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    labels = torch.arange(6, device='cuda')
    seed = lambda: torch.Generator('cuda').manual_seed(3)
    plain = model.generate(labels, generator=seed(), top_p=0.9)
    graph = model.generate_fast(labels, generator=seed(), top_p=0.9)
    assert torch.equal(plain[0], graph[0]) and torch.equal(plain[1], graph[1])
    # compiled: fused kernels round differently, so compare in float64, where that flips no token
    model.double()
    plain = model.generate(labels, generator=seed(), top_p=0.9)
    compiled = model.generate_fast(labels, generator=seed(), top_p=0.9, compile=True)
    assert torch.equal(plain[0], compiled[0]) and torch.equal(plain[1], compiled[1])
