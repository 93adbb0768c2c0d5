"""Pack the official Tiny-ImageNet-200 (http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzipped)
into the .npz archives that data.py reads, with the JPEG bytes unchanged:

    python docs/tinyimagenet_to_npz.py tiny-imagenet-200 --out data/tin --imagenet-wnids imagenet_wnids.txt

writes data/tin/train_part0.npz ... train_part4.npz and data/tin/val.npz. Part k holds the training
images <wnid>_<i>.JPEG with i = 100k ... 100k + 99 of every class (20,000 images, 100 per class),
classes in the order of wnids.txt; val.npz holds the official 10,000-image validation split
(val_0 ... val_9999, labels from val_annotations.txt), which no part contains.

Keys: jpeg (all files' bytes, concatenated), offsets (N + 1,) int64, labels (N,) int64,
labels200 (N,) the class's position in wnids.txt, names (N,) file names.
labels: with --imagenet-wnids (a text file of the 1000 ImageNet-1k wnids, one per line, e.g.
`ls /data/imagenet/train > imagenet_wnids.txt`), the ImageNet-1k class index (position in the
sorted list), so that class ids mean the same as on ImageNet; without it, labels200.
"""

import argparse
import os

import numpy as np


def pack(files, labels, labels200, path):
    blobs = []
    for f in files:
        with open(f, 'rb') as fh:
            blobs.append(np.frombuffer(fh.read(), np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=np.asarray(labels, np.int64),
             labels200=np.asarray(labels200, np.int64), names=np.array([os.path.basename(f) for f in files]))
    print(f"{path}: {len(files)} images")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', help="the unzipped tiny-imagenet-200 folder")
    parser.add_argument('--out', default='data/tin')
    parser.add_argument('--imagenet-wnids', help="the 1000 ImageNet-1k wnids, one per line")
    parser.add_argument('--per-part', type=int, default=100, help="training images per class in each part")
    args = parser.parse_args()
    with open(os.path.join(args.root, 'wnids.txt')) as f:
        wnids = [line.strip() for line in f if line.strip()]
    label_of = {w: i for i, w in enumerate(wnids)}  # labels200
    if args.imagenet_wnids:
        with open(args.imagenet_wnids) as f:
            imagenet = sorted(line.split()[0] for line in f if line.strip())
        if len(imagenet) != 1000 or not set(wnids) <= set(imagenet):
            raise SystemExit(f"{args.imagenet_wnids}: expected the 1000 ImageNet-1k wnids")
        label_of = {w: imagenet.index(w) for w in wnids}
    os.makedirs(args.out, exist_ok=True)

    per_class = len(os.listdir(os.path.join(args.root, 'train', wnids[0], 'images')))  # 500
    for part in range(per_class // args.per_part):
        files, labels, labels200 = [], [], []
        for c, w in enumerate(wnids):
            for i in range(part * args.per_part, (part + 1) * args.per_part):
                files.append(os.path.join(args.root, 'train', w, 'images', f'{w}_{i}.JPEG'))
                labels.append(label_of[w])
                labels200.append(c)
        pack(files, labels, labels200, os.path.join(args.out, f'train_part{part}.npz'))

    with open(os.path.join(args.root, 'val', 'val_annotations.txt')) as f:
        wnid_of = dict(line.split('\t')[:2] for line in f if line.strip())
    names = sorted(wnid_of, key=lambda n: int(n.split('_')[1].split('.')[0]))  # val_0, val_1, ...
    pack([os.path.join(args.root, 'val', 'images', n) for n in names], [label_of[wnid_of[n]] for n in names],
         [wnids.index(wnid_of[n]) for n in names], os.path.join(args.out, 'val.npz'))


if __name__ == '__main__':
    main()
