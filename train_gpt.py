"""
Stage 2 of Open-MAGVIT2: train the class-conditional auto-regressive generator (gpt.py) on the
18-bit tokens of a frozen tokenizer (tokenizer.py, trained by train_tok.py). Loss: CE(pre) +
CE(post), paper Eq. (7).

Optimisation as the official configs
(configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_{B,L,XL}.yaml): AdamW(0.9, 0.95), weight decay
0.05, gradient clipping 1.0, class dropout 0.1 (in gpt.py), global batch 768 with a peak lr of 3e-4
(B, L) / 2.4e-4 (XL) that we scale linearly with the global batch, 300 / 300 / 350 epochs, and the
schedule of `get_lr`. The official code trains in fp16 mixed precision; we use bf16 autocast on GPU
/ NPU (no loss scaling) and fp32 on CPU. Tokenizer weights: EMA by default; the official AR configs
load the *raw* weights (first_stage_config `use_ema: False`, which makes init_from_ckpt skip the
model_ema.* entries): pass --no-ema for that.

Two ways to feed it tokens, both with resize + random crop, a pure function of (seed, epoch,
image), and no horizontal flip, as the official AR data pipeline (--hflip adds random flips):
  on the fly (as the official code): the frozen tokenizer encodes every batch;
  pre-extracted: extract_codes.py encodes augmented views of the dataset once, then train with no
  tokenizer encoding (epoch e reads view e % views):
      python extract_codes.py --tokenizer out/tok/ckpt.pt --data /data/imagenet/train \
          --codes out/codes
      python train_gpt.py --preset B --codes out/codes --tokenizer out/tok/ckpt.pt --out out/gpt_B
  (--tokenizer is optional with --codes: it only decodes the sample grids.)
Held-out loss: --val-data /data/imagenet/val (centre crops, encoded once at the start) or
--val-codes out/codes_val (from extract_codes.py --val) logs the mean CE of the pre and post
sub-tokens, in nats and in bits per token, at step 0 and at every evaluation (eval mode: no
dropout, the true labels).

Single GPU:  python train_gpt.py --preset B --tokenizer out/tok/ckpt.pt \
                 --data /data/imagenet/train --out out/gpt_B
One node:    torchrun --standalone --nproc_per_node 8 train_gpt.py --preset B --tokenizer ... \
                 --data ... --out ...
Two nodes:   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST \
                 --master_port 29500 train_gpt.py --preset XL ...
             (and --node_rank 1 on the second node; shared file system)
Ascend NPU:  torchrun --standalone --nproc_per_node 8 train_gpt.py --device npu --preset B ...
CPU demo:    python train_gpt.py --preset tiny --device cpu --tokenizer out/demo_tok/ckpt.pt \
                 --out out/demo_gpt
Resume:      the same command plus --resume (model, optimizer, step, data order and RNG: the run
             continues exactly),
             also on another number of GPUs (same global --batch-size; add --grad-accum if it no
             longer fits). Without --resume the same command refuses to touch the run; --overwrite
             deletes it and starts again.
             --max-steps N stops at step N of the full schedule, with a checkpoint to --resume from.
Time budget: --max-minutes M ends the run within M minutes of wall clock, compilation included,
             with a checkpoint: the last step is planned from the measured step rate at each log
             line, and the lr schedule (warm-up, plateau, linear decay) ends there. A short run
             wants a short --warmup-epochs. --epochs stays the upper bound.
Faster:      --compile fuses the element-wise work; --cuda-graph (one CUDA GPU, one process) also
             replays the whole step as a CUDA graph (GraphedStep), for small batches where the
             host is the limit.
Fine-tune:   --init-from CKPT starts a new run (step 0, fresh AdamW state, the full lr schedule)
             from the weights of our GPT checkpoint or a released one (open-magvit2:AR_256_B.ckpt);
             the network built here (--preset, the data's classes and token grid) must match.
             --resume instead continues OUT's own run with its optimizer and step; with --resume,
             --init-from is ignored.
Outputs in --out: ckpt.pt, log.csv, samples_stepN.png (a few fixed classes at each evaluation).
"""

import argparse
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from gpt import GPT
from gpt import PRESETS as GPT_PRESETS
from quantizer import split_indices
from sample import generate_images
from tokenizer import Tokenizer
from utils import (DEVICES, OFFICIAL_PREFIX, CSVLog, CUDAGraphed, StopOnSignal, all_reduce_mean,
                   all_reduce_sum, autocast, barrier, check_config, check_kind, check_resume, cleanup,
                   load_checkpoint, load_optimizer_state, peak_flops, peak_memory_gib,
                   plan_last_step, prepare_run_folder, print0, rng_state, save_checkpoint,
                   save_image_grid, set_rng_state, setup, weights_checksum)

