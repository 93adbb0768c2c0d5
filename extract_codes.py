"""
Encode a dataset once with the frozen tokenizer, so that train_gpt.py --codes trains with no
tokenizer in the loop (nanoGPT's prepare.py, for tokens of images). Resumable: rerun the same
command after a crash; each rank encodes its own shard of the images.

Training codes, 10 augmented views per image (view v is the resize + random crop of epoch v, no
flip, as the official AR data pipeline; --hflip adds random flips):
    python extract_codes.py --tokenizer out/tok/ckpt.pt --data /data/imagenet/train \
        --codes out/codes
    torchrun --standalone --nproc_per_node 8 extract_codes.py --tokenizer out/tok/ckpt.pt \\
        --data /data/imagenet/train --codes out/codes
Held-out codes for train_gpt.py --val-codes, one centre-crop view per image:
    python extract_codes.py --val --tokenizer out/tok/ckpt.pt --data /data/imagenet/val \\
        --codes out/codes_val
Then:
    python train_gpt.py --preset B --codes out/codes --val-codes out/codes_val \\
        --tokenizer out/tok/ckpt.pt --out out/gpt_B

The codes folder (data.extract_codes writes it, data.CodesDataset reads it):
    codes.npy    (views, N, h, w) int32: the 18-bit token index of every position of every view
    labels.npy   (N,) int64 class labels
    meta.json    views, num_images, grid [h, w], num_bits, image_size, num_classes, complete;
                 made_from: what the codes were made from (the tokenizer's weights checksum, the
                 absolute data path(s) and .npz sizes, the image count and size, the views, the
                 crop mode, the seed): extracting into a folder made from anything else is refused
                 (use a new folder or --overwrite);
                 skipped: [{index, file}] images that could not be read (no codes; left out when
                 training). As in training, more than 1% unreadable images stop the extraction.
    progress_rank{r}_of{W}.json   chunks done by each rank, for resuming
"""

import argparse

import data
from train_gpt import load_tokenizer
from utils import cleanup, print0, setup


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokenizer', required=True,
                        help="tokenizer checkpoint (ours, or a released one as open-magvit2:PATH)")
    parser.add_argument('--no-ema', dest='ema', action='store_false',
                        help="raw tokenizer weights, not EMA")
    parser.add_argument('--data', required=True,
                        help="'synthetic', an ImageNet-style folder, or .npz archive(s)")
    parser.add_argument('--codes', required=True, help="output folder")
    parser.add_argument('--val', action='store_true',
                        help="held-out codes: one centre-crop view per image (for --val-codes)")
    parser.add_argument('--views', type=int,
                        help="augmented views per image, default 10 (train_gpt.py epoch e reads "
                        "view e %% views; --val: 1)")
    parser.add_argument('--hflip', action='store_true',
                        help="random horizontal flips (the official AR data pipeline has none)")
    parser.add_argument('--image-size', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=256, help="global: all ranks together")
    parser.add_argument('--num-workers', type=int, default=8, help="DataLoader workers per rank")
    parser.add_argument('--seed', type=int, default=0, help="of the crops (as train_gpt.py)")
    parser.add_argument('--overwrite', action='store_true',
                        help="replace the codes already in --codes, whatever made them")
    parser.add_argument('--device', default='cuda', help="cuda | npu | cpu")
    parser.add_argument('--compile', action='store_true', help="torch.compile the encoder")
    return parser.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    env = setup(args.device)
    tokenizer = load_tokenizer(args.tokenizer, args.ema, args.image_size, env.device,
                               args.compile)
    # a held-out set is its centre crops, once; training views are the trainer's augmentation
    if args.val and args.views not in (None, 1):
        raise ValueError("--val writes one centre-crop view per image: leave out --views")
    views = 1 if args.val else args.views or 10
    dataset = data.build_dataset(args.data, args.image_size, train=not args.val, seed=args.seed,
                                 hflip=args.hflip)
    meta = data.extract_codes(tokenizer, dataset, args.codes, views,
                              max(1, args.batch_size // env.world_size), env, args.num_workers,
                              source=data.data_source(args.data), overwrite=args.overwrite,
                              info={'tokenizer': args.tokenizer, 'tokenizer_ema': args.ema})
    print0(f"wrote {views} view(s) of {len(dataset) - len(meta['skipped'])} images to {args.codes}"
           f" ({data.crop_mode(dataset)} crops, {meta['grid'][0]}x{meta['grid'][1]} tokens)"
           + (f"; skipped {len(meta['skipped'])} unreadable images (listed in meta.json)"
              if meta['skipped'] else ''))
    cleanup()
    return meta


if __name__ == '__main__':
    main()
