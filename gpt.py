"""
The stage-2 generator of Open-MAGVIT2 (paper Sec. 2.3, Eq. 4-7, Table 1): a Llama-style transformer
over asymmetrically factorized tokens with "next sub-token prediction".

An 18-bit LFQ index is split into a 6-bit `pre` and a 12-bit `post` sub-token
(quantizer.split_indices: pre = idx & 63, post = idx >> 6). This file only ever sees (pre, post),
both int64 (B, T).
  - the token at position t is embedded as e_t = pre_emb[pre_t] + post_emb[post_t];
  - N "inter" blocks run causally over [class, e_0, ..., e_{T-2}] and give one context vector h_t
    per position;
  - L "intra" blocks run on the length-2 sequence [h_t, pre_emb[pre_t]]: intra position 0
    predicts pre_t, position 1 predicts post_t given the true pre_t (teacher forcing), i.e.
    p(pre_t | <t) p(post_t | pre_t, <t) ("next sub-token prediction");
  - loss = CE(pre) + CE(post), each a mean over tokens (Eq. 7; a sum of the two, as the official
    code).
Generation decodes one position at a time with static KV caches and classifier-free guidance per
sub-token: `generate` is the plain loop, `generate_fast` the same tokens from one step replayed
as a CUDA graph.
`convert_official_gpt` loads the released Open-MAGVIT2 AR checkpoints (AR_256_B/L/XL.ckpt).

Not a script: train_gpt.py trains it and sample.py samples from it. Typical use:
    model = GPT.from_preset('B', num_classes=1000)
    logits_pre, logits_post, loss = model(pre, post, labels)          # (B,T,64), (B,T,4096), scalar
    pre, post = model.generate(labels)                                # paper's sampling settings for the preset
    pre, post = model.generate_fast(labels)                           # the same, faster on GPUs
    model = GPT.from_official(torch.load('AR_256_B.ckpt', map_location='cpu'))   # released weights
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in at least fp32 (bf16 squares lose too
    much), eps 1e-5 as Llama."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 for bf16/fp16, float64 stays float64 (tests)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1,
                                                keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d(grid_size, head_dim, base=10000.0):
    """2D rotary table as LlamaGen / Open-MAGVIT2: (1 + grid_size**2, head_dim
    // 2, 2) holding (cos, sin).

    Row 1 + r * grid_size + c is the token at grid row r, column c (raster order). Channels are
    rotated in interleaved pairs (2i, 2i+1); the first head_dim // 4 pairs rotate with the row
    index, the last head_dim // 4 with the column index, each with frequencies base^(-2j / (head_dim
    / 2)). Row 0 is the class position and holds (cos, sin) = (0, 0): the official code prepends
    such a row, which multiplies q and k of the class token by zero. So the class token gets no
    position, every query scores it with the constant logit 0 (a learned "attention sink" with value
    v_class), and at its own position it can only attend to itself. The released weights were
    trained with this, so we keep it. The intra blocks reuse rows 0 and 1: intra position 0 (h_t)
    gets q = k = 0 too, and position 1 the identity rotation.
    """
    quarter = head_dim // 4
    # (hd/4,), fp64 angles
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))
    # (G*G,) row of each raster position
    rows = torch.arange(grid_size).repeat_interleave(grid_size)
    cols = torch.arange(grid_size).repeat(grid_size)  # (G*G,)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (G*G, hd/2)
    # (G*G, hd/2, 2), exact to fp32 rounding
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).float()
    return torch.cat([torch.zeros(1, head_dim // 2, 2), table])  # class row first


def apply_rope(x, rope):
    """Rotate interleaved channel pairs of x (B, S, nh, hs) by rope (S, hs/2, 2); computed in at
    least fp32."""
    # (B, S, nh, hs/2, 2)
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]  # (1, S, 1, hs/2)
    even, odd = xf[..., 0], xf[..., 1]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin],
                       dim=-1).flatten(-2).type_as(x)


def pair_attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(hs) + bias) v over two keys, written out: q (B, nh, S, hs), k, v (B, nh,
    2, hs), bias (S, 2) additive, None = causal (h_t does not see pre_t). -> (B, nh, S, hs).
    Fused attention kernels (flash, cuDNN) compute tiles of 64+ queries x 64+ keys, so on 2 x 2
    scores almost all their work is padding (python bench.py --rows attention times the two). Nor
    are batched matrix products (q @ k^T) a fit: B * nh products of 2 x hs by hs x 2, which cuBLAS
    reads at a small share of the memory bandwidth. Written as element-wise products summed over hs
    and over the two keys, torch.compile fuses each into a kernel that reads q, k and v once (the
    training step's kernels: python bench.py --rows gpt --compile --profile gpt_B_step). Sums in
    at least fp32, as a matmul accumulates."""
    if bias is None:
        bias = torch.full((2, 2), float('-inf'), device=q.device).triu(1)  # [[0, -inf], [0, 0]]
    qf, kf, vf = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q, k, v))
    # (B, nh, S, 1, hs) * (B, nh, 1, 2, hs), summed over hs: (B, nh, S, 2) scores
    att = (qf[:, :, :, None] * kf[:, :, None]).sum(-1) * q.shape[-1] ** -0.5 + bias
    p = att.softmax(dim=-1)  # (B, nh, S, 2)
    # (B, nh, S, 2, 1) * (B, nh, 1, 2, hs), summed over the two keys: (B, nh, S, hs)
    return (p[..., None] * vf[:, :, None]).sum(-2).to(v.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention, fused qkv, no biases; optional static
    KV cache for decoding."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        # rows [q; k; v], heads contiguous inside each
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache=None, pos=None, bias=None):
        """x (B, S, C), rope (S, hs/2, 2) -> (B, S, C). Training: causal over the S positions.
        Decoding: cache = (k, v) buffers (B, nh, L, hs), pos (1,) the slot written, bias (1, L) the
        additive mask (GPT.decode_bias)."""
        B, S, C = x.shape
        # each (B, S, nh, hs)
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, C // self.n_head).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hs)
        if cache is not None:
            # decoding one position (S = 1) at slot pos ((1,) int64) of the (B, nh, L, hs) buffers,
            # attending to all L slots with bias -inf after pos (stale values): the same shapes at
            # every position, so one step can be captured in a CUDA graph and replayed
            k_cache, v_cache = cache
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
            # (B, nh, L, hs), no copy when the dtypes agree
            k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)
        if k.shape[2] == 2:  # the intra blocks' sequences of two, [h_t, pre_t]: see pair_attention
            y = pair_attention(q, k, v, bias)
        elif bias is None:  # training / full forward: flash attention where the backend has it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = y.transpose(1, 2).reshape(B, S, C)  # (B, S, C)
        return self.dropout(self.proj(y))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), hidden = round_up(8 * dim / 3, 256)
    as Llama / the official code."""

    def __init__(self, config):
        super().__init__()
        hidden = 256 * math.ceil(int(8 * config.dim / 3) / 256)
        # [w1; w3] of the official code in one matmul
        self.gate_up = nn.Linear(config.dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, S, hidden) each
        return self.dropout(self.down(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim)
        self.ffn = FeedForward(config)

    def forward(self, x, rope, cache=None, pos=None, bias=None):
        x = x + self.attn(self.attn_norm(x), rope, cache, pos, bias)
        return x + self.ffn(self.ffn_norm(x))


@dataclass
class GPTConfig:
    vocab_bits: int = 18  # LFQ code bits K; the vocabulary is 2^18
    # bits of the `pre` sub-token (64 values); post has vocab_bits - pre_bits = 12 (4096 values)
    pre_bits: int = 6
    # tokens per image (16 x 16 grid for 256px and a 16x downsampling tokenizer)
    block_size: int = 256
    # class embedding has num_classes + 1 rows; the last one is the null class for CFG
    num_classes: int = 1000
    n_inter: int = 24  # N: blocks over the token sequence
    n_intra: int = 2  # L: blocks over the 2 sub-tokens of one position
    dim: int = 1024
    n_head: int = 16
    # on the input embeddings, after the attention projection and after the FFN
    dropout: float = 0.1
    class_dropout: float = 0.1  # probability that a training label is replaced by the null class
    rope_base: float = 10000.0
    # default sampling settings (pre, post) of the released model of this size
    cfg_scale: tuple = (1.9, 2.0)
    temperature: tuple = (1.0, 1.0)

    @property
    def grid_size(self):  # the 2D RoPE grid: sqrt(block_size)
        return math.isqrt(self.block_size)


# Table 1 of the paper; sampling defaults from the official sampling scripts (top-k off, top-p 1.0
# for all).
PRESETS = {
    'tiny': dict(n_inter=4, n_intra=2, dim=128, n_head=4),  # CPU quick start and tests
    # 343.6M
    'B': dict(n_inter=24, n_intra=2, dim=1024, n_head=16, cfg_scale=(1.9, 2.0), temperature=(1.0, 1.0)),
    # 804.4M
    'L': dict(n_inter=36, n_intra=3, dim=1280, n_head=20, cfg_scale=(1.9, 1.9), temperature=(1.1, 1.0)),
    # 1.49B
    'XL': dict(n_inter=48, n_intra=4, dim=1536, n_head=24, cfg_scale=(1.75, 1.85), temperature=(1.1, 1.0)),
}


def top_k_top_p_filter(logits, top_k=0, top_p=1.0):
    """logits (B, V) -> same with -inf outside the support: first the top_k largest (0 = off; ties
    at the k-th value are kept), then the smallest set of most probable tokens whose probability
    reaches top_p (1.0 = off)."""
    if top_k > 0:
        # (B, 1)
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of all strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays (mass_before = 0)
        # mask unsorted
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float('-inf'))
    return logits


def sample_from_logits(logits, temperature, top_k, top_p, uniform):
    """One token per row of logits (B, V) -> (B,) int64. temperature 0: the argmax (greedy;
    top-k and top-p never drop it). Otherwise temperature, then top-k / top-p, then an
    inverse-CDF draw with the given uniform numbers (B,) in [0, 1): the smallest token whose
    cumulative probability exceeds u. Equivalent to torch.multinomial, but the randomness is
    drawn up front, so a CUDA graph can replay the step."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_k_top_p_filter(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    # (B,): the number of tokens whose cdf stays <= u is the index of the first one past u (x
    # cdf[-1]: rounding)
    return (cdf <= uniform[:, None] * cdf[:, -1:]).sum(dim=-1).clamp_max(logits.shape[-1] - 1)


