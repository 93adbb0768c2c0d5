"""
Sample class-conditional images from a generator trained by train_gpt.py:
class label -> GPT.generate (KV cache, classifier-free guidance per sub-token) -> (pre, post)
sub-tokens -> 18-bit indices (quantizer.merge_indices) -> +-1 code map -> tokenizer decoder -> clamp
-> uint8 (utils.to_uint8).

Quick look, a PNG grid with one row per class:
    python sample.py --gpt out/gpt_B/ckpt.pt --classes 207,360,387 --out grid.png
Evaluation set in the ADM format (read by fid.py and the ADM evaluator), 50
images for each of the 1000 classes:
    python sample.py --gpt out/gpt_B/ckpt.pt --num-per-class 50 --out samples.npz   # one GPU
    (add --compile --batch-size 256 for a large set: the step compiles once, then runs faster)
    torchrun --standalone --nproc_per_node 8 sample.py --gpt out/gpt_B/ckpt.pt \
        --num-per-class 50 --out samples.npz                                      # one node
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \
        sample.py ...                                                             # two nodes
        (and --node_rank 1 on the second node; OUT's folder must be on a shared file system)
    add --device npu on Ascend NPUs.
The images are cut into shards of --batch-size; shard s is always generated with the seed --seed *
1000003 + s, whichever rank runs it, so the result does not depend on the number of GPUs. Each
finished shard is saved to OUT.shards/ at once, so a killed run resumes when rerun with the same
command. Then rank 0 writes OUT: `arr_0` uint8 (N, H, W, 3), shuffled with a fixed seed as the
official combine_npz.py, and `arr_1` the class labels in the same order (as ADM's image_sample.py),
records the settings in OUT.settings.json and removes the shards. A rerun onto an existing OUT with
other settings is an error; --overwrite samples it again.

Tokenizer: the one the generator was trained on (the path and weights fingerprint that train_gpt.py
records; a --tokenizer with other weights is an error unless --allow-tokenizer-mismatch), decoding
with the weights it was trained on: EMA or raw as recorded, raw for a released AR checkpoint (as
the official pipeline, which decodes with the tokenizer stored in the AR file, without model_ema).
--ema / --no-ema override that choice.

Sampling settings: cfg scale and temperature per sub-token ("pre,post"), top-k and top-p; the
defaults are the paper's for the model size (gpt.py PRESETS), with top-k and top-p off as in the
official scripts. --check-classes synthetic (quick start): a small CNN trained on the real synthetic
images says how often the samples show their requested class.
"""

import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from gpt import GPT, GPTConfig
from quantizer import merge_indices
from tokenizer import Tokenizer
from utils import (DEVICES, OFFICIAL_PREFIX, autocast, barrier, check_kind, cleanup,
                   load_checkpoint, print0, save_image_grid, setup, to_uint8, weights_checksum)


@torch.no_grad()
def generate_images(gpt, tokenizer, labels, generator, compile=False, **sampling):
    """labels (B,) -> images (B, 3, H, W) in [-1, 1]; sampling: cfg_scale, temperature, top_k, top_p
    of generate; compile: torch.compile the decoding step (--compile)."""
    # generate's tokens; on GPUs one position replays as a CUDA graph (bench.py --rows sampling)
    pre, post = gpt.generate_fast(labels, generator=generator, compile=compile,
                                  **sampling)  # (B, T) each
    grid = gpt.config.grid_size
    # index = pre + post * 2^pre_bits, the inverse of split_indices: (B, T) -> (B, h, w)
    indices = merge_indices(pre, post, gpt.config.pre_bits).view(-1, grid, grid)
    # indices -> +-1 codes -> decoder; clamped as the official code before the uint8 cast
    return tokenizer.decode_indices(indices).float().clamp(-1, 1)


