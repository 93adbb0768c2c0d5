"""
Lookup-Free Quantization (LFQ), the quantizer of MAGVIT-v2 / Open-MAGVIT2.

The encoder outputs K = 18 channels per latent pixel. LFQ quantizes each channel to its sign, so
every latent pixel becomes one of 2^K = 262,144 codes without any codebook lookup:

    Eq. (1)  q_d = sign(z_d) in {-1, +1}            (0 maps to -1, as the official code)
    Eq. (2)  index(z) = sum_d 2^d * 1[z_d > 0]        (channel 0 = least significant bit, official v2 order)
    Eq. (3)  L_entropy = E[H(f(z))] - H(E[f(z)])     (per-sample entropy minus codebook entropy)

f(z) is a soft assignment of z to all 2^K codes (softmax of 2<z,c>/T). Naively that is an N x 2^18
table (the official code builds it: ~10 GB at 2048 tokens); here both entropies are computed exactly
from per-bit quantities, see `entropy_terms` below for the derivation.

For the auto-regressive stage the 18-bit index is factorized asymmetrically (paper Sec. 2.3) into a
6-bit `pre` sub-token (channels 0-5) and a 12-bit `post` sub-token (channels 6-17).

Nothing here is run directly; `tokenizer.py` uses LFQ and `tests/test_quantizer.py` checks every
formula against a brute-force computation over all 2^K codes.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# indices <-> codes, and the (pre, post) factorization


def codes_to_indices(codes):
    """(..., K) real -> (...) int64, Eq. (2) with the sign rule of Eq. (1): channel d is bit d
    (channel 0 = least significant), positive is 1, zero or negative is 0."""
    powers = 2 ** torch.arange(codes.shape[-1], device=codes.device)  # (K,)
    return ((codes > 0).long() * powers).sum(-1)


def indices_to_codes(indices, num_bits):
    """(...) int64 -> (..., K) float codes in {-1, +1}, the inverse of codes_to_indices."""
    powers = 2 ** torch.arange(num_bits, device=indices.device)  # (K,)
    bits = (indices.unsqueeze(-1) // powers) % 2  # (..., K) in {0, 1}
    return bits.float() * 2 - 1


def split_indices(indices, pre_bits=6):
    """Asymmetric factorization (Sec. 2.3): pre = channels 0..5 (6 bits), post = channels 6..17 (12
    bits)."""
    return indices & ((1 << pre_bits) - 1), indices >> pre_bits


def merge_indices(pre, post, pre_bits=6):
    """Inverse of split_indices."""
    return pre | (post << pre_bits)


# -----------------------------------------------------------------------------
# the entropy penalty, exactly and without the 2^K table


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is also an all_reduce(SUM).

    Every rank computes the same loss from the summed tensor, so the gradient w.r.t. one rank's
    input is the sum of the gradients of all ranks' losses. DDP then averages parameter gradients
    over ranks, which together gives exactly the gradient of the single-process loss on the
    concatenated batch (tests/test_quantizer.py checks it).
    """

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def binary_entropy_from_logits(a):
    """Entropy (nats) of a Bernoulli with P(1) = sigmoid(a): H = p*softplus(-a) + (1-p)*softplus(a),
    stable for any a."""
    p = torch.sigmoid(a)
    return p * F.softplus(-a) + (1 - p) * F.softplus(a)