# -----------------------------------------------------------------------------
# the learning-rate schedule and one optimisation step


def get_lr(step, total_steps, warmup_steps, peak_lr, start_ratio=0.005, end_ratio=0.1,
           plateau=0.05):
    """The official schedule (lr_wd_annealing, from VAR): linear warmup from start_ratio * peak over
    warmup_steps, then the peak for the first `plateau` fraction of the remaining steps, then linear
    decay to end_ratio * peak at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return peak_lr * (start_ratio + (1 - start_ratio) * step / warmup_steps)
    # 0 -> 1 after the warmup
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    if progress < plateau:
        return peak_lr
    # continuous at the plateau's end
    return peak_lr * (end_ratio + (1 - end_ratio) * (1 - progress) / (1 - plateau))


def train_step(model, optimizer, micro_batches, lr, device_type, grad_clip=1.0):
    """One optimisation step (bench.py times this): micro_batches is a list of (tokens (B, T) int64
    18-bit indices, labels (B,)) on the device, one per gradient-accumulation step. Returns the last
    micro-batch's (CE_pre, CE_post)."""
    # the schedule is applied by hand (no scheduler object): a resume needs only the step. lr is a
    # float, or (--cuda-graph, GraphedStep) a GPU tensor that the recorded AdamW kernel reads
    for group in optimizer.param_groups:
        group['lr'] = lr
    for i, (tokens, labels) in enumerate(micro_batches):
        pre, post = split_indices(tokens)  # (B, T) 6-bit and 12-bit sub-tokens
        # DDP all-reduces the gradients in backward: only the last micro-batch needs to, the others
        # accumulate
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast(device_type):
                logits_pre, _, loss = model(pre, post, labels)  # loss = CE(pre) + CE(post), Eq. (7)
            # divided by the micro-batch count: the summed gradients are those of the mean loss over
            # the whole batch
            (loss / len(micro_batches)).backward()
    # after the last backward: the norm of the gradient averaged over all ranks and micro-batches
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # split the logged loss into its two terms
        # (B*T, 2^pre_bits) logits against (B*T,) targets, in fp32 as the model's own loss
        loss_pre = F.cross_entropy(logits_pre.flatten(0, 1).float(), pre.flatten())
    # device tensors: no host sync until a log line reads them
    return loss_pre, loss.detach() - loss_pre


class GraphedStep(CUDAGraphed):
    """--cuda-graph: train_step recorded once as a CUDA graph, then replayed for every step
    (CUDAGraphed from utils.py, as train_tok.py's GraphedUpdate). The compiled B step at batch 24
    needs longer on the host to launch its forward, backward, clipping and AdamW kernels one by one
    than the GPU needs to run them (bench.py --rows gpt --gpt-batches 24 --compile --profile
    gpt_B_step). Each micro-batch's tokens and labels are copied into the graph's input buffers;
    the learning rate is self.lr, a GPU tensor filled in place; AdamW is capturable. Every step
    has the same shapes: the loader drops each epoch's short last batch."""

    def __init__(self, model, optimizer, grad_clip):
        self.lr = torch.tensor(0.0, device='cuda')

        def step(*tensors):  # tokens, labels of the first micro-batch, then of the next, ...
            micro_batches = list(zip(tensors[0::2], tensors[1::2]))
            return train_step(model, optimizer, micro_batches, self.lr, 'cuda', grad_clip)
        super().__init__(step, [optimizer])

    def __call__(self, micro_batches, lr):
        """micro_batches and the result as train_step's; lr a float."""
        self.lr.fill_(lr)  # an asynchronous copy to the GPU, no host sync
        return super().__call__(*[t for pair in micro_batches for t in pair])


# -----------------------------------------------------------------------------
# the frozen tokenizer, the held-out loss and --init-from


def load_tokenizer(path, ema, image_size, device, compile=False):
    """The frozen tokenizer (ours, or open-magvit2:PATH) on the device, for image_size pixels."""
    tokenizer = Tokenizer.from_checkpoint(path, ema=ema).to(device).eval().requires_grad_(False)
    if image_size % tokenizer.downsample:
        raise ValueError(f"--image-size {image_size} is not a multiple of the tokenizer's "
                         f"downsampling factor {tokenizer.downsample}")
    # the encoder (on the fly, extract_codes.py) with GroupNorm + swish fused and channels_last, as
    # bench.py's encode row (python bench.py --rows encode --compile). Dynamo's default sizes: fixed
    # for the first batch; a batch of another size (the last, the held-out set) recompiles once with
    # the batch alone symbolic (the image size does not change, so its reductions stay fixed-size)
    if compile:
        tokenizer = tokenizer.to(memory_format=torch.channels_last)
        tokenizer.encode = torch.compile(tokenizer.encode)
    return tokenizer