def load_models(gpt_path, tokenizer_path=None, ema=None, allow_tokenizer_mismatch=False):
    """Our GPT checkpoint and the tokenizer it was trained on (default: the path stored in the GPT
    checkpoint), or a released Open-MAGVIT2 AR checkpoint (`open-magvit2:AR_256_B.ckpt`, or detected
    by its Lightning 'state_dict') with the released tokenizer passed as --tokenizer
    open-magvit2:PATH. ema=None decodes with the tokenizer weights the generator was trained on
    (ours: the recorded choice; released: raw); True / False overrides it. Our checkpoints record
    the fingerprint of those weights: another tokenizer is an error, unless
    allow_tokenizer_mismatch."""
    official = gpt_path.startswith(OFFICIAL_PREFIX)
    ckpt = load_checkpoint(gpt_path)
    gpt_path = gpt_path.removeprefix(OFFICIAL_PREFIX)
    trained = {}  # the tokenizer the generator was trained on, as train_gpt.py records it
    if official or (isinstance(ckpt, dict) and 'state_dict' in ckpt):
        # key mapping in gpt.convert_official_gpt; unknown / missing keys are errors
        gpt = GPT.from_official(ckpt)
        if not tokenizer_path:
            raise ValueError(f"{gpt_path} is an official checkpoint: pass the released tokenizer as "
                             "--tokenizer open-magvit2:PATH")
        trained_ema = False  # the official AR configs load the tokenizer with use_ema: False
    else:
        check_kind(ckpt, 'gpt', gpt_path)
        gpt = GPT(GPTConfig(**ckpt['config']))
        gpt.load_state_dict(ckpt['model'])
        trained = ckpt.get('tokenizer') or {}
        tokenizer_path = tokenizer_path or trained.get('path')
        trained_ema = trained.get('ema', True)
    if not tokenizer_path:
        raise ValueError(f"{gpt_path} does not name its tokenizer (trained from --codes?): pass --tokenizer CKPT")
    # loaded once: a second from_checkpoint below (an explicit --ema / --no-ema) reuses it
    tokenizer_ckpt = load_checkpoint(tokenizer_path)
    tokenizer = Tokenizer.from_checkpoint(tokenizer_ckpt, ema=trained_ema)
    fingerprint = trained.get('fingerprint')
    # the fingerprint is of the weights the GPT saw (EMA or raw), so it is checked before any --ema
    # override
    if fingerprint and weights_checksum(tokenizer) != fingerprint and not allow_tokenizer_mismatch:
        weights = 'EMA' if trained_ema else 'raw'
        raise ValueError(f"{gpt_path} was trained with tokenizer {trained.get('path')} ({weights} "
                         f"weights, fingerprint {fingerprint}), but {tokenizer_path} holds other "
                         f"weights (fingerprint {weights_checksum(tokenizer)}): pass "
                         "--tokenizer with the one it was trained with, or "
                         "--allow-tokenizer-mismatch to decode with this one anyway")
    if ema is not None and ema != trained_ema:  # an explicit --ema / --no-ema
        tokenizer = Tokenizer.from_checkpoint(tokenizer_ckpt, ema=ema)
    if tokenizer.config.num_bits != gpt.config.vocab_bits:
        raise ValueError(f"mismatch: {gpt_path} models {gpt.config.vocab_bits}-bit tokens (vocabulary "
                         f"{2 ** gpt.config.vocab_bits}) but tokenizer {tokenizer_path} makes "
                         f"{tokenizer.config.num_bits}-bit tokens (vocabulary {2 ** tokenizer.config.num_bits}): "
                         "use the tokenizer the GPT was trained with")
    return gpt.eval(), tokenizer.eval()


# -----------------------------------------------------------------------------
# class consistency on the built-in synthetic data (the quick start's score)