def entropy_terms(z, temperature=0.01, distributed=False):
    """Per-sample entropy and codebook entropy of Eq. (3), exact, for z of shape (N, K).

    The soft assignment of the official code is f(z)_c = softmax_c(2 <z, c> / T) over all codes c in
    {-1,+1}^K. Because 2<z,c>/T = sum_d 2 z_d c_d / T is a *sum over bits*, the softmax factorizes
    into K independent bits:
        f(z)_c = prod_d p_d^{[c_d = +1]} (1 - p_d)^{[c_d = -1]},   p_d = e^{2z_d/T} / (e^{2z_d/T} + e^{-2z_d/T})
                                                                       = sigmoid(4 z_d / T).
    1. Per-sample entropy. The entropy of a product of independent bits is the
    sum of their entropies:
           H(f(z)) = sum_d H_b(sigmoid(4 z_d / T))                          -> O(N K), no table.
    2. Codebook entropy. Split the bits into a low half (K1 = K//2 bits) and a
    high half (K2 = K - K1). Then
       f(z)_c = A(z)_{c_low} * B(z)_{c_high}, where A (2^K1 entries) and B (2^K2 entries) are the
       distributions of each half, built the same way. The batch average over N
       tokens is therefore a matrix product:
           mean_n f(z_n) = A^T B / N            A: (N, 2^K1), B: (N, 2^K2), result (2^K1, 2^K2) = all 2^K codes
       For K = 18 that is two (N, 512) tables and a 512 x 512 result instead of an (N, 262144)
       table: at N = 8192, ~33 MB (A, B, their logs) against 8.6 GB for the fp32 table (x2-3 with
       its softmax/log copies).
    Entropies use the exact p*log(p) (log clamped at 1e-30, which changes the sum by < 1e-23). The
    official code uses log(p + 1e-5) instead, which caps the codebook entropy at 11.19 nats for a
    uniform code distribution (ln 2^18 = 12.48) and flattens the gradient for rare codes; the
    paper's Eq. (3) is the exact entropy.

    With distributed=True (DDP) the averaged distribution is all-reduced over ranks first, so the
    codebook entropy is that of the *global* batch and does not depend on the number of GPUs. (The
    official code averages per GPU.) Returns two 0-dim tensors: (mean per-sample entropy, codebook
    entropy), in nats. fp16/bf16 z is upcast to float32 (autocast hands the encoder's output over in
    bf16, too coarse for 2^K probabilities); float32 and float64 z keep their precision, so the
    float64 test against the 2^K brute force is exact to rounding.
    """
    if z.dtype not in (torch.float32, torch.float64):  # fp16 / bf16 (or an integer tensor)
        z = z.float()
    N, K = z.shape
    # (N, K): log-odds of each bit being +1, p_d = sigmoid(4 z_d / T) (see above)
    logits = 4.0 * z / temperature

    # E_n[H(f(z_n))], first term of Eq. (3)
    per_sample_entropy = binary_entropy_from_logits(logits).sum(1).mean()

    # (N, k) -> (N, 2^k), probability of each code of this half of the bits
    def half_probs(half_logits):
        k = half_logits.shape[1]
        # (2^k, k) in {0, 1}: row c is the bits of code c of this half
        bits = (indices_to_codes(torch.arange(2 ** k, device=z.device), k) > 0).to(z.dtype)
        # log P(bit=1), log P(bit=0)
        log_p1, log_p0 = F.logsigmoid(half_logits), F.logsigmoid(-half_logits)
        # log f_c = sum_d [c_d = 1] log p_d + [c_d = 0] log(1 - p_d): two (N, k) @ (k, 2^k) products
        return torch.exp(log_p1 @ bits.T + log_p0 @ (1 - bits).T)  # (N, 2^k)

    K1 = K // 2
    A, B = half_probs(logits[:, :K1]), half_probs(logits[:, K1:])  # (N, 2^K1), (N, 2^K2)
    # (2^K1, 2^K2): the batch-averaged f(z), entry [i, j] is the code i + 2^K1 * j
    avg_probs = A.T @ B / N
    if distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        avg_probs = _AllReduceSum.apply(avg_probs) / dist.get_world_size()
    # H(E_n[f(z_n)]), Eq. (3)
    codebook_entropy = -(avg_probs * torch.log(avg_probs.clamp_min(1e-30))).sum()
    return per_sample_entropy, codebook_entropy


# -----------------------------------------------------------------------------
# the quantizer module


class LFQ(nn.Module):
    """Lookup-free quantizer. forward(z (B, K, H, W)) -> (z_q, indices (B, H, W), losses).

    losses: per_sample_entropy, codebook_entropy, entropy_loss (= their difference, Eq. 3),
    commitment_loss (= mean (z - sg(q))^2). The entropy terms are only computed in training mode
    (they are zeros in eval). The loss weights (0.1 entropy, 0.25 commitment) are applied by the
    trainer, not here.
    """

    def __init__(self, num_bits=18, entropy_temperature=0.01):
        super().__init__()
        self.num_bits = num_bits
        self.entropy_temperature = entropy_temperature

    def forward(self, z):
        assert z.shape[1] == self.num_bits, f"expected {self.num_bits} channels, got {z.shape[1]}"
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)  # Eq. (1), (B, K, H, W)
        z_q = z + (q - z).detach()  # straight-through estimator: forward q, gradient of identity
        # Eq. (2), (B, H, W): only the signs of z count
        indices = codes_to_indices(z.permute(0, 2, 3, 1))

        losses = {'commitment_loss': F.mse_loss(z.float(), q.float())}
        if self.training:
            flat = z.permute(0, 2, 3, 1).reshape(-1, self.num_bits)  # (B*H*W, K): one row per token
            # under DDP the codebook entropy is that of the global batch (all-reduced inside; see
            # entropy_terms)
            per_sample, codebook = entropy_terms(flat, self.entropy_temperature, distributed=True)
        else:
            per_sample = codebook = z.new_zeros((), dtype=torch.float32)
        losses.update(per_sample_entropy=per_sample, codebook_entropy=codebook,
                      entropy_loss=per_sample - codebook)  # Eq. (3)
        return z_q, indices, losses

    def extra_repr(self):
        return f"num_bits={self.num_bits} ({2 ** self.num_bits} codes), T={self.entropy_temperature}"