@torch.no_grad()
def encode_held_out(tokenizer, dataset, batch_size, env, num_workers):
    """This rank's share (images r, r+W, ...) of held-out images, encoded once: tokens (n, h*w) and
    labels (n,) int64 on the CPU. Unreadable images are left out (the dataset warns about each)."""
    # a range as the sampler: a fixed order, every image once over all ranks (no padding as
    # DistributedSampler's)
    rows = range(env.rank, len(dataset), env.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=rows,
                                         num_workers=num_workers, collate_fn=data.collate_skip_bad)
    grid = dataset.size // tokenizer.downsample
    tokens = [torch.zeros(0, grid * grid, dtype=torch.long)]  # a rank may get no image at all
    labels = [torch.zeros(0, dtype=torch.long)]
    for images, batch_labels, _ in loader:
        if len(images):
            with autocast(env.device_type):
                indices = tokenizer.encode(images.to(env.device))[1]  # (B, h, w)
            tokens.append(indices.flatten(1).cpu())  # (B, h*w)
            labels.append(batch_labels)
    # (n, h*w), (n,)
    return torch.cat(tokens), torch.cat(labels)


def held_out_codes(path, rank, world_size):
    """This rank's share of pre-extracted held-out codes (extract_codes.py --val): tokens (n, h*w),
    labels (n,) int64, and the folder's meta.json."""
    codes = data.CodesDataset(path)
    if codes.meta.get('made_from', {}).get('crop') != 'center' or codes.meta['views'] != 1:
        raise ValueError(f"--val-codes {path} is not one centre-crop view per image: write it "
                         "with python extract_codes.py --val ...")
    rows = codes.present[rank::world_size]  # (n,) rows of the codes that exist
    tokens = torch.from_numpy(codes.codes[0, rows].astype(np.int64)).flatten(1)  # view 0: (n, h*w)
    # CodesDataset's labels are aligned with `present`: the same rank::world_size rows
    return tokens, torch.from_numpy(codes.labels[rank::world_size].astype(np.int64)), codes.meta


@torch.no_grad()
def held_out_loss(model, tokens, labels, batch_size, device_type):
    """Mean cross-entropy (nats) of the pre and of the post sub-tokens of held-out tokens (n, h*w)
    and labels (n,): this rank's share; the sums and the token count are reduced over all ranks.
    Eval mode: no dropout, and the true labels (no class dropout). Returns (ce_pre, ce_post)."""
    was_training = model.training
    model.eval()
    device = model.pre_emb.weight.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # CE pre, CE post, positions
    for i in range(0, len(tokens), batch_size):
        pre, post = split_indices(tokens[i:i + batch_size].to(device))  # (B, T) each
        with autocast(device_type):
            # (B, T, 2^pre_bits), (B, T, 2^post_bits)
            logits_pre, logits_post, _ = model(pre, post, labels[i:i + batch_size].to(device))
        # sums, not means: divided once by the global position count, batches of any size weigh by
        # their tokens
        sums[0] += F.cross_entropy(logits_pre.flatten(0, 1).float(), pre.flatten(),
                                   reduction='sum')
        sums[1] += F.cross_entropy(logits_post.flatten(0, 1).float(), post.flatten(),
                                   reduction='sum')
        sums[2] += pre.numel()
    # back to the caller's mode: this runs mid-training
    model.train(was_training)
    sums = all_reduce_sum(sums)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


# the config fields that make the network; the others (dropout, sampling defaults) may differ
ARCH_FIELDS = ('vocab_bits', 'pre_bits', 'block_size', 'num_classes', 'n_inter', 'n_intra', 'dim',
               'n_head', 'rope_base')


def init_from(model, path):
    """--init-from: copy the weights of our GPT checkpoint, or of a released Open-MAGVIT2 AR one
    (open-magvit2:PATH, or a Lightning file with 'state_dict'), into `model`. The file must hold
    the same network (ARCH_FIELDS): a difference is refused, naming the fields."""
    official = path.startswith(OFFICIAL_PREFIX)
    ckpt = load_checkpoint(path)  # open-magvit2:PATH loads a released file in full
    if official or (isinstance(ckpt, dict) and 'state_dict' in ckpt):
        # shapes give the sizes, the preset of that width and depth the head count; the token grid
        # is not in the file (RoPE has no weights): ours is assumed
        saved = GPT.from_official(ckpt, block_size=model.config.block_size)
        config, state = asdict(saved.config), saved.state_dict()
        del saved
    else:
        check_kind(ckpt, 'gpt', path)
        config, state = ckpt['config'], ckpt['model']
    try:
        check_config({k: config.get(k) for k in ARCH_FIELDS},
                     {k: getattr(model.config, k) for k in ARCH_FIELDS}, path)
    except ValueError as e:
        raise ValueError(f"--init-from: {e}\n(the model here comes from --preset, the classes of "
                         "the data and --image-size / the tokenizer's grid)") from None
    model.load_state_dict(state)


