"""
The whole pipeline on one GPU within a wall-clock budget, one stage after another, each the command
that its docstring shows (printed before it runs):
    1. train_tok.py      the tokenizer, train_tok.py's tin64 run, for 47% of --minutes (7 of 15)
    2. extract_codes.py  its tokens of the training images and of the held-out images
    3. train_gpt.py      the B generator on those tokens, for what is left of 85% of --minutes
    4. sample.py         --num-per-class samples of every class into an ADM .npz, and a PNG grid
Then it prints the figures of each stage: held-out PSNR and codebook usage of the tokenizer, the
held-out NLL of the generator, the sampling throughput and the wall time of every stage.

Tiny-ImageNet (200 classes at 64px; docs/tinyimagenet_to_npz.py packs the official zip into
data/tin/train_part0..4.npz of 20,000 images each and data/tin/val.npz, the 10,000 held-out images),
15 minutes on three of the parts (the README shows what it prints on one H200):
    T=data/tin/train_part
    python pipeline.py --minutes 15 --out runs/tin64 \\
        --data ${T}0.npz,${T}1.npz,${T}2.npz --val-data data/tin/val.npz
Another dataset: other --data / --val-data, in any form train_tok.py --data takes (.npz archives,
an ImageNet-style folder). CPU smoke run of the same chain with the tiny models:
    python pipeline.py --tiny --minutes 1 --out out/pipeline_tiny

Outputs in --out: tok/, codes/, codes_val/, gpt/ (the runs), samples.npz (arr_0 (N, H, W, 3) uint8,
arr_1 labels), samples.png, and pipeline.json (what each stage did and measured).

The generator's budget: train_gpt.py runs whole epochs, so a short probe run (15 steps, then
deleted) measures its time per step and its start-up cost (compiling included), and the number
of epochs is what fits in the stage's time. Its warm-up is the paper's share of the run (6 of
300 epochs).

Classes: the class ids are the data's labels as they are. Tiny-ImageNet's `labels` are ImageNet-1k
indices (1..988 for its 200 classes), so the generator gets 989 class slots of which 200 are
trained: a sample of class 207 is a golden retriever as in the paper, and the .npz labels mean
what they mean on ImageNet. Only the classes present in the training data are sampled (200 x 50 =
10,000 images, the size and class balance of Tiny-ImageNet's held-out set, for fid.py).

Reruns: a stage that finished (pipeline.json says so and its output is there) is skipped, so the
same command continues a crashed pipeline: a trainer that left a checkpoint resumes from it
(--resume), extract_codes.py and sample.py continue from what they wrote. For other data or
settings use a new --out; the trainers and extract_codes.py refuse to mix runs made from different
inputs.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from utils import read_log, save_image_grid

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# the recipes: every flag the pipeline passes, in one place

# Stage 1 at 64px: train_tok.py's tin64 run (16x16 tokens, the paper's grid; its settings and why
# they depart from the paper are beside its preset), compiled, with 8 loader workers
TOKENIZER_RECIPE = ['--preset', 'tin64', '--compile', '--channels-last', '--num-workers', '8']
# batch 256, not the B preset's 768: with 16x16 tokens, 768 sequences of 256 do not fit in 141 GB
GPT_RECIPE = ['--preset', 'B', '--compile', '--batch-size', '256']
CODES_RECIPE = ['--image-size', '64', '--compile']
# one view of the training images: the random crop of a 64px image at 64px is the whole image (and
# the official AR pipeline has no flips), so further views would be copies of the first; with
# larger images, more views are more augmentation
VIEWS = 1
# the B preset's cfg scale and temperature; 250 images per CUDA graph: the per-position cost is
# nearly flat in the batch (python bench.py --rows sampling), so large batches give the throughput
SAMPLE_RECIPE = ['--batch-size', '250']

# --tiny: the CPU quick-start models (32px -> 8x8 tokens) and their presets' settings
TINY_TOKENIZER_RECIPE = ['--preset', 'tiny', '--device', 'cpu', '--eval-images', '50']
TINY_GPT_RECIPE = ['--preset', 'tiny', '--device', 'cpu']
TINY_CODES_RECIPE = ['--image-size', '32', '--device', 'cpu', '--batch-size', '64',
                     '--num-workers', '0']
TINY_SAMPLE_RECIPE = ['--device', 'cpu', '--cfg-scale', '4,4']

# shares of --minutes: the tokenizer's is a hard limit (train_tok.py --max-minutes); extracting
# the codes has no limit of its own; the generator gets its share plus what the first two stages
# left of theirs; sampling and the grid take the rest
TOKENIZER_SHARE, CODES_SHARE, GPT_SHARE = 0.47, 0.05, 0.33
PROBE_STEPS, PROBE_LOG_EVERY = 15, 5  # the probe's time per step: its steps 5 -> 15
WARMUP_FRACTION = 6 / 300  # the paper's warm-up: 6 of 300 epochs
GRID_CLASSES, GRID_PER_CLASS = 8, 8  # the PNG: rows of classes spread over the sampled ones


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help="training images: .npz archive(s) or an image folder "
                        "(--tiny: default 'synthetic')")
    parser.add_argument('--val-data', help="held-out images, the same forms (--tiny: default "
                        "'synthetic', its held-out split)")
    parser.add_argument('--out', required=True, help="folder for all stages' outputs")
    parser.add_argument('--minutes', type=float, default=15.0, help="wall-clock budget, all stages")
    parser.add_argument('--num-per-class', type=int, default=50,
                        help="samples per class in the .npz (ADM's evaluation: 50)")
    parser.add_argument('--tiny', action='store_true',
                        help="tiny models on the CPU: a smoke run of the whole chain")
    args = parser.parse_args(argv)
    if args.tiny:
        args.data, args.val_data = args.data or 'synthetic', args.val_data or 'synthetic'
    if not (args.data and args.val_data):
        parser.error("pass --data and --val-data (or --tiny)")
    return args


# -----------------------------------------------------------------------------
# running a stage


def run(script, flags):
    """Run `python script flags`, echoing its stdout (progress bars go to stderr as they are);
    returns the stdout text. A failing stage stops the pipeline.

    Ctrl-C reaches the stage too (one process group), and the trainers answer it with a
    checkpoint after their step (utils.StopOnSignal): so the pipeline keeps reading the stage's
    output until it has exited, rather than leaving at once and closing the pipe the stage
    writes to. A SIGTERM sent to the pipeline alone is passed on to the stage."""
    command = [sys.executable, '-u', os.path.join(HERE, script)] + [str(f) for f in flags]
    print('$ ' + ' '.join(command[2:]), flush=True)
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        def pass_on(signum, frame):  # the stage stops with a checkpoint; we follow it out
            process.send_signal(signum)
        previous = signal.signal(signal.SIGTERM, pass_on)
        try:
            try:
                for line in process.stdout:
                    print(line, end='', flush=True)
                    lines.append(line)
            except KeyboardInterrupt:  # Ctrl-C: the stage got it too; a second one, here, leaves
                print(f"\nwaiting for {script} to stop", file=sys.stderr, flush=True)
                for line in process.stdout:
                    print(line, end='', flush=True)
            process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if process.returncode:
        stopped = process.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM)
        sys.exit(f"{script} {'was stopped' if stopped else 'failed'} (exit status "
                 f"{process.returncode}); the same pipeline command continues from the stages "
                 "that finished" + (" and the stage's checkpoint" if stopped else ""))
    return ''.join(lines)


class Record:
    """pipeline.json: per stage whether it finished, its wall seconds (summed over reruns) and its
    figures; written after every change, so that a rerun knows what is done."""

    def __init__(self, path):
        self.path = path
        self.stages = {}
        if os.path.exists(path):
            with open(path) as f:
                self.stages = json.load(f)

    def done(self, stage, *outputs):
        return self.stages.get(stage, {}).get('done', False) and all(map(os.path.exists, outputs))

    def update(self, stage, **values):
        self.stages[stage] = {**self.stages.get(stage, {}), **values}
        with open(self.path + '.tmp', 'w') as f:
            json.dump(self.stages, f, indent=1)
        os.replace(self.path + '.tmp', self.path)

    def seconds(self, stage):
        return self.stages.get(stage, {}).get('seconds', 0.0)

    def add_seconds(self, stage, start):
        self.update(stage, seconds=self.seconds(stage) + time.time() - start)


# -----------------------------------------------------------------------------
# the stages


def train_tokenizer(args, record, folder, budget_s):
    ckpt = os.path.join(folder, 'ckpt.pt')
    if not record.done('tokenizer', ckpt):
        start = time.time()
        recipe = TINY_TOKENIZER_RECIPE if args.tiny else TOKENIZER_RECIPE
        # a crashed run continues from its checkpoint; one that left none starts again
        resume = ['--resume'] if os.path.exists(ckpt) else ['--overwrite']
        run('train_tok.py', recipe + ['--data', args.data, '--val-data', args.val_data,
                                      '--out', folder, '--max-minutes', f'{budget_s / 60:.3f}']
            + resume)
        record.add_seconds('tokenizer', start)
        final = read_log(os.path.join(folder, 'log.csv'), 'psnr')[-1]  # all held-out images
        record.update('tokenizer', done=True, step=int(final['step']), psnr=float(final['psnr']),
                      codebook_usage=float(final['codebook_usage']))
    return ckpt


def extract(args, record, tokenizer_ckpt, folder, val):
    stage = 'codes_val' if val else 'codes'
    if not record.done(stage, os.path.join(folder, 'meta.json')):
        start = time.time()
        recipe = TINY_CODES_RECIPE if args.tiny else CODES_RECIPE
        recipe = recipe + (['--val'] if val else ['--views', VIEWS])  # --val: one centre crop
        run('extract_codes.py', recipe + ['--tokenizer', tokenizer_ckpt, '--codes', folder,
                                          '--data', args.val_data if val else args.data])
        record.add_seconds(stage, start)
        record.update(stage, done=True)
    return folder


def probe_gpt(flags, folder):
    """A short run in `folder` (deleted after): (seconds per step, start-up seconds, steps per
    epoch). Start-up is everything but the steps: building, compiling, the final checkpoint."""
    start = time.time()
    output = run('train_gpt.py', flags + ['--out', folder, '--overwrite', '--epochs', '1000000',
                                          '--max-steps', PROBE_STEPS,
                                          '--log-every', PROBE_LOG_EVERY])
    wall_s = time.time() - start
    rows = read_log(os.path.join(folder, 'log.csv'), 'loss_pre')
    first, last = rows[0], rows[-1]  # the first interval holds the compilation: left out
    step_s = (float(last['elapsed_s']) - float(first['elapsed_s'])) / (
        int(last['step']) - int(first['step']))
    shutil.rmtree(folder)
    steps_per_epoch = int(re.search(r'(\d+) steps/epoch', output).group(1))
    return step_s, wall_s - PROBE_STEPS * step_s, steps_per_epoch


def plan_epochs(left_s, epoch_s, minutes):
    """The whole epochs of epoch_s seconds that fit in left_s, with a 5% margin (the held-out
    evaluations and the mid-run checkpoint are not in the probe), and at least one: a pipeline
    without a generator would be no use. When not even one fits, say so: the run will end past
    its budget."""
    epochs = int(0.95 * left_s / epoch_s)
    if epochs < 1:
        print(f"warning: --minutes {minutes:g} leaves the generator {left_s:.0f} s, less than its "
              f"one epoch of {epoch_s:.0f} s: it trains one epoch, and the pipeline ends about "
              f"{epoch_s / 0.95 - left_s:.0f} s past its budget. Compilation and the codes take "
              f"minutes whatever the budget; give more --minutes (15 is the reference run)",
              file=sys.stderr, flush=True)
    return max(1, epochs)


def train_generator(args, record, tokenizer_ckpt, codes, codes_val, folder, grid_classes,
                    budget_s):
    ckpt = os.path.join(folder, 'ckpt.pt')
    if not record.done('gpt', ckpt):
        start = time.time()
        recipe = TINY_GPT_RECIPE if args.tiny else GPT_RECIPE
        flags = recipe + ['--codes', codes]
        epochs = record.stages.get('gpt', {}).get('epochs')  # a resumed run keeps its schedule
        if epochs is None:
            step_s, startup_s, steps_per_epoch = probe_gpt(flags, folder + '_probe')
            left_s = budget_s - (time.time() - start) - startup_s
            epochs = plan_epochs(left_s, step_s * steps_per_epoch, args.minutes)
            record.update('gpt', epochs=epochs, steps_per_epoch=steps_per_epoch,
                          probe_step_s=step_s, probe_startup_s=startup_s)
            print(f"generator: {step_s:.3f} s/step, {startup_s:.0f} s start-up, "
                  f"{steps_per_epoch} steps/epoch -> {epochs} epochs in {left_s:.0f} s", flush=True)
        total_steps = epochs * record.stages['gpt']['steps_per_epoch']
        resume = ['--resume'] if os.path.exists(ckpt) else ['--overwrite']
        # held-out NLL and a checkpoint at the start, half-way and at the end
        run('train_gpt.py', flags + [
            '--tokenizer', tokenizer_ckpt, '--val-codes', codes_val, '--out', folder,
            '--epochs', epochs, '--warmup-epochs', f'{WARMUP_FRACTION * epochs:.4g}',
            '--eval-every', max(1, math.ceil(total_steps / 2)),
            '--sample-classes', ','.join(map(str, grid_classes))] + resume)
        record.add_seconds('gpt', start)
        final = read_log(os.path.join(folder, 'log.csv'), 'val_ce_pre')[-1]
        record.update('gpt', done=True, step=int(final['step']), **{
            k: float(final[k]) for k in ('val_ce_pre', 'val_ce_post', 'val_bits_pre',
                                         'val_bits_post')})
    return ckpt


def sample(args, record, gpt_ckpt, classes, grid_classes, npz_path, png_path):
    if not record.done('sample', npz_path, png_path):
        start = time.time()
        recipe = TINY_SAMPLE_RECIPE if args.tiny else SAMPLE_RECIPE
        output = run('sample.py', recipe + [
            '--gpt', gpt_ckpt, '--classes', ','.join(map(str, classes)),
            '--num-per-class', args.num_per_class, '--out', npz_path])
        throughput = re.search(r'([\d.]+) images/s', output)  # absent when nothing was left to do
        # the grid: the first samples of a few classes, taken from the .npz
        with np.load(npz_path) as samples:
            images, labels = samples['arr_0'], samples['arr_1']
        grid = np.concatenate([images[labels == c][:GRID_PER_CLASS] for c in grid_classes])
        save_image_grid(grid, png_path, nrow=min(GRID_PER_CLASS, args.num_per_class))
        print(f"wrote {png_path}: classes {','.join(map(str, grid_classes))}, a row each",
              flush=True)
        record.add_seconds('sample', start)
        record.update('sample', done=True, images=len(labels), image_shape=list(images.shape[1:]),
                      **({'images_per_s': float(throughput.group(1))} if throughput else {}))


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    record = Record(os.path.join(args.out, 'pipeline.json'))
    budget_s = args.minutes * 60
    path = lambda name: os.path.join(args.out, name)  # noqa: E731

    tokenizer_ckpt = train_tokenizer(args, record, path('tok'), TOKENIZER_SHARE * budget_s)
    codes = extract(args, record, tokenizer_ckpt, path('codes'), val=False)
    codes_val = extract(args, record, tokenizer_ckpt, path('codes_val'), val=True)
    # sample the classes that were trained: those of the training data; the grids show a few,
    # spread over them
    classes = np.unique(np.load(os.path.join(codes, 'labels.npy'))).tolist()
    grid_classes = classes[::max(1, len(classes) // GRID_CLASSES)][:GRID_CLASSES]
    gpt_budget_s = (TOKENIZER_SHARE + CODES_SHARE + GPT_SHARE) * budget_s - sum(
        record.seconds(s) for s in ('tokenizer', 'codes', 'codes_val'))
    # earlier stages that overran take time from the generator, down to half of its share
    gpt_ckpt = train_generator(args, record, tokenizer_ckpt, codes, codes_val, path('gpt'),
                               grid_classes, max(gpt_budget_s, 0.5 * GPT_SHARE * budget_s))
    sample(args, record, gpt_ckpt, classes, grid_classes, path('samples.npz'),
           path('samples.png'))

    s = record.stages
    tok, gpt, smp = s['tokenizer'], s['gpt'], s['sample']
    print(f"\ntokenizer: held-out PSNR {tok['psnr']:.2f} dB, codebook usage "
          f"{tok['codebook_usage']:.2%} (step {tok['step']})")
    print(f"generator: held-out NLL pre {gpt['val_ce_pre']:.4f} + post {gpt['val_ce_post']:.4f} "
          f"nats = {gpt['val_bits_pre']:.3f} + {gpt['val_bits_post']:.3f} bits per token "
          f"(step {gpt['step']}, epochs {gpt['epochs']})")
    rate = f"{smp['images_per_s']:.1f} img/s" if 'images_per_s' in smp else "rate not measured"
    print(f"samples: {smp['images']} images {'x'.join(map(str, smp['image_shape']))} ({rate}) "
          f"in {path('samples.npz')}, grid {path('samples.png')}")
    stages = ('tokenizer', 'codes', 'codes_val', 'gpt', 'sample')
    print("wall time: " + ', '.join(f"{name} {record.seconds(name):.0f} s" for name in stages)
          + f"; total {sum(record.seconds(name) for name in stages) / 60:.1f} minutes "
          f"(budget {args.minutes:g})")
    return record.stages


if __name__ == '__main__':
    main()
