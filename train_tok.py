"""
Stage 1 of Open-MAGVIT2: train the LFQ image tokenizer (tokenizer.py) as a VQGAN. One iteration:

    G:  L1(x, x_rec) + 1.0 LPIPS + 0.1 non-saturating GAN + 0.1 entropy (Eq. 3)
        + 0.25 commitment                                                      -> Adam step
    D:  hinge(D(x), D(x_rec)) + LeCAM (0.01 at 128px, 0.05 at 256px), real and fake in separate
        passes                                                                 -> Adam step
    EMA of the generator (0.999), used for evaluation and saved in the
    checkpoint for the next stage.

Quick start, CPU, built-in synthetic data (minutes):
    python train_tok.py --preset tiny --device cpu --out out/demo_tok
One GPU:
    python train_tok.py --preset imagenet128 --data /data/imagenet/train \
        --val-data /data/imagenet/val --out runs/tok128
    (with a small batch, e.g. --batch-size 8, the paper's per-GPU batch, add --compile
    --channels-last --cuda-graph: the step replays as a CUDA graph, 1.25-2.1x faster at 256px and
    2.8-5.5x at 128px than the compiled step alone, which is bound by the host CPU; bench.py --rows
    tok --compile)
Tiny-ImageNet at 64px in 7 minutes on one GPU, compile included (README, "Results"):
    python train_tok.py --preset tin64 --data train_part0.npz,train_part1.npz,train_part2.npz \
        --val-data val.npz --compile --channels-last --num-workers 8 --max-minutes 7 \
        --out runs/tin64
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train_tok.py --preset imagenet256 \
        --data /data/imagenet/train --val-data /data/imagenet/val --out runs/tok256
The paper's runs, 4 nodes x 8 GPUs (run on every node; NODE_RANK = 0..3, MASTER = the first
node's address):
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER \
        --master_port=29500 train_tok.py --preset imagenet256 --data /data/imagenet/train \
        --val-data /data/imagenet/val --out runs/tok256
Ascend NPUs: the same commands with --device npu (needs torch_npu; backend hccl).
After a crash: the same command plus --resume (continues from out/ckpt.pt exactly where it
stopped). Without --resume the same command refuses to touch the run; --overwrite deletes it and
starts again. --batch-size is global (all GPUs), as the paper quotes it: each of N processes takes
batch-size / N images, so a checkpoint also resumes on another number of GPUs (256 as 32 GPUs x 8
-> 8 GPUs x 32).
Fine-tuning: --init-from CKPT starts a new run (step 0, fresh Adam states, the lr schedule from its
start) from the weights of our tokenizer checkpoint or a released one (open-magvit2:PATH), which
must have the architecture of --model. The generator takes the file's raw weights and the EMA its
EMA weights (the raw ones if it has none): each continues from where it was, so training goes
on from the weights it reached, not from their average. The EMA's warm-up restarts at step 0,
so it soon follows the raw weights; the step-0 evaluation shows the file's EMA. The
discriminator and LeCAM come from our checkpoint; a released one starts them fresh. --resume
instead continues OUT's own run (optimizers, step, RNG); with --resume, --init-from is ignored.
--data takes 'synthetic', an ImageNet-style folder root/<class>/<image>, or .npz archive(s) (see
data.py).
"""

import argparse
import copy
import os
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
import tokenizer
import utils
from data import (EpochSampler, build_dataset, check_bad_fraction, collate_skip_bad,
                  ignore_stop_signals)
from losses import LeCAM, PatchDiscriminator, d_loss, load_lpips, non_saturating_g_loss
from quantizer import indices_to_codes

# -----------------------------------------------------------------------------
# presets: overrides of the command-line defaults below (which are the 256px run)