# -----------------------------------------------------------------------------
# presets: named runs, overrides of the argparse defaults (which are the paper's B run);
# --model is the architecture (gpt.PRESETS), as --model in train_tok.py

PRESETS = {
    'B': dict(model='B'),
    'L': dict(model='L'),
    'XL': dict(model='XL', lr=2.4e-4, warmup_epochs=7, epochs=350),
    # CPU quick start (minutes): 4000 synthetic 32px images of 10 classes, an 8x8 token
    # grid; small batches and a high lr (4.2e-3 after scaling to batch 32) learn the most in the
    # time
    'tiny': dict(model='tiny', data='synthetic', image_size=32, batch_size=32, lr=0.1, epochs=7,
                 warmup_epochs=0.3, eval_every=125, log_every=10, num_workers=0,
                 sample_classes='0,1,2,3,4,5,6,7,8,9'),
}
# the flags that may differ on --resume (utils.check_resume): where and how fast the run goes
# (--grad-accum splits the same global batch), how often it logs and samples, where it stops
# (--max-steps keeps the schedule of --epochs; --max-minutes plans a new end from its budget).
# Every other flag (--tokenizer, --data, --codes, --batch-size...) changes what is trained. A
# preset is only a name: the values it sets are compared one by one.
RESUME_MAY_CHANGE = {'resume', 'overwrite', 'device', 'out', 'num_workers', 'compile',
                     'grad_accum', 'max_steps', 'max_minutes', 'eval_every', 'log_every',
                     'sample_classes', 'preset', 'cuda_graph'}


def get_args(argv=None):
    """The command line: argparse defaults are the paper's B run, a --preset replaces them."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', choices=list(PRESETS), help="a named run: its --model and "
                        "training settings (see PRESETS; the defaults are the paper's B run)")
    parser.add_argument('--model', default='B', choices=list(GPT_PRESETS),
                        help="architecture (gpt.PRESETS)")
    parser.add_argument('--tokenizer',
                        help="tokenizer checkpoint (ours, or an official one as open-magvit2:PATH)")
    parser.add_argument('--no-ema', dest='ema', action='store_false',
                        help="raw tokenizer weights, not EMA")
    parser.add_argument('--data', help="'synthetic', an ImageNet-style folder, or .npz archive(s)")
    parser.add_argument('--codes', help="folder of tokens from extract_codes.py: train from it")
    parser.add_argument('--hflip', action='store_true',
                        help="random horizontal flips (the official AR data pipeline has none)")
    parser.add_argument('--val-data', help="held-out images for the held-out loss (encoded once)")
    parser.add_argument('--val-codes', help="or their codes: extract_codes.py --val")
    parser.add_argument('--image-size', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=768,
                        help="global batch: all ranks and micro-batches")
    parser.add_argument('--grad-accum', type=int, default=1,
                        help="micro-batches per step (per rank)")
    parser.add_argument('--lr', type=float, default=3e-4,
                        help="peak lr for a global batch of 768 (scaled linearly)")
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--grad-clip', type=float, default=1.0)
    parser.add_argument('--epochs', type=int, default=300)
    parser.add_argument('--warmup-epochs', type=float, default=6)
    parser.add_argument('--max-steps', type=int, default=0,
                        help="stop (and checkpoint) at this step, keeping the "
                        "schedule of --epochs; continue later with --resume (0: run all epochs)")
    parser.add_argument('--max-minutes', type=float, default=0,
                        help="wall-clock budget from the start, compile included: the run ends in "
                        "time (lr schedule and all) with a checkpoint; 0: none")
    parser.add_argument('--eval-every', type=int, default=5000,
                        help="steps between sample grids and checkpoints")
    parser.add_argument('--log-every', type=int, default=50)
    parser.add_argument('--sample-classes', default='207,360,387,974,88,979,417,279',
                        help="rows of the grids")
    parser.add_argument('--num-workers', type=int, default=8, help="DataLoader workers per rank")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='out/gpt')
    parser.add_argument('--resume', action='store_true', help="continue from OUT/ckpt.pt")
    parser.add_argument('--init-from', help="start from the weights of a GPT checkpoint (ours, or "
                        "open-magvit2:PATH) at step 0 with a fresh optimizer")
    parser.add_argument('--overwrite', action='store_true',
                        help="delete the run in --out and start again")
    parser.add_argument('--device', default='cuda', choices=DEVICES)
    parser.add_argument('--compile', action='store_true',
                        help="torch.compile the model for training, and the "
                        "tokenizer's encoder (see bench.py)")
    parser.add_argument('--cuda-graph', action='store_true',
                        help="replay the training step as a CUDA graph (one CUDA GPU, "
                        "one process; GraphedStep)")
    args = parser.parse_args(argv)
    if args.preset:  # preset values replace the defaults; flags on the command line still win
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


# -----------------------------------------------------------------------------
# main


def load_held_out(args, tokenizer, micro_batch, env, num_bits, grid, num_classes):
    """--val-data (images, encoded once here with the centre crop) or --val-codes (from
    extract_codes.py --val) -> [tokens (n, h*w), labels (n,)], this rank's share; None without
    either. The tokens must be of the training tokens' kind and the labels among its classes."""
    val = None
    if args.val_data:
        if tokenizer is None:
            raise ValueError("--val-data needs --tokenizer to encode it (or pass --val-codes)")
        val_set = data.build_dataset(args.val_data, args.image_size, train=False, seed=args.seed)
        val = encode_held_out(tokenizer, val_set, micro_batch, env, args.num_workers)
    elif args.val_codes:
        *val, val_meta = held_out_codes(args.val_codes, env.rank, env.world_size)
        if (val_meta['num_bits'], val_meta['grid']) != (num_bits, list(grid)):
            raise ValueError(f"--val-codes {args.val_codes} holds {val_meta['num_bits']}-bit "
                             f"tokens on a {val_meta['grid']} grid, the training tokens are "
                             f"{num_bits}-bit on {list(grid)}")
    if val is not None:
        if len(val[1]) and val[1].max() >= num_classes:
            raise ValueError(f"held-out labels go up to {val[1].max()}, the training data has "
                             f"{num_classes} classes")
        num_val = int(all_reduce_sum(torch.tensor(len(val[1]), device=env.device)))
        print0(f"held-out loss on {num_val} images")
    return val