def check_class_consistency(images, labels, tokenizer, epochs=3, seed=0):
    """The quick start's score. Trains a small CNN on the real synthetic train split (4000 images,
    seconds on a CPU) and returns how often it classifies `images` (uint8 (N, H, W, 3) samples) as
    their requested `labels` (N,). For reference also its accuracy on held-out real images, and on
    their reconstructions by `tokenizer`: the best that samples decoded by this tokenizer can be
    expected to reach. The CNN looks at half resolution and trains on randomly blurred images, so
    that it judges the shape and colour, not the sharpness a small tokenizer loses."""
    torch.manual_seed(seed)

    def images_and_labels(dataset):  # (N, 3, H, W) in [-1, 1], (N,)
        items = [dataset[i] for i in range(len(dataset))]
        images, labels = zip(*items)
        return torch.stack(images), torch.tensor(labels)

    size = images.shape[1]
    train = data.build_dataset('synthetic', size, train=True)
    x, y = images_and_labels(train)
    x_held, y_held = images_and_labels(data.build_dataset('synthetic', size, False))
    # a four-stage CNN: enough to tell the shapes and colours apart, trained in seconds
    conv = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                nn.BatchNorm2d(c_out), nn.ReLU()]
    net = nn.Sequential(nn.AvgPool2d(2), *conv(3, 32), nn.MaxPool2d(2), *conv(32, 64),
                        nn.MaxPool2d(2), *conv(64, 64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, train.num_classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            blurred = x[batch]
            for _ in range(int(torch.randint(0, 3, ()))):  # 0-2 passes of a 3x3 box blur
                blurred = F.avg_pool2d(blurred, 3, stride=1, padding=1, count_include_pad=False)
            loss = F.cross_entropy(net(blurred), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    # uint8 (N, H, W, 3) -> (N, 3, H, W) in [-1, 1]: judged on the saved pixels
    from_uint8 = lambda u: torch.from_numpy(u).permute(0, 3, 1, 2).float() / 127.5 - 1
    accuracy = lambda x, y: (net(x).argmax(1) == y).float().mean().item()
    with torch.no_grad():
        # through uint8 as the samples, so both are judged on the same rounding
        reconstructed = to_uint8(tokenizer(x_held.to(next(tokenizer.parameters()).device))[0])
        return {'samples': accuracy(from_uint8(images), torch.as_tensor(labels)),
                'real': accuracy(x_held, y_held),
                'reconstructed': accuracy(from_uint8(reconstructed), y_held)}


# -----------------------------------------------------------------------------
# main


def get_args(argv=None):
    """The command line, checked before any work: errors name the flag. Returns (args, sampling),
    where sampling holds the per-sub-token (pre, post) settings for GPT.generate (None: the
    preset's)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gpt', required=True, help="checkpoint written by train_gpt.py")
    parser.add_argument('--tokenizer',
                        help="tokenizer checkpoint (default: the one the GPT was trained with)")
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction,
                        help="decode with the tokenizer's EMA (--ema) or raw (--no-ema) weights "
                        "(default: those the GPT was trained on; raw for a released AR "
                        "checkpoint)")
    parser.add_argument('--allow-tokenizer-mismatch', action='store_true',
                        help="decode with a --tokenizer whose weights are not the ones the "
                        "GPT was trained with")
    parser.add_argument('--classes',
                        help="comma-separated class ids (default: all classes of the model)")
    parser.add_argument('--num-per-class', type=int, default=4)
    parser.add_argument('--out', default='samples.png',
                        help=".png: one grid; .npz: ADM evaluation format")
    parser.add_argument('--overwrite', action='store_true',
                        help="sample again onto an existing .npz --out")
    parser.add_argument('--batch-size', type=int, default=32,
                        help="images per forward pass and per shard")
    parser.add_argument('--cfg-scale', help="'s' or 'pre,post' (default: the preset's)")
    parser.add_argument('--temperature',
                        help="'t' or 'pre,post', >= 0; 0 = greedy (default: the preset's)")
    parser.add_argument('--top-k', default='0', help="'k' or 'pre,post'; 0 = off")
    parser.add_argument('--top-p', default='1.0', help="'p' or 'pre,post' in (0, 1]; 1.0 = off")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--compile', action='store_true',
                        help="torch.compile the decoding step: about 40 s once per batch size, "
                        "then 1.4-1.6x the images/s on a GPU (python bench.py --rows sampling "
                        "--compile); tokens can differ from the plain step's by rounding")
    parser.add_argument('--check-classes', choices=['synthetic'],
                        help="score the samples with a classifier")
    parser.add_argument('--device', default='cuda', choices=DEVICES)
    args = parser.parse_args(argv)

    def pair(flag, cast, valid, requirement):  # 'a' -> (a, a), 'a,b' -> (a, b); None stays None
        text = getattr(args, flag[2:].replace('-', '_'))
        if text is None:
            return None
        try:
            values = tuple(cast(v) for v in text.split(','))
        except ValueError:
            values = ()
        if len(values) not in (1, 2) or not all(valid(v) for v in values):
            parser.error(f"{flag} {text!r}: expected one value or 'pre,post', {requirement}")
        # one value is used for both sub-tokens
        return (values * 2)[:2]
    sampling = dict(cfg_scale=pair('--cfg-scale', float, math.isfinite, "numbers"),
                    temperature=pair('--temperature', float, lambda t: 0 <= t < math.inf,
                                     "each >= 0"),
                    top_k=pair('--top-k', int, lambda k: k >= 0, "integers >= 0"),
                    top_p=pair('--top-p', float, lambda p: 0 < p <= 1, "each in (0, 1]"))
    if args.classes is not None:
        try:
            args.classes = [int(c) for c in args.classes.split(',')]
        except ValueError:
            parser.error(f"--classes {args.classes!r}: expected comma-separated class ids, "
                         "e.g. 0,1,2")
    for flag in ('--num-per-class', '--batch-size'):
        if getattr(args, flag[2:].replace('-', '_')) < 1:
            parser.error(f"{flag} must be at least 1")
    return args, sampling


def main(argv=None):
    args, sampling = get_args(argv)
    env = setup(args.device)
    npz = args.out.endswith('.npz')
    if not npz and env.ddp:
        raise ValueError("a .png grid is made by one process; use an .npz --out under torchrun")
    shard_dir, settings_path = args.out + '.shards', args.out + '.settings.json'
    settings = {k: v for k, v in vars(args).items() if k != 'overwrite'}
    # a retrained GPT starts anew (a missing one is reported by load_models)
    gpt_file = args.gpt.removeprefix(OFFICIAL_PREFIX)
    settings['gpt_mtime'] = os.path.getmtime(gpt_file) if os.path.exists(gpt_file) else None
    # as read back from the file (tuples become lists), so that == compares like with like
    settings = json.loads(json.dumps(settings))
    # an evaluation file is never silently stale
    if npz and os.path.exists(args.out) and not args.overwrite:
        recorded = None
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                recorded = json.load(f)
        if recorded == settings:
            print0(f"{args.out} exists already, made with these settings: nothing to do")
            cleanup()
            return None
        if recorded is None:
            differ = f"none recorded in {settings_path}"
        else:
            differ = ', '.join(k for k in settings if recorded.get(k) != settings[k])
        raise FileExistsError(f"{args.out} exists already, made with other settings ({differ}): "
                              "pass --overwrite to sample it again, or another --out")

    gpt, tokenizer = load_models(args.gpt, args.tokenizer, args.ema, args.allow_tokenizer_mismatch)
    gpt, tokenizer = gpt.to(env.device), tokenizer.to(env.device)
    config = gpt.config
    classes = args.classes or list(range(config.num_classes))
    if not all(0 <= c < config.num_classes for c in classes):
        raise ValueError(f"--classes must lie in 0..{config.num_classes - 1} for this model")
    # class-major: a grid row per class
    labels = torch.tensor(classes).repeat_interleave(args.num_per_class)
    # (N,) labels cut into shards of --batch-size; shard s always has the same labels and seed
    shards = labels.split(args.batch_size)
    print0(f"{len(labels)} images of {len(classes)} classes, cfg {sampling['cfg_scale'] or config.cfg_scale}, "
           f"temperature {sampling['temperature'] or config.temperature}, top-k {sampling['top_k']}, "
           f"top-p {sampling['top_p']}")

    # refuse to mix shards made with other settings into one evaluation set
    if npz and env.is_main:
        if args.overwrite:
            for path in (args.out, settings_path):
                if os.path.exists(path):
                    os.remove(path)
            shutil.rmtree(shard_dir, ignore_errors=True)
        os.makedirs(shard_dir, exist_ok=True)
        shard_settings = os.path.join(shard_dir, 'settings.json')
        if os.path.exists(shard_settings):
            with open(shard_settings) as f:
                if json.load(f) != settings:
                    raise ValueError(f"{shard_dir} holds shards made with other settings: delete it or use the same")
        with open(shard_settings, 'w') as f:
            json.dump(settings, f, indent=1)
    barrier()

    my_shards = range(env.rank, len(shards), env.world_size)  # shard s goes to rank s % world
    # shards already on disk (a killed run) are not sampled again
    todo = [s for s in my_shards if not (npz and os.path.exists(os.path.join(shard_dir, f'shard{s:06d}.npz')))]
    images = {}
    start = time.time()
    for s in tqdm(todo, desc='sampling', disable=not env.is_main, initial=len(my_shards) - len(todo),
                  total=len(my_shards)):
        # a stream per shard, not per rank: the images do not depend on the number of GPUs
        generator = torch.Generator(env.device).manual_seed(args.seed * 1_000_003 + s)
        with autocast(env.device_type):
            shard = to_uint8(generate_images(gpt, tokenizer, shards[s].to(env.device), generator,
                                             compile=args.compile, **sampling))
        if npz:  # written at once and atomically: a killed run keeps every finished shard
            path = os.path.join(shard_dir, f'shard{s:06d}.npz')
            with open(path + '.tmp', 'wb') as f:
                np.savez(f, images=shard, labels=shards[s].numpy())
            os.replace(path + '.tmp', path)
        else:
            images[s] = shard
    done = sum(len(shards[s]) for s in todo)
    print0(f"{done} images in {time.time() - start:.1f}s ({done / max(time.time() - start, 1e-9):.2f} images/s "
           f"on rank 0 of {env.world_size})")
    barrier()

    if not npz:
        images = np.concatenate([images[s] for s in range(len(shards))])  # (N, H, W, 3) uint8
        print(f"wrote {save_image_grid(images, args.out, nrow=args.num_per_class)} "
              f"({len(classes)} rows of {args.num_per_class}: classes {','.join(map(str, classes))})")
        if args.check_classes:
            scores = check_class_consistency(images, labels, tokenizer)
            print(f"class consistency: {scores['samples']:.1%} of the {len(labels)} samples are classified as their "
                  f"requested class (chance {1 / config.num_classes:.0%}). The classifier, trained on real images, "
                  f"recognises {scores['real']:.1%} of held-out real images and {scores['reconstructed']:.1%} of "
                  "their reconstructions by the tokenizer (the ceiling for its samples)")
        cleanup()
        return images, labels.numpy()

    if env.is_main:  # gather the shards, shuffle with a fixed seed, one ADM-format file
        parts = [np.load(os.path.join(shard_dir, f'shard{s:06d}.npz')) for s in range(len(shards))]
        all_images = np.concatenate([p['images'] for p in parts])
        all_labels = np.concatenate([p['labels'] for p in parts])
        # shuffled as the official combine_npz.py: the first images of the file are of all classes,
        # not of class 0
        order = np.random.default_rng(args.seed).permutation(len(all_labels))
        # before OUT: an OUT without its settings would be refused
        with open(settings_path, 'w') as f:
            json.dump(settings, f, indent=1)
        with open(args.out + '.tmp', 'wb') as f:
            np.savez(f, arr_0=all_images[order], arr_1=all_labels[order])
        # atomic: a kill leaves no half-written OUT
        os.replace(args.out + '.tmp', args.out)
        shutil.rmtree(shard_dir)
        print(f"wrote {args.out}: arr_0 {all_images.shape} uint8, arr_1 labels")
    barrier()
    cleanup()
    return None


if __name__ == '__main__':
    main()