PRESETS = {
    # The official runs, configs/Open-MAGVIT2/gpu/imagenet_lfqgan_{128,256}_L.yaml: 4 nodes x 8
    # GPUs x batch 8 (global batch 256, our --batch-size), Adam(0.5, 0.9) lr 1e-4 for G and D
    # without warm-up or decay except x0.1 drops after the listed epochs, GAN from step 0 with
    # fixed weight 0.1 (the adaptive `disc_weight` 0.8 is never used),
    # PatchGAN ndf 64 / 3 layers / BatchNorm (no SyncBatchNorm), LeCAM EMA decay 0.999, generator
    # EMA on, fp16 mixed precision (we use bf16, which needs no loss scaling).
    'imagenet128': dict(model='imagenet128', image_size=128, batch_size=256, epochs=350,
                        lr_drops=[250, 300], lecam_weight=0.01),
    'imagenet256': dict(model='imagenet256', image_size=256, batch_size=256, epochs=270,
                        lr_drops=[200, 250], lecam_weight=0.05),
    # Tiny-ImageNet (or any 64px data) in minutes on one GPU, judged on held-out PSNR: the paper's
    # 16x16 token grid at 64px (the tin64 model). Departures from the paper, each for the short
    # budget: batch 128 and a 10x higher lr, 100 warm-up steps and a linear cooldown over the last
    # 30% (the paper: batch 256, lr 1e-4 constant with two x0.1 drops); the GAN off (it trades
    # PSNR for sharpness and costs a D step); LPIPS off only because its VGG16 weights need a
    # download (with them at hand, --perceptual-weight 1.0 as the paper); evaluations on 2,000
    # held-out images, the last on all of them. Pass --max-minutes (or --max-steps)
    'tin64': dict(model='tin64', image_size=64, batch_size=128, lr=1e-3, warmup_steps=100,
                  cooldown=0.3, perceptual_weight=0.0, gan_weight=0.0, eval_every=250,
                  eval_images=2000, log_every=25),
    # built-in shapes at 32px, minutes on a CPU. No LPIPS (its VGG weights are 528 MB); a higher
    # lr; a weak GAN: at 32px the PatchGAN judges 2x2 patches, and the paper's 0.1 costs PSNR in a
    # short run; a stronger LeCAM, which is meant for small datasets like this one
    'tiny': dict(model='tiny', data='synthetic', image_size=32, batch_size=16, max_steps=500,
                 lr=4e-4, perceptual_weight=0.0, gan_weight=0.01, lecam_weight=0.1,
                 eval_every=250, ckpt_every=250, log_every=10),
}
# the flags that may differ on --resume (utils.check_resume): where and how fast the run goes, how
# often it logs, evaluates and saves, when it stops (--max-steps, --max-minutes) (the lr drops are
# per epoch, so --epochs only moves the end), where the fixed pretrained weights are read from.
# Every other flag changes what is trained and must match. A preset is only a name: the values it
# sets are compared one by one.
RESUME_MAY_CHANGE = {'resume', 'overwrite', 'eval_only', 'device', 'out', 'num_workers',
                     'compile', 'channels_last', 'epochs', 'max_steps', 'eval_every',
                     'eval_images', 'ckpt_every', 'log_every', 'val_data', 'vgg_weights',
                     'lpips_weights', 'inception_weights', 'preset', 'max_minutes',
                     'cuda_graph'}