def resume(model, optimizer, ckpt_path, args, tokenizer_fingerprint, env):
    """--resume: the run's weights, optimizer and RNG back, after checking that the model, the
    training flags (RESUME_MAY_CHANGE lists the exceptions) and the tokenizer's weights are those
    of the run (the same --tokenizer path may hold other weights now, retrained in place).
    Returns (step, epoch, batch_in_epoch)."""
    ckpt = load_checkpoint(ckpt_path, 'gpt')
    check_resume(ckpt, asdict(model.config), vars(args), RESUME_MAY_CHANGE, ckpt_path)
    check_config({'tokenizer_fingerprint': ckpt['tokenizer'].get('fingerprint')},
                 {'tokenizer_fingerprint': tokenizer_fingerprint}, ckpt_path)
    model.load_state_dict(ckpt['model'])
    load_optimizer_state(optimizer, ckpt['optimizer'])  # with this run's --cuda-graph
    # one RNG state per rank: restored only when every rank has its own
    if len(ckpt['rng']) == env.world_size:
        set_rng_state(ckpt['rng'][env.rank])
    else:
        print0(f"note: checkpoint written by {len(ckpt['rng'])} ranks, now {env.world_size}: each "
               "step sees the same global batch as before, but the dropout noise differs from an "
               "uninterrupted run")
    return ckpt['step'], ckpt['epoch'], ckpt['batch_in_epoch']