def decode_bias(pos, length, dtype):
    """(1, length) additive attention mask over cache slots: 0 on slots 0..pos, -inf on the
    later (stale) ones. Additive rather than boolean: cuDNN's attention is faster with it
    (python bench.py --rows attention)."""
    stale = torch.arange(length, device=pos.device) > pos  # (length,) bool
    return torch.zeros(1, length, dtype=dtype, device=pos.device).masked_fill(stale, float('-inf'))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.grid_size ** 2 == config.block_size, "block_size must be a square (2D RoPE grid)"
        assert (config.dim // config.n_head) % 4 == 0, "2D RoPE needs a head dim divisible by 4"
        self.config = config
        self.pre_emb = nn.Embedding(2 ** config.pre_bits, config.dim)  # (64, D)
        # (4096, D)
        self.post_emb = nn.Embedding(2 ** (config.vocab_bits - config.pre_bits), config.dim)
        self.class_emb = nn.Embedding(config.num_classes + 1, config.dim)  # last row: null class
        self.dropout = nn.Dropout(config.dropout)
        self.inter_blocks = nn.ModuleList(Block(config) for _ in range(config.n_inter))
        self.intra_blocks = nn.ModuleList(Block(config) for _ in range(config.n_intra))
        self.norm = RMSNorm(config.dim)  # shared by both heads
        self.head_pre = nn.Linear(config.dim, 2 ** config.pre_bits, bias=False)
        self.head_post = nn.Linear(config.dim,
                                   2 ** (config.vocab_bits - config.pre_bits), bias=False)
        # recomputed, never saved: (1 + T, hs/2, 2)
        self.register_buffer('rope',
                             rope_2d(config.grid_size, config.dim // config.n_head, config.rope_base),
                             persistent=False)
        for module in self.modules():  # N(0, 0.02) everywhere, as the official code
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # zero-initialised heads: the first loss is exactly log 64 + log 4096
        nn.init.zeros_(self.head_pre.weight)
        nn.init.zeros_(self.head_post.weight)
        self.inter_cache, self.intra_cache = [], []  # static KV buffers, made by setup_caches

    def forward(self, pre, post, labels):
        """pre, post (B, T) int64 with T <= block_size, labels (B,) int64 -> logits_pre (B, T, 64),
        logits_post (B, T, 4096), loss = CE(pre) + CE(post). Labels are dropped to the null class in
        training mode."""
        B, T = pre.shape
        if self.training and self.config.class_dropout > 0:  # for classifier-free guidance
            drop = torch.rand(B, device=labels.device) < self.config.class_dropout
            labels = torch.where(drop, self.config.num_classes, labels)
        pre_emb = self.pre_emb(pre)  # (B, T, C)
        tokens = pre_emb + self.post_emb(post)  # e_t: sum of the sub-token embeddings
        # (B, T, C): [class, e_0..e_{T-2}]
        x = torch.cat([self.class_emb(labels)[:, None], tokens[:, :-1]], dim=1)
        x = self.dropout(x)
        for block in self.inter_blocks:  # h_t sees the class and the tokens < t
            x = block(x, self.rope[:T])
        # next sub-token prediction: every position becomes its own length-2 sequence [h_t,
        # pre_emb[pre_t]]
        h = torch.stack([x, pre_emb], dim=2).view(B * T, 2, -1)  # (B*T, 2, C)
        for block in self.intra_blocks:
            h = block(h, self.rope[:2])
        h = self.norm(h).view(B, T, 2, -1)  # (B, T, 2, C): [h_t, h_t after pre_t] per position
        logits_pre = self.head_pre(h[:, :, 0])  # (B, T, 64): from h_t alone
        logits_post = self.head_post(h[:, :, 1])  # (B, T, 4096): from h_t and pre_t
        loss = (F.cross_entropy(logits_pre.flatten(0, 1), pre.flatten())  # Eq. (7)
                + F.cross_entropy(logits_post.flatten(0, 1), post.flatten()))
        return logits_pre, logits_post, loss

    @classmethod
    def from_preset(cls, name, **overrides):
        return cls(GPTConfig(**{**PRESETS[name], **overrides}))

    @classmethod
    def from_official(cls, official_state_dict, **overrides):
        """A GPT holding a released Open-MAGVIT2 AR checkpoint (the loaded .ckpt dict or its
        state_dict). Sizes come from the tensor shapes, the head count from the preset of that width
        and depth."""
        state_dict = convert_official_gpt(official_state_dict)
        dim = state_dict['norm.weight'].shape[0]
        depth = (sum(k.endswith('attn_norm.weight') and k.startswith('inter') for k in state_dict),
                 sum(k.endswith('attn_norm.weight') and k.startswith('intra') for k in state_dict))
        names = [n for n, p in PRESETS.items()
                 if (p['dim'], p['n_inter'], p['n_intra']) == (dim, *depth)]
        if not names:
            raise ValueError(f"no preset with dim={dim}, n_inter={depth[0]}, n_intra={depth[1]}: build "
                             f"GPT(GPTConfig(...)) yourself and load_state_dict(convert_official_gpt(...))")
        pre_bits = state_dict['pre_emb.weight'].shape[0].bit_length() - 1
        sizes = dict(pre_bits=pre_bits,
                     vocab_bits=pre_bits + state_dict['post_emb.weight'].shape[0].bit_length() - 1,
                     num_classes=state_dict['class_emb.weight'].shape[0] - 1)
        model = cls.from_preset(names[0], **{**sizes, **overrides})
        model.load_state_dict(state_dict)  # strict: any leftover or missing key is an error
        return model

    def setup_caches(self, batch_size, dtype, device):
        """Preallocate the KV buffers: (batch, nh, block_size, hs) per inter block, (batch, nh, 2,
        hs) per intra block. Kept across calls of the same shape, so a captured CUDA graph stays
        valid."""
        hs = self.config.dim // self.config.n_head
        inter_shape = (batch_size, self.config.n_head, self.config.block_size, hs)
        old = self.inter_cache[0][0] if self.inter_cache else None
        if old is not None and (old.shape, old.dtype,
                                old.device) == (inter_shape, dtype, torch.device(device)):
            return
        buffers = lambda shape: (torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device))
        self.inter_cache = [buffers(inter_shape) for _ in self.inter_blocks]
        self.intra_cache = [buffers((batch_size, self.config.n_head, 2,
                                     hs)) for _ in self.intra_blocks]

    def free_caches(self):
        """Drop the KV buffers (GBs for B/L/XL at evaluation batch sizes), e.g. between sample grids
        in training."""
        self.inter_cache, self.intra_cache = [], []

    def decode_pre(self, x, pos):
        """First half of a decoding step. x (2B, 1, C) is the input at sequence position pos, a
        (1,) int64 tensor (the class embedding at 0, e_{t-1} at t). The inter blocks write
        their caches at slot pos, then intra position 0 runs. Returns logits_pre (2B, 64) of
        token t = pos, in at least fp32 (CFG subtracts them)."""
        dtype = self.inter_cache[0][0].dtype  # bf16 under autocast, as q: SDPA's mask matches q
        rope = self.rope.index_select(0, pos)  # (1, hs/2, 2)
        bias = decode_bias(pos, self.config.block_size, dtype)  # (1, L): for all inter blocks
        for block, cache in zip(self.inter_blocks, self.inter_cache):
            x = block(x, rope, cache, pos, bias)
        zero = pos.new_zeros(1)
        bias = decode_bias(zero, 2, dtype)  # (1, 2): [0, -inf], intra slot 0 sees itself only
        for block, cache in zip(self.intra_blocks, self.intra_cache):  # slot 0 rewritten each time
            x = block(x, self.rope[0:1], cache, zero, bias)
        logits = self.head_pre(self.norm(x))[:, 0]  # (2B, 64)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def decode_post(self, pre):
        """Second half: pre (2B,) of this position enters intra position 1. Returns
        logits_post (2B, 4096), in at least fp32."""
        x = self.pre_emb(pre)[:, None]  # (2B, 1, C)
        one = pre.new_ones(1)
        bias = decode_bias(one, 2, self.intra_cache[0][0].dtype)  # (1, 2): [0, 0], sees h_t, pre_t
        for block, cache in zip(self.intra_blocks, self.intra_cache):
            x = block(x, self.rope[1:2], cache, one, bias)
        logits = self.head_post(self.norm(x))[:, 0]  # (2B, 4096)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def sampling_settings(self, cfg_scale, temperature, top_k, top_p):
        """Each setting as a (pre, post) pair: None -> the preset's cfg_scale / temperature, one
        value -> the same for both sub-tokens."""
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        cfg_scale = pair(self.config.cfg_scale if cfg_scale is None else cfg_scale)
        temperature = pair(self.config.temperature if temperature is None else temperature)
        top_k, top_p = pair(top_k), pair(top_p)
        if any(t < 0 for t in temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not all(0 < p <= 1 for p in top_p):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        return cfg_scale, temperature, top_k, top_p

    def start_generation(self, labels, generator):
        """KV caches for the 2B rows [cond; null]. Returns the input of sequence position 0,
        the class embeddings (2B, 1, C), and all the randomness of the run, uniforms (2, T, B)
        = [pre | post, position, row]: drawn up front, so that generate_fast (a replayed graph)
        uses the same numbers as generate."""
        B, device = labels.shape[0], labels.device
        bf16 = device.type != 'cpu' and torch.is_autocast_enabled(device.type)  # half the bytes
        self.setup_caches(2 * B, torch.bfloat16 if bf16 else self.pre_emb.weight.dtype, device)
        uniforms = torch.rand(2, self.config.block_size, B, generator=generator, device=device)
        null = torch.full_like(labels, self.config.num_classes)  # the class-dropout class
        return self.class_emb(torch.cat([labels, null]))[:, None], uniforms

    @torch.no_grad()
    def generate(self, labels, cfg_scale=None, temperature=None, top_k=0, top_p=1.0,
                 generator=None):
        """Sample block_size tokens for labels (B,) -> (pre, post), each (B, T) int64.

        cfg_scale, temperature: (pre, post) pairs, default the preset's (paper) values;
        temperature 0 is greedy (argmax). top_k (0 = off), top_p (1.0 = off): a value or a
        (pre, post) pair. generator: a torch.Generator on labels' device makes it reproducible.
        Classifier-free guidance by batch doubling: the rows [cond; null] run together and the
        guided logits are uncond + s * (cond - uncond), per sub-token. This is the plain loop;
        generate_fast gives the same tokens, faster on CUDA.
        """
        settings = self.sampling_settings(cfg_scale, temperature, top_k, top_p)
        cfg_scale, temperature, top_k, top_p = settings  # (pre, post) pairs
        was_training = self.training
        self.eval()  # no dropout while sampling
        x, uniforms = self.start_generation(labels, generator)  # (2B, 1, C), (2, T, B)
        pre, post = [], []  # T tensors (B,) each
        for t in range(self.config.block_size):  # p(pre_t | <t), then p(post_t | pre_t, <t)
            pos = torch.full((1,), t, device=labels.device)  # the sequence position of x
            cond, uncond = self.decode_pre(x, pos).chunk(2)  # (B, 64) logits each
            guided = uncond + cfg_scale[0] * (cond - uncond)
            pre_t = sample_from_logits(guided, temperature[0], top_k[0], top_p[0], uniforms[0, t])
            cond, uncond = self.decode_post(pre_t.repeat(2)).chunk(2)  # (B, 4096) each
            guided = uncond + cfg_scale[1] * (cond - uncond)
            post_t = sample_from_logits(guided, temperature[1], top_k[1], top_p[1], uniforms[1, t])
            x = (self.pre_emb(pre_t) + self.post_emb(post_t)).repeat(2, 1)[:, None]  # (2B, 1, C)
            pre.append(pre_t)
            post.append(post_t)
        self.train(was_training)
        return torch.stack(pre, dim=1), torch.stack(post, dim=1)

    def decode_step(self, labels, generator=None, cfg_scale=None, temperature=None, top_k=0,
                    top_p=1.0, compile=False):
        """generate's loop body on fixed tensors: returns (step, pre, post). Each step()
        samples the next position as generate does and writes it into pre, post (B, T) in
        place. The position is a (1,) tensor that step advances, so every call runs the same
        kernels on the same memory and can be replayed as a CUDA graph. compile=True:
        torch.compile the step (once per batch size and settings) to fuse its element-wise
        kernels. The caller sets eval mode and no_grad."""
        settings = self.sampling_settings(cfg_scale, temperature, top_k, top_p)
        cfg_scale, temperature, top_k, top_p = settings  # (pre, post) pairs
        x, uniforms = self.start_generation(labels, generator)  # (2B, 1, C), (2, T, B)
        pre, post = (labels.new_zeros(labels.shape[0], self.config.block_size) for _ in range(2))
        pos = labels.new_zeros(1)

        def step():
            u = uniforms.index_select(1, pos)[:, 0]  # (2, B): this position's, pre and post
            cond, uncond = self.decode_pre(x, pos).chunk(2)
            guided = uncond + cfg_scale[0] * (cond - uncond)
            pre_t = sample_from_logits(guided, temperature[0], top_k[0], top_p[0], u[0])
            cond, uncond = self.decode_post(pre_t.repeat(2)).chunk(2)
            guided = uncond + cfg_scale[1] * (cond - uncond)
            post_t = sample_from_logits(guided, temperature[1], top_k[1], top_p[1], u[1])
            x.copy_((self.pre_emb(pre_t) + self.post_emb(post_t)).repeat(2, 1)[:, None])
            pre.index_copy_(1, pos, pre_t[:, None])
            post.index_copy_(1, pos, post_t[:, None])
            pos.add_(1)

        # dynamic=False: one specialised compilation per batch size; fullgraph: all or an error
        return (torch.compile(step, dynamic=False, fullgraph=True) if compile else step), pre, post

    @torch.no_grad()
    def generate_fast(self, labels, cfg_scale=None, temperature=None, top_k=0, top_p=1.0,
                      generator=None, compile=False):
        """generate's tokens for the same seed (tests/test_gpt.py checks), from decode_step. On
        CUDA the step is recorded once as a CUDA graph and replayed: a position is ~400 small
        kernels, and launching them one by one bounds the plain loop at small batch. Elsewhere
        the same step runs eagerly. compile=True compiles the step first; the tokens then agree
        up to the rounding of the fused kernels. Speed: python bench.py --rows sampling."""
        was_training = self.training
        self.eval()
        step, pre, post = self.decode_step(labels, generator, cfg_scale, temperature, top_k, top_p,
                                           compile)
        T = self.config.block_size
        if not labels.is_cuda:
            for _ in range(T):
                step()
        else:
            side = torch.cuda.Stream()  # capture wants a warm-up on a side stream: positions 0, 1
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records position 2 without running it
                step()
            for _ in range(T - 2):  # positions 2 .. T-1
                graph.replay()
        self.train(was_training)
        return pre, post

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             capturable=False):
        """AdamW as nanoGPT: weight decay on matrices and embeddings (dim >= 2), none on norm gains.
        The official code builds the same two groups but then its lr/wd schedule (lr_wd_annealing)
        writes the current weight decay into every group each step, so in effect it decays all
        parameters. capturable: the step count stays on the GPU, as a CUDA graph of the step needs
        (train_gpt.py --cuda-graph)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        # fused: one kernel for the whole update on CUDA (torch >= 2.4 has it for AdamW)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda',
                                 capturable=capturable)

    def estimate_mfu(self, tokens_per_sec, peak_flops):
        """Model flops utilisation as nanoGPT (PaLM appendix B): 6 flops per weight per token for
        forward + backward (embedding lookups excluded) plus the attention scores, 12 * dim *
        sequence length per layer and token (inter blocks attend over T = block_size, intra blocks
        over 2). Returns a fraction of peak_flops."""
        c = self.config
        n_matmul = sum(p.numel() for p in self.parameters()) - sum(
            e.weight.numel() for e in (self.pre_emb, self.post_emb, self.class_emb))
        flops_per_token = 6 * n_matmul + 12 * c.dim * (c.n_inter * c.block_size + c.n_intra * 2)
        return flops_per_token * tokens_per_sec / peak_flops


def convert_official_gpt(state_dict):
    """Map an official Open-MAGVIT2 AR checkpoint (Lightning .ckpt dict or its
    'state_dict') onto GPT's keys.

    official key (the Lightning module prefixes 'transformer.')          ours
      pre_emb.weight (64, D), post_emb.weight (4096, D)                  same names
      class_emb.embedding_table.weight (num_classes + 1, D)              class_emb.weight
      spatial_blocks.i.{attention_norm, ffn_norm}.weight                 inter_blocks.i.{attn_norm, ffn_norm}.weight
      spatial_blocks.i.attention.wqkv.weight (3D, D)                     inter_blocks.i.attn.qkv.weight (same row order:
                                                                         [q; k; v], head-major inside, as we split it)
      spatial_blocks.i.attention.wo.weight                               inter_blocks.i.attn.proj.weight
      spatial_blocks.i.feed_forward.w1 / w3 / w2 .weight                 inter_blocks.i.ffn.gate_up = cat([w1, w3]),
                                                                         inter_blocks.i.ffn.down = w2
      factorized_blocks.j.*                                              intra_blocks.j.* (same as above)
      norm.weight; head.0.weight (64, D); head.1.weight (4096, D)        norm.weight; head_pre.weight; head_post.weight
    Dropped: first_stage_model.* (the tokenizer stored inside the AR checkpoint), *.kv_cache.*
    (sampling buffers), *freqs_cis (RoPE table, recomputed). Any other key, or a missing one, raises
    a KeyError that lists them.
    """
    state_dict = state_dict.get('state_dict', state_dict)
    official = {k.removeprefix('transformer.'): v for k, v in state_dict.items()
                if not k.startswith('first_stage_model.') and '.kv_cache.' not in k and not k.endswith('freqs_cis')}
    block_keys = ['attention_norm.weight', 'attention.wqkv.weight', 'attention.wo.weight',
                  'ffn_norm.weight',
                  'feed_forward.w1.weight', 'feed_forward.w2.weight', 'feed_forward.w3.weight']
    depth = {}  # blocks per stack: 1 + the largest index present, so a gap shows up as missing keys
    for stack in ('spatial_blocks', 'factorized_blocks'):
        indices = [int(k.split('.')[1]) for k in official if k.startswith(stack + '.') and k.split('.')[1].isdigit()]
        depth[stack] = max(indices, default=-1) + 1
    expected = {'pre_emb.weight', 'post_emb.weight', 'class_emb.embedding_table.weight',
                'norm.weight',
                'head.0.weight', 'head.1.weight'}
    expected |= {f'{stack}.{i}.{k}'
                 for stack, n in depth.items() for i in range(n) for k in block_keys}
    missing, unexpected = sorted(expected - official.keys()), sorted(official.keys() - expected)
    if missing or unexpected or depth['spatial_blocks'] == 0:
        raise KeyError(f"not an Open-MAGVIT2 AR checkpoint we can load: missing keys {missing}, "
                       f"unexpected keys {unexpected}")
    ours = {'pre_emb.weight': official['pre_emb.weight'],
            'post_emb.weight': official['post_emb.weight'],
            'class_emb.weight': official['class_emb.embedding_table.weight'],
            'norm.weight': official['norm.weight'],
            'head_pre.weight': official['head.0.weight'],
            'head_post.weight': official['head.1.weight']}
    for stack, name in (('spatial_blocks', 'inter_blocks'), ('factorized_blocks', 'intra_blocks')):
        for i in range(depth[stack]):
            src, dst = f'{stack}.{i}.', f'{name}.{i}.'
            ours[dst + 'attn_norm.weight'] = official[src + 'attention_norm.weight']
            ours[dst + 'attn.qkv.weight'] = official[src + 'attention.wqkv.weight']
            ours[dst + 'attn.proj.weight'] = official[src + 'attention.wo.weight']
            ours[dst + 'ffn_norm.weight'] = official[src + 'ffn_norm.weight']
            ours[dst + 'ffn.gate_up.weight'] = torch.cat([official[src + 'feed_forward.w1.weight'],
                                                          official[src + 'feed_forward.w3.weight']])
            ours[dst + 'ffn.down.weight'] = official[src + 'feed_forward.w2.weight']
    return ours