def get_args(argv=None):
    """The command line: the defaults are the 256px run, a --preset replaces them."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', choices=sorted(PRESETS), help="a named run: its --model and "
                        "training settings (see PRESETS; the defaults are the 256px run)")
    parser.add_argument('--data', default='synthetic',
                        help="'synthetic', an image folder, or .npz file(s)")
    parser.add_argument('--val-data',
                        help="held-out images (default: --data center-cropped; synthetic: its own)")
    parser.add_argument('--out', default='out/tok',
                        help="folder for ckpt.pt, log.csv and the image grids")
    parser.add_argument('--device', default='cuda', choices=utils.DEVICES)
    parser.add_argument('--resume', action='store_true', help="continue from OUT/ckpt.pt")
    parser.add_argument('--init-from', help="start from the weights of a tokenizer checkpoint "
                        "(ours, or open-magvit2:PATH) at step 0 with fresh optimizers")
    parser.add_argument('--overwrite', action='store_true',
                        help="delete the run in --out and start again")
    parser.add_argument('--eval-only', metavar='CKPT',
                        help="only evaluate this tokenizer checkpoint (ours, or a "
                        "released one as open-magvit2:PATH) on the held-out images, then exit")
    # model and data
    parser.add_argument('--model', default='imagenet256', choices=sorted(tokenizer.PRESETS),
                        help="architecture (tokenizer.PRESETS)")
    parser.add_argument('--image-size', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=256,
                        help="global: split evenly over the processes")
    parser.add_argument('--num-workers', type=int,
                        help="DataLoader workers per process (default 4, 0 on cpu)")
    parser.add_argument('--seed', type=int, default=0)
    # optimisation
    parser.add_argument('--epochs', type=int, default=270)
    parser.add_argument('--max-steps', type=int, default=0,
                        help="stop after this many steps (0: run --epochs)")
    parser.add_argument('--lr', type=float, default=1e-4,
                        help="for the generator and the discriminator")
    parser.add_argument('--lr-drops', type=int, nargs='*', default=[200, 250],
                        help="epochs where lr drops x0.1")
    parser.add_argument('--warmup-steps', type=int, default=0,
                        help="linear lr warm-up (the paper has none)")
    parser.add_argument('--cooldown', type=float, default=0.0,
                        help="fraction of the run (of --max-steps, or of --max-minutes) at the "
                        "end over which lr decays linearly to 0 (the paper: none)")
    parser.add_argument('--max-minutes', type=float, default=0,
                        help="wall-clock budget from the start, compile included: stop in time "
                        "for the final evaluation and checkpoint (0: no limit)")
    parser.add_argument('--ema-decay', type=float, default=0.999)
    # loss weights (L1 has weight 1)
    parser.add_argument('--perceptual-weight', type=float, default=1.0,
                        help="LPIPS; 0 trains without VGG")
    parser.add_argument('--gan-weight', type=float, default=0.1,
                        help="0 trains without the discriminator")
    parser.add_argument('--entropy-weight', type=float, default=0.1)
    parser.add_argument('--commit-weight', type=float, default=0.25)
    parser.add_argument('--lecam-weight', type=float, default=0.05)
    parser.add_argument('--vgg-weights',
                        help="vgg16-397923af.pth (default: cache folder / download)")
    parser.add_argument('--lpips-weights',
                        help="LPIPS v0.1 vgg.pth (default: cache folder / download)")
    parser.add_argument('--inception-weights', help="FID Inception weights for rFID (see fid.py)")
    # evaluation, logging, checkpoints, speed
    parser.add_argument('--eval-every', type=int, default=5000,
                        help="steps; also before the first and after the last")
    parser.add_argument('--eval-images', type=int, default=0,
                        help="held-out images to evaluate (0: all)")
    parser.add_argument('--log-every', type=int, default=100)
    parser.add_argument('--ckpt-every', type=int, default=5000)
    parser.add_argument('--compile', action='store_true',
                        help="torch.compile the tokenizer's blocks, the "
                        "discriminator and LPIPS (compile_step_modules)")
    parser.add_argument('--channels-last', action='store_true',
                        help="NHWC memory layout (faster convs on GPUs)")
    parser.add_argument('--cuda-graph', action='store_true',
                        help="replay G's and D's updates as one CUDA graph (GraphedUpdate): for "
                        "small batches, where launching kernels is slower than running them; "
                        "one GPU, one process")
    args = parser.parse_args(argv)
    if args.preset:  # preset values replace the defaults; flags given on the command line still win
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.num_workers is None:
        args.num_workers = 0 if args.device == 'cpu' else 4
    return args


# -----------------------------------------------------------------------------
# the models, their optimisers, and one training iteration


def build(args, env):
    """The run: the tokenizer (G), its EMA, PatchGAN (D), LeCAM state, LPIPS and both optimisers,
    wrapped for DDP / compile, as one namespace that the step and the loop read. `model` and
    `disc` are what the step calls; `raw_model` and `raw_disc` hold the weights (for
    checkpoints)."""
    if args.cuda_graph and (env.device_type != 'cuda' or env.ddp):
        raise SystemExit("--cuda-graph needs one CUDA GPU in one process (--device cuda, no "
                         "torchrun): leave it out")
    torch.manual_seed(args.seed)  # every rank builds the same initial weights
    raw_model = tokenizer.Tokenizer.from_preset(args.model,
                                                image_size=args.image_size).to(env.device)
    # BatchNorm stays per-GPU, as the official code (no SyncBN)
    raw_disc = PatchDiscriminator().to(env.device)
    if args.channels_last:  # NHWC: the layout tensor cores want for convolutions
        raw_model.to(memory_format=torch.channels_last)
        raw_disc.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()  # fp32 copy, never trained directly
    lpips = None
    if args.perceptual_weight > 0:
        if not env.is_main:
            # rank 0 finds or downloads the weights first, then the others read its cache
            utils.barrier()
        lpips = load_lpips(args.vgg_weights, args.lpips_weights).to(env.device)
        if env.is_main:
            utils.barrier()
    if args.compile:
        compile_step_modules(raw_model, raw_disc, lpips)
    device_ids = [env.local_rank] if env.device_type == 'cuda' else None
    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, so no second 448 MB
    # copy of them is kept and none is made each step
    model = DDP(raw_model, device_ids=device_ids,
                gradient_as_bucket_view=True) if env.ddp else raw_model
    # broadcast_buffers=False: D runs twice before its backward, and re-broadcasting the BatchNorm
    # running stats at the second forward would overwrite tensors the first one saved for backward.
    # D never runs in eval mode, so its running stats are unused (the official code calls D inside
    # one DDP forward, which broadcasts once)
    disc = DDP(raw_disc, device_ids=device_ids, broadcast_buffers=False) if env.ddp else raw_disc
    # fused Adam on CUDA: one kernel for all 112M parameters instead of a dozen per-tensor-group
    # launches. capturable: its step count stays on the GPU, as a CUDA graph needs
    adam = dict(lr=args.lr, betas=(0.5, 0.9), fused=env.device_type == 'cuda',
                capturable=args.cuda_graph)
    run = SimpleNamespace(
        model=model, raw_model=raw_model, ema=ema, disc=disc, raw_disc=raw_disc,
        lecam=LeCAM().to(env.device),
        lpips=lpips, opt_g=torch.optim.Adam(raw_model.parameters(), **adam),
        opt_d=torch.optim.Adam(raw_disc.parameters(), **adam), device_type=env.device_type)
    run.graphed = GraphedUpdate(run, args) if args.cuda_graph else None
    return run


def set_lr(run, lr):
    """The learning rate of both optimisers. With --cuda-graph the graph reads it from one GPU
    tensor, filled in place (an asynchronous copy, no host sync); a float otherwise."""
    if run.graphed is not None:
        run.graphed.lr.fill_(lr)
    for opt in (run.opt_g, run.opt_d):
        for group in opt.param_groups:
            # (the tensor also replaces the float a resumed optimiser state brings)
            group['lr'] = lr if run.graphed is None else run.graphed.lr


def compile_step_modules(model, disc, lpips=None):
    """torch.compile, in place, what one iteration runs: the tokenizer's repeated blocks
    (tokenizer.compile_blocks), the discriminator and LPIPS. Compiling the blocks rather than the
    whole tokenizer is what keeps compile time short: the 40-odd ResBlocks come in a handful of
    structures, and blocks of one structure and size share one compiled graph. Inside each graph
    Inductor fuses GroupNorm + swish + the bf16 casts around the convolutions."""
    tokenizer.compile_blocks(model)
    # Dynamo's default sizes: fixed first (D sees one batch shape in training)
    disc.compile(options=tokenizer.INDUCTOR_OPTIONS)
    if lpips is not None:
        lpips.compile(options=tokenizer.INDUCTOR_OPTIONS)


def train_step(x, run, args, step):
    """One iteration on x (B, 3, H, W) in [-1, 1]: G step, D step (update_g_and_d, replayed as a
    CUDA graph with --cuda-graph), EMA update. Returns the detached losses."""
    losses = update_g_and_d(x, run, args) if run.graphed is None else run.graphed(x)
    # --- EMA of the generator, in fp32. The decay ramps up as the official LitEma, min(decay,
    # (1+n)/(10+n)), so that early (and short) runs evaluate a useful average instead of the random
    # initialisation
    decay = min(args.ema_decay, (1 + step) / (10 + step))
    # ema += (1 - decay) (raw - ema), all parameters in one fused call; the buffers are not averaged
    torch._foreach_lerp_(list(run.ema.parameters()), list(run.raw_model.parameters()), 1 - decay)
    return losses


def update_g_and_d(x, run, args):
    """G's and D's losses and Adam steps on x (B, 3, H, W). Returns the detached losses. With
    --gan-weight 0 there is no D: neither its term in G's loss nor its own step. No host syncs:
    GraphedUpdate records this function as it is."""
    use_gan = args.gan_weight > 0
    # --- generator. D only judges here: frozen, so no weight gradients and no DDP hooks; its raw
    # module is called because a DDP forward without a matching gradient all-reduce would break the
    # next D step
    run.raw_disc.requires_grad_(False)
    zero = torch.zeros((), device=x.device)
    with utils.autocast(run.device_type):
        # (B, 3, H, W), and Eq. (3) terms from LFQ (global batch under DDP)
        x_rec, _, quantizer_losses = run.model(x)
        recon = (x_rec.float() - x).abs().mean()  # L1 in fp32
        # LPIPS distance per image, averaged
        perceptual = run.lpips(x, x_rec).mean() if run.lpips is not None else zero
        # softplus(-mean) of each image's (B, 1, h, w) patch logits, in fp32
        g_gan = non_saturating_g_loss(run.raw_disc(x_rec).float()) if use_gan else zero
    g_loss = (recon + args.perceptual_weight * perceptual + args.gan_weight * g_gan
              + args.entropy_weight * quantizer_losses['entropy_loss']  # Eq. (3)
              + args.commit_weight * quantizer_losses['commitment_loss'])
    run.opt_g.zero_grad(set_to_none=True)
    g_loss.backward()  # DDP all-reduces G's gradients here
    run.opt_g.step()

    # --- discriminator: hinge + LeCAM, real and fake in separate passes (losses.d_loss, the
    # official order)
    d_parts = dict.fromkeys(('d_hinge', 'd_lecam', 'logits_real', 'logits_fake'), zero)
    loss_d = zero
    if use_gan:
        run.raw_disc.requires_grad_(True)

        def judge(images):  # (B, 3, H, W) -> (B, 1, h, w) patch logits in fp32
            with utils.autocast(run.device_type):
                return run.disc(images).float()
        # d_loss detaches x and x_rec: D's backward stops at D
        loss_d, d_parts = d_loss(judge, x, x_rec, run.lecam, args.lecam_weight)
        run.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        run.opt_d.step()
    return {'recon': recon, 'lpips': perceptual, 'g_gan': g_gan,
            'commit': quantizer_losses['commitment_loss'],
            'per_sample_entropy': quantizer_losses['per_sample_entropy'],
            'codebook_entropy': quantizer_losses['codebook_entropy'], 'd_loss': loss_d,
            **d_parts}  # d_hinge, d_lecam (D's two terms), logits_real, logits_fake


class GraphedUpdate(utils.CUDAGraphed):
    """--cuda-graph: update_g_and_d recorded once as a CUDA graph, then replayed for every batch
    of the same shape (utils.CUDAGraphed). At batch 8 the host needs longer to launch an
    iteration's kernels one by one than the GPU to run them (bench.py --rows tok_step_256_b8
    --profile). The batch is copied into the graph's input buffer; the learning rate of both
    optimisers is self.lr, a GPU tensor that set_lr fills in place; Adam is capturable."""

    def __init__(self, run, args):
        self.lr = torch.tensor(args.lr, device='cuda')
        super().__init__(lambda x: update_g_and_d(x, run, args), [run.opt_g, run.opt_d])


# -----------------------------------------------------------------------------
# evaluation on held-out images with the EMA weights


@torch.no_grad()
def evaluate(ema, val_set, args, env, step, num_images=None):
    """PSNR (official convention: both images truncated to uint8, PSNR per image, averaged),
    codebook usage (share of the 2^K codes used over the whole set), the share of +1 of each of the
    K bits and the number of dead bits (one sign on every token: a collapsed codebook shows here
    first), rFID when Inception weights are found, and a grid of reconstructions. num_images: how
    many held-out images (default --eval-images; 0 means all). Every rank evaluates its share of the
    images; sums are reduced over ranks, so memory does not grow with N."""
    # rFID only with the weights at hand: never downloaded here, a training run must not stall on
    # the network (a --inception-weights path that is missing is an error)
    inception_weights = args.inception_weights or fid.local_weights()
    inception = fid.load_inception(inception_weights, env.device) if inception_weights else None
    num_images = args.eval_images if num_images is None else num_images
    # a multiple of the world size: every rank evaluates as many images
    n = min(num_images or len(val_set), len(val_set)) // env.world_size * env.world_size
    loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size // env.world_size,
                                         num_workers=args.num_workers,
                                         sampler=range(env.rank, n, env.world_size),
                                         collate_fn=collate_skip_bad,
                                         worker_init_fn=ignore_stop_signals)
    num_bits = ema.config.num_bits
    seen = torch.zeros(2 ** num_bits, device=env.device)  # 1 for every code that occurs
    # tokens with bit k = 1; token count
    ones = torch.zeros(num_bits + 1, dtype=torch.float64, device=env.device)
    sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # PSNR sum, image count
    # sum of Inception features (2048,), of outer products
    moments = {name: [0, 0] for name in ('real', 'fake')}
    for i, (images, _, _) in enumerate(loader):
        if len(images) == 0:
            continue  # unreadable images are skipped (and reported by data.py)
        x = images.to(env.device)
        with utils.autocast(env.device_type):
            x_rec, indices, _ = ema(x)  # (B, 3, H, W), (B, h, w)
        x_rec = x_rec.float().clamp(-1, 1)
        seen[indices.flatten()] = 1
        # (B*h*w, K) in {0, 1}: bit k is 1 where channel k is positive
        bits = (indices_to_codes(indices.flatten(), num_bits) > 0).double()
        ones += torch.cat([bits.sum(0), bits.new_tensor([len(bits)])])
        # PSNR on the uint8 images, as the official evaluation: (B, H, W, 3) in 0..255
        real = torch.from_numpy(utils.to_uint8(x)).double()
        fake = torch.from_numpy(utils.to_uint8(x_rec)).double()
        mse = (real - fake).pow(2).mean((1, 2, 3))  # (B,) on 0..255 values
        # PSNR per image = 10 log10(255^2 / MSE), summed; clamp: an exact copy is finite
        sums += torch.tensor([(10 * torch.log10(255 ** 2 / mse.clamp_min(1e-10))).sum(), len(x)],
                             device=env.device)
        # rFID as the official evaluation: pytorch-fid's bilinear resize of (x + 1) / 2, no uint8
        # rounding (tests/conftest.py's rfid computes it directly, for the test)
        if inception is not None:
            for name, images01 in (('real', (x + 1) / 2), ('fake', (x_rec + 1) / 2)):
                pool = inception(images01, resize='bilinear')['pool'].double()  # (B, 2048)
                moments[name][0] += pool.sum(0)
                moments[name][1] += pool.T @ pool
        if i == 0 and env.is_main:  # the first batch: originals (top) vs. reconstructions (bottom)
            grid = os.path.join(args.out, f'recon_step{step}.png')
            utils.save_image_grid(torch.cat([x[:8], x_rec[:8]]), grid, nrow=min(8, len(x)))
    totals = utils.all_reduce_sum(sums)  # PSNR sum, image count over all ranks
    count = totals[1]
    bit_share = utils.all_reduce_sum(ones)
    # (K,) share of +1 per bit; 0.5 is a balanced bit
    bit_share = (bit_share[:-1] / bit_share[-1]).tolist()
    metrics = {'psnr': (totals[0] / count).item(),
               'codebook_usage': (utils.all_reduce_sum(seen) > 0).sum().item() / 2 ** num_bits,
               'dead_bits': sum(share in (0.0, 1.0) for share in bit_share),
               **{f'bit{k}': share for k, share in enumerate(bit_share)}}
    if inception is not None:
        stats = []
        # mean and covariance (N - 1, as np.cov) from the summed moments
        for first, second in moments.values():
            mu = utils.all_reduce_sum(first) / count  # (2048,)
            second_moment = utils.all_reduce_sum(second) / count  # (2048, 2048): E[x x^T]
            # N/(N-1) (E[x x^T] - mu mu^T)
            sigma = (second_moment - torch.outer(mu, mu)) * count / (count - 1)
            stats += [mu.cpu().numpy(), sigma.cpu().numpy()]
        metrics['rfid'] = fid.frechet_distance(*stats)
    else:
        utils.print0(f"rFID skipped (no Inception weights: put {fid.WEIGHTS_NAME} from "
                     f"{fid.WEIGHTS_URL} in {utils.CACHE_DIR} or pass --inception-weights PATH)")
    utils.print0(f"eval step {step} ({n} held-out images, EMA weights): "
                 + ', '.join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.startswith('bit')))
    utils.print0("  share of +1 per bit: " + ' '.join(f"{share:.2f}" for share in bit_share))
    return metrics


# -----------------------------------------------------------------------------
# the training loop


def init_from(run, path):
    """--init-from: the weights of our tokenizer checkpoint or of a released one
    (open-magvit2:PATH) into the new `run`: raw weights to the generator, EMA weights to its EMA
    (the raw ones if the file has none), and from our checkpoints D and LeCAM too. The file must
    hold the architecture of --model (any training image size): a difference is refused."""
    init = utils.load_checkpoint(path)  # open-magvit2:PATH loads a released file in full
    raw = tokenizer.Tokenizer.from_checkpoint(init, ema=False)
    try:
        ema = tokenizer.Tokenizer.from_checkpoint(init, ema=True)  # ours without 'ema': raw
    except KeyError:  # a released file without EMA entries
        ema = raw
    shape = [k for k in asdict(raw.config) if k != 'image_size']
    utils.check_config({k: asdict(raw.config)[k] for k in shape},
                       {k: asdict(run.raw_model.config)[k] for k in shape}, path)
    run.raw_model.load_state_dict(raw.state_dict())
    run.ema.load_state_dict(ema.state_dict())
    if init.get('kind') == 'tokenizer' and init.get('disc') is not None:
        run.raw_disc.load_state_dict(init['disc'])
        run.lecam.load_state_dict(init['lecam'])  # the EMAs of this discriminator's logits


def resume(run, ckpt_path, args):
    """--resume: the run's own state back into `run` (weights, EMA, D, LeCAM, both Adams, RNG),
    after utils.check_resume has compared the flags. Returns (step, epoch, batch_in_epoch,
    elapsed_s). --batch-size is global, so 2 GPUs x 32 may resume as 1 GPU x 64 and back. The
    data order is the same (EpochSampler gives each step the same global slice of the
    permutation at any world size); what changes is only D's BatchNorm, whose statistics are per
    GPU as in the official code."""
    ckpt = utils.load_checkpoint(ckpt_path, expect_kind='tokenizer')
    utils.check_resume(ckpt, asdict(run.raw_model.config), vars(args), RESUME_MAY_CHANGE, ckpt_path)
    for module, key in ((run.raw_model, 'model'), (run.ema, 'ema'), (run.raw_disc, 'disc'),
                        (run.lecam, 'lecam')):
        module.load_state_dict(ckpt[key])
    for opt, key in ((run.opt_g, 'opt_g'), (run.opt_d, 'opt_d')):
        utils.load_optimizer_state(opt, ckpt[key])  # with this run's --cuda-graph
    utils.set_rng_state(ckpt['rng'])
    return ckpt['step'], ckpt['epoch'], ckpt['batch_in_epoch'], ckpt.get('elapsed_s', 0.0)


def main(argv=None):
    # --max-minutes counts from here: building and compiling are part of the budget
    start_time = time.time()
    args = get_args(argv)
    env = utils.setup(args.device)
    micro_batch, rem = divmod(args.batch_size, env.world_size)  # images per process and step
    if rem or micro_batch == 0:
        raise ValueError(f"--batch-size {args.batch_size} (global) does not split evenly over "
                         f"{env.world_size} processes: pass a multiple of {env.world_size} (the "
                         "official runs: 256 = 32 GPUs x 8), or run on a number of GPUs that "
                         "divides it")
    # PSNR / usage / rFID of a finished tokenizer, e.g. the released 256px one (rFID 1.17)
    if args.eval_only:
        model = tokenizer.Tokenizer.from_checkpoint(args.eval_only).to(env.device).eval()
        os.makedirs(args.out, exist_ok=True)
        val_set = build_dataset(args.val_data or args.data, args.image_size, train=False)
        metrics = evaluate(model, val_set, args, env, step='_eval_only')
        utils.cleanup()
        return metrics
    # before any work: a fresh run must not overwrite the one in --out
    ckpt_path = utils.prepare_run_folder(args.out, args.resume, args.overwrite, env.is_main)
    run = build(args, env)
    if args.init_from and not args.resume:  # fine-tuning: weights only, step 0, fresh Adam
        init_from(run, args.init_from)
        utils.print0(f"initialised from the weights of {args.init_from}")
    config = asdict(run.raw_model.config)
    step = epoch = batch_in_epoch = 0
    if args.resume:
        step, epoch, batch_in_epoch, elapsed_s = resume(run, ckpt_path, args)
        start_time -= elapsed_s  # a budget (--max-minutes) goes on where it stopped
        utils.print0(f"resumed from {ckpt_path} at step {step} (epoch {epoch}, "
                     f"batch {batch_in_epoch})")

    # data: a rank-sharded order that can start mid-epoch (augmentation is a function of (seed,
    # epoch, index))
    train_set = build_dataset(args.data, args.image_size, train=True, seed=args.seed)
    val_set = build_dataset(args.val_data or args.data, args.image_size, train=False,
                            seed=args.seed)
    if args.data != 'synthetic' and not args.val_data:
        utils.print0("warning: no --val-data, so the evaluation uses center crops of the "
                     "training images")
    sampler = EpochSampler(len(train_set), env.rank, env.world_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=micro_batch, sampler=sampler,
                                         drop_last=True, num_workers=args.num_workers,
                                         collate_fn=collate_skip_bad,
                                         pin_memory=env.device_type == 'cuda',
                                         persistent_workers=args.num_workers > 0,
                                         worker_init_fn=ignore_stop_signals)
    # full global batches only (drop_last)
    steps_per_epoch = len(train_set) // args.batch_size
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    millions = [sum(p.numel() for p in m.parameters()) / 1e6
                for m in (run.raw_model, run.raw_disc)]
    utils.print0(f"tokenizer {args.model}: {millions[0]:.2f}M params, discriminator "
                 f"{millions[1]:.2f}M; {len(train_set)} training images at {args.image_size}px; "
                 f"global batch {args.batch_size} = "
                 f"{micro_batch} per process x {env.world_size}; {steps_per_epoch} steps/epoch, "
                 f"{max_steps} steps")

    num_bits = run.raw_model.config.num_bits
    fields = ['step', 'epoch', 'minutes', 'lr',  # training rows: the means since the last one
              'recon', 'lpips', 'g_gan', 'per_sample_entropy', 'codebook_entropy', 'commit',
              'd_loss', 'd_hinge', 'd_lecam', 'logits_real', 'logits_fake',
              'img_per_s', 'peak_mem_gib', 'bad_images',
              # evaluation rows: held-out metrics and the share of +1 of each bit
              'psnr', 'codebook_usage', 'rfid', 'dead_bits'] + [f'bit{k}' for k in range(num_bits)]
    csv_log = utils.CSVLog(os.path.join(args.out, 'log.csv'), fields, env.is_main,
                           resume_step=step if args.resume else None)

    def log_row(row):  # with the wall-clock minutes since the start, compile included
        csv_log.write({**row, 'minutes': (time.time() - start_time) / 60})

    def save():
        if env.is_main:
            utils.save_checkpoint(ckpt_path, {
                'kind': 'tokenizer', 'config': config, 'train_args': vars(args),
                'model': run.raw_model.state_dict(), 'ema': run.ema.state_dict(),
                'disc': run.raw_disc.state_dict(), 'lecam': run.lecam.state_dict(),
                'opt_g': run.opt_g.state_dict(), 'opt_d': run.opt_d.state_dict(),
                'step': step, 'epoch': epoch, 'batch_in_epoch': batch_in_epoch,
                'rng': utils.rng_state(), 'world_size': env.world_size,
                'elapsed_s': time.time() - start_time})  # the budget used so far

    eval_start = time.time()
    if step == 0:  # the "before" numbers
        log_row({'step': 0, 'epoch': 0, **evaluate(run.ema, val_set, args, env, 0)})
    eval_s = time.time() - eval_start if step == 0 else 30.0  # on resume: a guess
    # --max-minutes: the run ends when the budget, less a reserve for the last evaluation (every
    # held-out image) and checkpoint, is spent. Every rank must stop at the same step and use the
    # same lr, so the end is planned in steps: at each log line rank 0 turns the time left and the
    # measured step rate into planned_steps
    budget_s, planned_steps = args.max_minutes * 60, max_steps

    def reserve(seconds):  # seconds: an evaluation of eval_images held-out images
        # the last evaluation sees every held-out image; the margin covers the checkpoint and a log
        # interval
        eval_images = min(args.eval_images or len(val_set), len(val_set))
        return 1.5 * seconds * len(val_set) / eval_images + min(30.0, 0.05 * budget_s)
    reserve_s = reserve(eval_s)

    run.model.train()
    pbar = tqdm(total=max_steps, initial=step, disable=not env.is_main, dynamic_ncols=True)
    stop = utils.StopOnSignal()  # Ctrl-C, SIGTERM: a checkpoint after the step, then exit
    sums, num_summed, images_seen, num_bad, num_seen, t0 = {}, 0, 0, 0, 0, time.time()
    while step < planned_steps:
        sampler.set_epoch(epoch, start=batch_in_epoch * micro_batch)
        for images, _, dropped in loader:
            # learning rate: constant, x0.1 at each of --lr-drops (the official lr_drop_epoch,
            # applied per epoch); optional linear warm-up and a linear cooldown to 0 over the last
            # --cooldown of the run
            lr = args.lr * 0.1 ** sum(epoch >= e for e in args.lr_drops)
            if args.warmup_steps:
                lr *= min(1.0, (step + 1) / args.warmup_steps)
            if args.cooldown:
                # 1 until the last --cooldown fraction, then linearly to 0 at planned_steps
                lr *= min(1.0, (1 - step / planned_steps) / args.cooldown)
            set_lr(run, lr)
            num_bad, num_seen = num_bad + dropped, num_seen + dropped + len(images)
            # a few unreadable files are skipped, many stop the run
            check_bad_fraction(num_bad, num_seen)
            if len(images) == 0:
                continue  # every image of this batch was unreadable
            x = images.to(env.device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                losses = train_step(x, run, args, step)
            except torch.OutOfMemoryError:
                raise SystemExit(
                    f"out of {env.device_type} memory at step {step} with {micro_batch} images "
                    f"per process (--batch-size {args.batch_size} over {env.world_size} "
                    "processes): pass a smaller --batch-size, or run on more GPUs") from None
            step, batch_in_epoch, images_seen = step + 1, batch_in_epoch + 1, images_seen + len(x)
            pbar.update(1)
            # summed on the device: no host sync until the next log line
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
            num_summed += 1

            if step % args.log_every == 0 or step >= planned_steps:
                names = list(sums)
                # one all-reduce and one host sync per log line: the means over the interval and the
                # ranks
                means = utils.all_reduce_mean(torch.stack([sums[k] for k in names]) / num_summed)
                means = means.tolist()
                row = {'step': step, 'epoch': epoch, 'lr': lr, **dict(zip(names, means)),
                       'bad_images': num_bad,
                       'img_per_s': images_seen * env.world_size / (time.time() - t0),
                       # this rank's, since the start
                       'peak_mem_gib': utils.peak_memory_gib(env.device_type)}
                log_row(row)
                shown = ('recon', 'lpips', 'g_gan', 'd_loss', 'd_hinge', 'per_sample_entropy',
                         'codebook_entropy', 'commit', 'img_per_s')
                pbar.set_postfix({k: f"{row[k]:.3g}" for k in shown})
                if budget_s:  # re-plan the end of the run from the step rate of this log interval
                    left_s = budget_s - reserve_s - (time.time() - start_time)
                    rate = num_summed / (time.time() - t0)  # steps per second
                    planned_steps = utils.plan_last_step(step, left_s, rate, max_steps, env)
                sums, num_summed, images_seen, t0 = {}, 0, 0, time.time()
            if stop.agreed(step, env.device):  # no evaluation: the grace period may be short
                save()
                pbar.close()
                stop.exit(step, ckpt_path)
            last = step >= planned_steps
            t_pause = time.time()  # evaluation and checkpoints do not count in img/s
            if step % args.eval_every == 0 or last:  # the last evaluation uses every held-out image
                metrics = evaluate(run.ema, val_set, args, env, step,
                                   num_images=0 if last else None)
                log_row({'step': step, 'epoch': epoch, **metrics})
                # the reserve from this evaluation's time: the one at step 0 also paid for one-off
                # warm-ups (the first batches, kernel selection), so a reserve from it alone is
                # too large and leaves part of the budget unused
                reserve_s = reserve(time.time() - t_pause)
            if step % args.ckpt_every == 0 or last:
                save()
            t0 += time.time() - t_pause
            if last:
                break
        else:  # the epoch ran out (no break)
            epoch, batch_in_epoch = epoch + 1, 0
    pbar.close()
    stop.restore()
    if num_bad:
        utils.print0(f"skipped {num_bad} unreadable images of {num_seen} (see the warnings above)")
    memory = f"; peak memory {utils.peak_memory_gib(env.device_type):.2f} GiB on rank 0"
    utils.print0(f"done: {step} steps in {(time.time() - start_time) / 60:.1f} minutes, "
                 f"checkpoint {ckpt_path}" + (memory if env.device_type != 'cpu' else ''))
    # every rank prints its own: equal checksums show that DDP kept the generators bit-identical
    print(f"rank {env.rank}: generator weights sha256 {utils.weights_checksum(run.raw_model)}",
          flush=True)
    utils.cleanup()
    run.num_bad = num_bad
    return run


if __name__ == '__main__':
    main()