def main(argv=None):
    begin = time.time()  # --max-minutes counts from here
    args = get_args(argv)
    env = setup(args.device)
    device, device_type = env.device, env.device_type
    if args.cuda_graph and (device_type != 'cuda' or env.ddp):
        # (DDP's all-reduce would have to be recorded too)
        raise SystemExit("--cuda-graph needs one CUDA GPU in one process (--device cuda, no "
                         "torchrun): leave it out")

    # the frozen tokenizer: encodes batches on the fly, decodes the sample grids
    tokenizer = tokenizer_fingerprint = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, args.ema, args.image_size, device, args.compile)
        # of the weights used (EMA or raw): sample.py checks it
        tokenizer_fingerprint = weights_checksum(tokenizer)
    elif not args.codes:
        raise ValueError("pass --tokenizer CKPT (to encode images on the fly) or --codes DIR (pre-extracted tokens)")
    # a fresh run must not overwrite the one in --out
    ckpt_path = prepare_run_folder(args.out, args.resume, args.overwrite, env.is_main)

    # data: (epoch, index) -> tokens or images; sharded over ranks, resumable mid-epoch
    if args.codes:
        dataset = data.CodesDataset(args.codes)
        grid, num_bits, image_size = dataset.meta['grid'], dataset.meta['num_bits'], dataset.meta['image_size']
        # here the tokenizer only decodes the sample grids: it must make the kind of tokens the
        # codes hold
        if tokenizer and (tokenizer.config.num_bits,
                          image_size // tokenizer.downsample) != (num_bits, grid[0]):
            raise ValueError(f"--codes {args.codes} holds {num_bits}-bit tokens on a {grid[0]}x{grid[1]} grid, but "
                             f"--tokenizer {args.tokenizer} makes {tokenizer.config.num_bits}-bit tokens on a "
                             f"{image_size // tokenizer.downsample}x{image_size // tokenizer.downsample} grid")
    else:
        if not args.data:
            raise ValueError("pass --data (or --codes)")
        # resize + random crop, no flip by default: the official AR data pipeline does not flip
        dataset = data.build_dataset(args.data, args.image_size, train=True, seed=args.seed,
                                     hflip=args.hflip)
        num_bits, grid = tokenizer.config.num_bits, [args.image_size // tokenizer.downsample] * 2
    # --batch-size is global: micro_batch x --grad-accum x world size, so a run resumes on another
    # GPU count with the same steps
    micro_batch, rem = divmod(args.batch_size, env.world_size * args.grad_accum)
    if rem or micro_batch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by world size {env.world_size} x "
                         f"--grad-accum {args.grad_accum}")
    sampler = data.EpochSampler(len(dataset), env.rank, env.world_size, seed=args.seed)
    # the loader draws its worker seed from its own generator, not the global RNG that resume
    # restores
    loader = torch.utils.data.DataLoader(dataset, micro_batch, sampler=sampler,
                                         num_workers=args.num_workers,
                                         drop_last=True, pin_memory=device_type == 'cuda',
                                         generator=torch.Generator(),
                                         collate_fn=None if args.codes else data.collate_skip_bad,
                                         worker_init_fn=data.ignore_stop_signals)
    # full global batches only: the sampler and drop_last drop each epoch's tail
    steps_per_epoch = len(dataset) // env.world_size // (micro_batch * args.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images are fewer than one global batch of {args.batch_size}")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    # linear scaling rule from the paper's global batch of 768
    peak_lr = args.lr * args.batch_size / 768
    print0(f"peak lr {peak_lr:.3g} (= {args.lr:g} x batch {args.batch_size} / 768); {steps_per_epoch} steps/epoch, "
           f"{total_steps} steps, {warmup_steps} warmup; {len(dataset)} images, {dataset.num_classes} classes")

    # held-out tokens for the held-out loss, this rank's share, kept in memory: (n, h*w), (n,)
    val = load_held_out(args, tokenizer, micro_batch, env, num_bits, grid, dataset.num_classes)

    # the model: same init on every rank (DDP also broadcasts rank 0's), then per-rank dropout
    # randomness
    torch.manual_seed(args.seed)
    model = GPT.from_preset(args.model, num_classes=dataset.num_classes, vocab_bits=num_bits,
                            block_size=grid[0] * grid[1]).to(device)
    # AdamW(0.9, 0.95) as the official configs; decay on matrices and embeddings only
    optimizer = model.configure_optimizers(args.weight_decay, peak_lr, (0.9, 0.95), device_type,
                                           capturable=args.cuda_graph)
    print0(f"GPT {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
           f"{grid[0]}x{grid[1]} tokens of {num_bits} bits, batch {micro_batch} x {args.grad_accum} micro-batches x "
           f"{env.world_size} ranks")
    if args.init_from and not args.resume:  # fine-tuning: these weights, step 0, a fresh optimizer
        init_from(model, args.init_from)
        print0(f"initialised from the weights of {args.init_from}")
    torch.manual_seed(args.seed + env.rank)
    step, epoch, batch_in_epoch = 0, 0, 0
    if args.resume:
        step, epoch, batch_in_epoch = resume(model, optimizer, ckpt_path, args,
                                             tokenizer_fingerprint, env)
        print0(f"resumed from {ckpt_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    raw_model = model  # sampling, checkpoints and the MFU estimate use the plain module
    if args.compile:  # fuses the fp32 RMSNorm / RoPE / SwiGLU element-wise work between the matmuls
        model = torch.compile(model)
    graphed = GraphedStep(model, optimizer, args.grad_clip) if args.cuda_graph else None
    if env.ddp:
        # broadcast_buffers off: the only buffer is the constant RoPE table
        model = DDP(model, device_ids=None if device_type == 'cpu' else [env.local_rank],
                    broadcast_buffers=False)
    # which tokenizer the tokens came from, for sample.py: an absolute path (the run may be
    # sampled from another folder) and the fingerprint of the weights used, which sample.py checks
    tokenizer_path = args.tokenizer
    if tokenizer_path:  # 'open-magvit2:' (a released file) stays in front
        prefix = OFFICIAL_PREFIX if tokenizer_path.startswith(OFFICIAL_PREFIX) else ''
        tokenizer_path = prefix + os.path.abspath(tokenizer_path.removeprefix(prefix))
    tokenizer_info = {'path': tokenizer_path, 'ema': args.ema,
                      'fingerprint': tokenizer_fingerprint, 'codes': args.codes,
                      'config': asdict(tokenizer.config) if tokenizer else None}

    def log_held_out():
        """The held-out loss of the raw model now: a console line and a log.csv row (all ranks)."""
        ce_pre, ce_post = held_out_loss(raw_model, *val, micro_batch, device_type)
        bits_pre, bits_post = ce_pre / math.log(2), ce_post / math.log(2)
        post_bits = num_bits - raw_model.config.pre_bits
        print0(f"step {step} held-out CE: pre {ce_pre:.4f}, post {ce_post:.4f} nats = "
               f"{bits_pre:.3f} of {raw_model.config.pre_bits} + {bits_post:.3f} of {post_bits} "
               "bits per token")
        # an evaluation row: the training columns stay empty
        # fields[-4:] are the val_* columns
        log.write({'step': step, 'epoch': epoch, **{name: f'{v:.6f}' for name, v in zip(
            fields[-4:], (ce_pre, ce_post, bits_pre, bits_post))}})

    def evaluate():
        """The held-out loss (every rank) and a grid of the fixed classes (rank 0; own RNG, so
        training randomness is untouched)."""
        if val is not None:
            log_held_out()
        if env.is_main and tokenizer is not None:
            # ids past the model's classes wrap around (the defaults suit 1000 classes)
            classes = [int(c) % dataset.num_classes for c in args.sample_classes.split(',')]
            # 4 samples per class, a row each
            labels = torch.tensor(classes, device=device).repeat_interleave(4)
            generator = torch.Generator(device).manual_seed(args.seed)
            with autocast(device_type):
                images = generate_images(raw_model, tokenizer, labels, generator)
            raw_model.free_caches()  # the KV buffers hold GBs for B/L/XL
            save_image_grid(images, os.path.join(args.out, f'samples_step{step}.png'), nrow=4)

    def save():
        """The checkpoint, with every rank's RNG for an exact resume."""
        rngs = [rng_state()]
        if env.ddp:
            rngs = [None] * env.world_size
            dist.all_gather_object(rngs, rng_state())
        if env.is_main:
            # an epoch boundary is stored as the start of the next epoch
            position = (epoch + 1,
                        0) if batch_in_epoch == steps_per_epoch else (epoch, batch_in_epoch)
            save_checkpoint(ckpt_path, {
                'kind': 'gpt', 'config': asdict(raw_model.config), 'model': raw_model.state_dict(),
                'optimizer': optimizer.state_dict(), 'step': step, 'epoch': position[0],
                'batch_in_epoch': position[1], 'rng': rngs, 'train_args': vars(args),
                'tokenizer': tokenizer_info})
        # the other ranks wait for rank 0's checkpoint: all go on with it on disk
        barrier()

    # the training loop
    fields = ['step', 'epoch', 'lr', 'loss_pre', 'loss_post', 'tokens_per_s', 'mfu',
              'peak_mem_gib', 'elapsed_s', 'val_ce_pre', 'val_ce_post', 'val_bits_pre',
              'val_bits_post']
    log = CSVLog(os.path.join(args.out, 'log.csv'), fields, env.is_main,
                 resume_step=step if args.resume else None)
    # global: all ranks and micro-batches
    tokens_per_step = args.batch_size * grid[0] * grid[1]
    peak = peak_flops(device_type)  # None on other chips: no MFU in the log
    # unreadable images so far: data.check_bad_fraction stops the run past 1%
    num_bad = num_seen = 0
    # --max-steps ends the run early; the lr schedule stays that of --epochs
    stop_step = max_stop = min(args.max_steps or total_steps, total_steps)
    progress = tqdm(total=stop_step, initial=step, disable=not env.is_main, dynamic_ncols=True)
    stop = StopOnSignal()  # Ctrl-C, SIGTERM: a checkpoint after the step, then exit
    held_out_start = time.time()
    if val is not None and step == 0:
        log_held_out()  # the "before" number (from scratch: log 64 and log 4096, zero heads)
    # --max-minutes: the run ends when the budget, less a reserve for the last held-out loss, grid
    # and checkpoint, is spent. At each log line rank 0 turns the time left and the step rate of
    # the interval into the last step, which every rank takes; the lr decay ends there
    budget_s = args.max_minutes * 60
    reserve_s = 1.5 * (time.time() - held_out_start) + min(30.0, 0.05 * budget_s)
    start_time = last_time = time.time()
    last_step = step
    while step < stop_step:
        # mid-epoch on resume: skip the samples this rank already trained on in this epoch
        sampler.set_epoch(epoch, start=batch_in_epoch * micro_batch * args.grad_accum)
        # a fresh iterator per epoch: the workers restart with the sampler's new order and start
        batches = iter(loader)
        while batch_in_epoch < steps_per_epoch:
            micro_batches = []
            for _ in range(args.grad_accum):
                if args.codes:
                    tokens, labels = next(batches)  # (B, T) pre-extracted view of this epoch
                else:
                    images, labels, bad = next(batches)  # (B, 3, H, W), minus unreadable images
                    num_bad, num_seen = num_bad + bad, num_seen + len(labels) + bad
                    data.check_bad_fraction(num_bad, num_seen)
                    with torch.no_grad(), autocast(device_type):
                        images = images.to(device, non_blocking=True)
                        tokens = tokenizer.encode(images)[1].flatten(1)  # (B, h*w)
                # non_blocking: the loader pins its batches on CUDA, so the host queues the copy and
                # goes on
                micro_batches.append((tokens.to(device, non_blocking=True),
                                      labels.to(device, non_blocking=True)))
            # a function of the global step alone: the same on every rank and after a resume
            # with --max-minutes the decay ends at the planned last step, else at --epochs' end
            lr = get_lr(step, stop_step if budget_s else total_steps, warmup_steps, peak_lr)
            try:
                if graphed is not None:
                    loss_pre, loss_post = graphed(micro_batches, lr)
                else:
                    loss_pre, loss_post = train_step(model, optimizer, micro_batches, lr,
                                                     device_type, args.grad_clip)
            except torch.OutOfMemoryError:
                raise SystemExit(
                    f"out of {device_type} memory at step {step} with {micro_batch} sequences per "
                    f"process and pass (--batch-size {args.batch_size} over {env.world_size} "
                    f"processes and --grad-accum {args.grad_accum}): pass --grad-accum "
                    f"{2 * args.grad_accum} (the same training, half the sequences per pass) or a "
                    "smaller --batch-size") from None
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            progress.update()

            if step % args.log_every == 0 or step == stop_step:
                # one sync per log interval: average the losses over ranks, measure the throughput
                loss_pre, loss_post = all_reduce_mean(torch.stack([loss_pre, loss_post])).tolist()
                now = time.time()
                tokens_per_s = (step - last_step) * tokens_per_step / (now - last_time)
                if budget_s:  # re-plan the end from this interval's step rate
                    left_s = budget_s - reserve_s - (now - begin)
                    rate = (step - last_step) / (now - last_time)  # steps per second
                    stop_step = plan_last_step(step, left_s, rate, max_stop, env)
                    progress.total = stop_step
                # per chip: estimate_mfu compares with the peak of one
                mfu = raw_model.estimate_mfu(tokens_per_s / env.world_size,
                                             peak) if peak else float('nan')
                last_time, last_step = now, step
                progress.set_postfix(loss_pre=f'{loss_pre:.3f}', loss_post=f'{loss_post:.3f}',
                                     lr=f'{lr:.2e}',
                                     tok_s=f'{tokens_per_s:.0f}', mfu=f'{mfu:.1%}')
                log.write(dict(zip(fields, [
                    step, epoch, f'{lr:.4g}', f'{loss_pre:.4f}', f'{loss_post:.4f}',
                    f'{tokens_per_s:.1f}', f'{mfu:.4f}', f'{peak_memory_gib(device_type):.2f}',
                    f'{now - start_time:.1f}'])))
                # stop at once: the weights are already NaN, and the last checkpoint is the one to
                # go back to
                if not math.isfinite(loss_pre + loss_post):
                    raise RuntimeError(f"loss is {loss_pre + loss_post} at step {step}; lower --lr or check the data")
            if stop.agreed(step, device):  # no evaluation: the grace period may be short
                save()
                progress.close()
                stop.exit(step, ckpt_path)
            if step % args.eval_every == 0 or step == stop_step:
                evaluate()
                save()
            # --max-steps may end mid-epoch: the checkpoint above records the position
            if step == stop_step:
                break
        epoch, batch_in_epoch = epoch + 1, 0
    progress.close()
    stop.restore()
    print0(f"done: {step} steps in {time.time() - start_time:.0f}s; checkpoint {ckpt_path}, "
           f"samples {os.path.join(args.out, f'samples_step{step}.png') if tokenizer else '(no --tokenizer)'}"
           + (f"; peak memory {peak_memory_gib(device_type):.2f} GiB on rank 0" if device_type != 'cpu' else ''))
    # every rank prints its own: equal checksums show that DDP kept the weights bit-identical
    print(f"rank {env.rank}: GPT weights sha256 {weights_checksum(raw_model)}", flush=True)
    cleanup()
    return raw_model


if __name__ == '__main__':
    main()
