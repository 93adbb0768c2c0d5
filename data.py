"""
Datasets: image folders, .npz archives and built-in synthetic shapes, their augmentation, the
rank-sharded resumable sampler, token extraction (extract_codes) and the dataset of its tokens.

Every dataset returns (image (3, H, W) float in [-1, 1], label int64) and takes a spec string:
    'synthetic'                     built-in class-conditional shapes, no files (the quick start and the tests)
    /path/to/imagenet/train         an ImageNet-style folder root/<class>/<image>, classes in sorted order
    a.npz[,b.npz,...]               image archives: `images` uint8 (N,H,W,3), or packed JPEG bytes
                                    (`jpeg` 1-D uint8 + `offsets` (N+1,)), with `labels` (N,)

Augmentation is a pure function of (seed, epoch, index): the sampler yields (epoch, index) pairs, so
a resumed run, any number of DataLoader workers and the token extraction below all see exactly the
same crops. Train: resize the shorter side to `size` (bicubic), random crop (and an optional
horizontal flip); eval: center crop. Stage 2 does not flip by default: the official AR data pipeline
resizes and random-crops only.

A corrupt or unreadable image is reported with its path and dropped from its batch (the collate
function counts it); the trainers stop with an error once more than 1% of the images seen were bad.

`extract_codes` encodes a dataset once into a memory-mapped array of 18-bit token indices (several
augmented views per image, or one centre crop of held-out images) for train_gpt.py; run it as
`python extract_codes.py ...` (see there), under torchrun too.
"""

import glob
import io
import json
import os
import signal
import sys

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# reading an image file (here and in fid.py) and the augmentation shared by every dataset

# Transparent pixels are composited onto white: transparent PNGs (product cut-outs, logos, icons)
# are drawn to be seen on a white page, while dropping the alpha shows whatever colour the
# invisible pixels happen to store (often black).
BACKGROUND = (255, 255, 255)


def to_rgb(img):
    """Any PIL image -> a new 8-bit RGB image.
    16-bit grey (PNG's 16-bit files open as mode I;16, I;16B or I) is scaled by 1/257 (65535 ->
    255), where convert('RGB') would clip everything above 255 to white. Transparency (RGBA, LA,
    PA, or P / L / RGB with a transparent colour) is composited onto BACKGROUND. Rest: convert."""
    if img.mode.startswith('I'):  # I;16, I;16B, I;16L, or I (32-bit ints holding 0..65535)
        grey = np.asarray(img).astype(np.float64) / 257  # (H, W) in 0..255
        img = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))  # mode L
    if img.mode in ('RGBA', 'LA', 'PA') or 'transparency' in img.info:
        background = Image.new('RGBA', img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, img.convert('RGBA'))
    return img.convert('RGB')  # always a copy, also of an RGB image


def open_image(file):
    """Path or binary file object -> 8-bit RGB PIL image (see to_rgb). Decoded now, so that a
    truncated or corrupt file raises here, where the caller can name it."""
    with Image.open(file) as img:  # closing frees the decoded image; to_rgb's copy survives
        img.load()
        return to_rgb(img)


def crop_image(img, size, train, rng, hflip):
    """PIL image -> (3, size, size) float tensor in [-1, 1]. rng is a numpy Generator (None for
    eval)."""
    img = to_rgb(img)  # RGB already after open_image; for 16-bit or transparent images passed in
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1:
        # shorter side -> size; max(): no side ends below size after rounding
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
    if train:
        # high is exclusive: every offset up to w - size is possible
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    if train and hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    return x.float() / 127.5 - 1


class ImageDataset(torch.utils.data.Dataset):
    """Shared __getitem__: item is an index or an (epoch, index) pair; returns None for an
    unreadable image."""

    def __init__(self, size, train, seed, hflip):
        self.size, self.train, self.seed, self.hflip = size, train, seed, hflip

    def __getitem__(self, item):
        epoch, i = item if isinstance(item, tuple) else (0, item)
        # seeded by (seed, epoch, index), never by worker or rank: the crop is the same wherever and
        # whenever image i is read
        rng = np.random.default_rng((self.seed, epoch, i)) if self.train else None
        try:
            image = crop_image(self.load(i), self.size, self.train, rng, self.hflip)
            return image, int(self.labels[i])
        except Exception as e:  # corrupt file, truncated JPEG, permission error, ...
            print(f"warning: skipping unreadable image {self.describe(i)}: {e}",
                  file=sys.stderr, flush=True)
            return None


# matched case-insensitively (ImageNet's .JPEG)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


class ImageFolder(ImageDataset):
    """root/<class>/<image>, as torchvision's:
    label = the position of the class folder in sorted order."""

    def __init__(self, root, size, train=True, seed=0, hflip=False):
        super().__init__(size, train, seed, hflip)
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.paths, self.labels = [], []
        for label, name in enumerate(classes):
            files = sorted(f for f in os.listdir(os.path.join(root, name))
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            self.paths += [os.path.join(root, name, f) for f in files]
            self.labels += [label] * len(files)
        if not self.paths:
            raise FileNotFoundError(f"no images found under {root} (expected root/<class>/<image>.jpg)")
        self.num_classes = len(classes)

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        return open_image(self.paths[i])  # decodes: a truncated file fails in __getitem__'s try

    def describe(self, i):
        return self.paths[i]


class NpzImages(ImageDataset):
    """One or more .npz archives (comma-separated): raw `images` or packed JPEG bytes (image i is
    jpeg[offsets[i]:offsets[i + 1]]); docs/tinyimagenet_to_npz.py writes the second kind."""

    def __init__(self, paths, size, train=True, seed=0, hflip=False):
        super().__init__(size, train, seed, hflip)
        self.parts = []  # (path, images or None, jpeg, offsets) per file
        labels = []
        for path in paths.split(','):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image archive not found: {path}")
            d = np.load(path)
            if 'images' in d.files:
                self.parts.append((path, d['images'], None, None))
            elif 'jpeg' in d.files:
                self.parts.append((path, None, d['jpeg'], d['offsets']))
            else:
                raise ValueError(f"{path}: expected key 'images' or 'jpeg'+'offsets', found {d.files}")
            labels.append(d['labels'].astype(np.int64))
        self.labels = np.concatenate(labels)
        # first global index of each part
        self.starts = np.cumsum([0] + [len(lab) for lab in labels])
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self):
        return len(self.labels)

    def _locate(self, i):
        # global index -> (file, row in it): the last part whose start is <= i
        part = int(np.searchsorted(self.starts, i, side='right')) - 1
        return part, i - self.starts[part]

    def load(self, i):
        part, j = self._locate(i)
        _, images, jpeg, offsets = self.parts[part]
        if images is not None:
            return Image.fromarray(images[j])
        # image j's JPEG bytes lie between offsets[j] and offsets[j + 1] of one flat uint8 array
        return open_image(io.BytesIO(jpeg[offsets[j]:offsets[j + 1]].tobytes()))

    def describe(self, i):
        part, j = self._locate(i)
        return f"{self.parts[part][0]}[{j}]"


class SyntheticShapes(ImageDataset):
    """Built-in class-conditional data: class c is a shape (c % 5: disc, square, triangle, ring,
    cross) in a colour (c // 5) on a random background, at a random position and size. Image i is a
    pure function of (seed, i)."""

    PALETTE = np.array([[230, 40, 40], [40, 90, 230], [40, 200, 70], [240, 200, 30], [200, 60, 220],
                        [30, 210, 220], [250, 130, 20], [250, 250, 250]], np.float32)

    def __init__(self, n=2000, size=32, num_classes=10, seed=0, train=True, hflip=False):
        super().__init__(size, train, seed, hflip)
        assert num_classes <= 5 * len(self.PALETTE)
        self.n, self.num_classes = n, num_classes
        self.labels = np.arange(n) % num_classes

    def __len__(self):
        return self.n

    def load(self, i):
        # 12345 keeps this stream apart from the crop's (seed, epoch, i)
        rng = np.random.default_rng((self.seed, 12345, i))
        s, c = self.size, int(self.labels[i])
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5  # (s, s) pixel centres
        r = s * rng.uniform(0.22, 0.34)  # shape radius
        cy, cx = rng.uniform(r, s - r, size=2)
        # (s, s) coordinates in units of the radius: the masks below are unit shapes
        dy, dx = (yy - cy) / r, (xx - cx) / r
        shape = c % 5
        if shape == 0:
            mask = dy ** 2 + dx ** 2 < 1
        elif shape == 1:
            mask = (abs(dy) < 0.8) & (abs(dx) < 0.8)
        elif shape == 2:
            mask = (dy < 0.8) & (abs(dx) < (dy + 1) * 0.5)
        elif shape == 3:
            mask = (dy ** 2 + dx ** 2 < 1) & (dy ** 2 + dx ** 2 > 0.36)
        else:
            mask = ((abs(dy) < 0.25) | (abs(dx) < 0.25)) & (abs(dy) < 1) & (abs(dx) < 1)
        background = rng.uniform(0, 90, size=3).astype(np.float32)  # (3,) a dark colour
        background = background + 20 * rng.standard_normal((s, s, 1))  # (s, s, 3) with noise
        colour = self.PALETTE[c // 5] * rng.uniform(0.8, 1.0)
        # (s, s, 3): the shape over the background, plus pixel noise
        img = np.where(mask[..., None], colour, background) + 6 * rng.standard_normal((s, s, 3))
        return Image.fromarray(img.clip(0, 255).astype(np.uint8))

    def describe(self, i):
        return f"synthetic[{i}]"


def build_dataset(spec, size, train=True, seed=0, hflip=False):
    """A dataset spec (see the module docstring) -> dataset; train=False: center crops."""
    if spec == 'synthetic':
        # train and held-out splits are different images (different seeds), same classes
        return SyntheticShapes(n=4000 if train else 200, size=size,
                               seed=seed if train else seed + 1,
                               train=train, hflip=hflip)
    if spec.endswith('.npz'):
        return NpzImages(spec, size, train, seed, hflip)
    if os.path.isdir(spec):
        return ImageFolder(spec, size, train, seed, hflip)
    raise FileNotFoundError(f"dataset {spec!r} is neither 'synthetic', an existing folder, nor .npz file(s)")


# -----------------------------------------------------------------------------
# sampling order and batching


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled, rank-sharded order that can start mid-epoch: yields (epoch, index) pairs.

    Like DistributedSampler (reshuffled each epoch from seed + epoch, every rank a disjoint 1/world
    share, the tail dropped so ranks have equal counts), plus `start`: the number of this rank's
    samples of the epoch already done, which is how a resumed run continues with exactly the batches
    it would have seen.
    """

    def __init__(self, n, rank=0, world_size=1, seed=0):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        # called before each epoch's iter(loader): the workers copy the sampler then
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.n // self.world_size - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        # drop the tail so every rank gets as many, then rank r takes every world-th: step k of all
        # ranks together is the slice order[k * global_batch:(k + 1) * global_batch] whatever the
        # world size
        order = order[:self.n // self.world_size * self.world_size][self.rank::self.world_size]
        return iter([(self.epoch, i) for i in order[self.start:]])


def ignore_stop_signals(worker_id):
    """worker_init_fn of the trainers' DataLoaders: a worker ignores Ctrl-C and SIGTERM, which the
    training process answers with a checkpoint (utils.StopOnSignal); a worker that died of them
    would end the run first. The workers still exit with the training process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate_skip_bad(batch):
    """Default collate, minus the images that failed to load. Returns (images, labels, number
    dropped)."""
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, len(batch) - len(good)


def check_bad_fraction(num_bad, num_seen):
    """Stop once more than 1% of the images seen (after the first 100) could not be read."""
    if num_bad > 0.01 * num_seen and num_seen >= 100:
        raise RuntimeError(f"{num_bad} of {num_seen} images could not be read (> 1%); "
                           "check the dataset (the warnings above list the files)")


# -----------------------------------------------------------------------------
# token extraction for the generator: dataset -> memory-mapped (views, N, h, w)
# int32 array of 18-bit indices


def data_source(spec):
    """What a dataset spec points at, recorded with the codes made from it: absolute paths and the
    bytes of each .npz (a folder's size is its image count, recorded as num_images)."""
    if spec == 'synthetic':
        return {'data': ['synthetic'], 'data_bytes': [None]}
    paths = [os.path.abspath(p) for p in spec.split(',')]
    sizes = [os.path.getsize(p) if os.path.isfile(p) else None for p in paths]
    return {'data': paths, 'data_bytes': sizes}


def crop_mode(dataset):
    """'center' (eval), 'random' or 'random+hflip': the augmentation of this dataset's views."""
    return 'center' if not dataset.train else 'random+hflip' if dataset.hflip else 'random'


def _check_made_from(out_dir, made_from):
    """Refuse to add to codes made from another tokenizer, data, image size, views or crop mode."""
    meta_path = os.path.join(out_dir, 'meta.json')
    way_out = "write to a new folder, or pass --overwrite to replace these codes"
    if os.path.exists(meta_path):
        saved = json.load(open(meta_path)).get('made_from', {})
        diff = [f"  {k}: folder {saved.get(k)!r} vs. now {v!r}"
                for k, v in made_from.items() if saved.get(k) != v]
        if diff:
            raise ValueError(f"codes folder {out_dir} was made from something else:\n"
                             + '\n'.join(diff) + '\n' + way_out)
    elif os.path.exists(os.path.join(out_dir, 'codes.npy')):
        raise ValueError(f"codes folder {out_dir} has codes.npy but no meta.json saying what they "
                         f"were made from: {way_out}")


@torch.no_grad()
def extract_codes(tokenizer, dataset, out_dir, views, batch_size, env, num_workers=4,
                  source=None, overwrite=False, info=None):
    """Encode every image of `dataset` `views` times (view v = augmentation epoch v: its own random
    crop; an eval dataset gives its centre crop: use views=1). Command line: extract_codes.py.

    Writes out_dir/codes.npy (views, N, h, w) int32, out_dir/labels.npy (N,) and out_dir/meta.json.
    Rank r of W encodes images r, r+W, ... into the one shared memmap (ranks touch disjoint rows;
    several nodes need a shared filesystem). Each rank records finished chunks in
    out_dir/progress_rank{r}_of{W}.json, so a killed extraction resumes (with the same world size).

    meta.json['made_from'] records the tokenizer's weights checksum, `source` (data_source(spec)),
    the image count and size, the views, the crop mode and the seed; a folder made from anything
    else is refused (overwrite=True empties it first). Unreadable images are skipped under the
    trainers' rule (check_bad_fraction): they get no codes, meta.json['skipped'] lists them as
    {'index', 'file'} and CodesDataset leaves them out. `info` is stored as is, never compared.
    """
    from tqdm import tqdm

    from utils import autocast, barrier, weights_checksum

    rank, world = env.rank, env.world_size
    n = len(dataset)
    h = w = dataset.size // tokenizer.downsample
    codes_path, meta_path = os.path.join(out_dir, 'codes.npy'), os.path.join(out_dir, 'meta.json')
    made_from = {'tokenizer_sha256': weights_checksum(tokenizer), **(source or {}),
                 'num_images': n, 'image_size': dataset.size, 'views': views,
                 'crop': crop_mode(dataset), 'seed': dataset.seed}
    meta = {'views': views, 'num_images': n, 'grid': [h, w], 'num_bits': tokenizer.config.num_bits,
            'image_size': dataset.size, 'num_classes': int(dataset.num_classes),
            'made_from': made_from, **(info or {}), 'complete': False, 'skipped': []}
    if not overwrite:
        _check_made_from(out_dir, made_from)  # every rank reads it: all of them stop together
    barrier()
    if rank == 0:
        if overwrite:
            old = glob.glob(os.path.join(out_dir, 'progress_rank*.json'))
            for path in old + [codes_path, meta_path, os.path.join(out_dir, 'labels.npy')]:
                if os.path.exists(path):
                    os.remove(path)
        os.makedirs(out_dir, exist_ok=True)
        if not os.path.exists(codes_path):
            shape = (views, n, h, w)
            np.lib.format.open_memmap(codes_path, mode='w+', dtype=np.int32, shape=shape).flush()
            np.save(os.path.join(out_dir, 'labels.npy'), np.asarray(dataset.labels, np.int64))
            with open(meta_path, 'w') as f:  # now: a rerun into a half-done folder is checked
                json.dump(meta, f, indent=1)
    barrier()
    codes = np.load(codes_path, mmap_mode='r+')
    if codes.shape != (views, n, h, w):
        raise ValueError(f"{codes_path} has shape {codes.shape}, expected {(views, n, h, w)}: "
                         "write to a new folder, or pass --overwrite")
    progress_path = os.path.join(out_dir, f'progress_rank{rank}_of{world}.json')
    progress = {'chunks_done': 0, 'num_seen': 0, 'skipped': {}}  # skipped: str(index) -> file
    if os.path.exists(progress_path):
        progress.update(json.load(open(progress_path)))

    my_images = list(range(rank, n, world))  # image i goes to rank i % world
    chunks = [my_images[i:i + batch_size] for i in range(0, len(my_images), batch_size)]
    # view-major: all of view 0, then view 1...; progress counts finished (view, chunk) pairs, so
    # a resume skips work[:done]
    work = [(v, chunk) for v in range(views) for chunk in chunks]
    done = progress['chunks_done']
    batch_sampler = [[(v, i) for i in chunk] for v, chunk in work[done:]]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler,
                                         num_workers=num_workers, collate_fn=list)
    tokenizer.eval()
    for k, batch in enumerate(tqdm(loader, desc=f'extract rank {rank}', initial=done,
                                   total=len(work), disable=rank != 0)):
        v, chunk = work[done + k]
        # an unreadable image (the dataset warns) gets no codes in any view; too many stop the run.
        # The share counts images, not views: one bad file is one of this rank's images however
        # many views read it
        good = [(i, b) for i, b in zip(chunk, batch) if b is not None]
        for i, b in zip(chunk, batch):
            if b is None:
                progress['skipped'][str(i)] = dataset.describe(i)
        progress['num_seen'] += len(chunk) if v == 0 else 0
        check_bad_fraction(len(progress['skipped']), progress['num_seen'])
        if good:
            x = torch.stack([b[0] for _, b in good]).to(env.device)
            with autocast(env.device_type):  # bf16 on GPU / NPU
                _, indices, _ = tokenizer.encode(x)  # (B, h, w)
            # rows i of view v: no other rank writes them
            codes[v, [i for i, _ in good]] = indices.cpu().numpy().astype(np.int32)
        # flush the memmap before recording progress: a recorded chunk is always on disk
        if k % 50 == 49 or done + k + 1 == len(work):
            codes.flush()
            with open(progress_path + '.tmp', 'w') as f:
                json.dump({**progress, 'chunks_done': done + k + 1, 'chunks_total': len(work)}, f)
            os.replace(progress_path + '.tmp', progress_path)
    codes.flush()
    barrier()
    if rank == 0:
        pattern = os.path.join(out_dir, f'progress_rank*_of{world}.json')
        progresses = [json.load(open(p)) for p in glob.glob(pattern)]
        skipped = {int(i): file for p in progresses for i, file in p['skipped'].items()}
        # complete only if every rank of this world size finished all its chunks
        meta['complete'] = len(progresses) == world and all(
            p['chunks_done'] == p['chunks_total'] for p in progresses)
        meta['skipped'] = [{'index': i, 'file': skipped[i]} for i in sorted(skipped)]
        with open(meta_path + '.tmp', 'w') as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_path + '.tmp', meta_path)
    barrier()
    return json.load(open(meta_path))  # as rank 0 completed it


class CodesDataset(torch.utils.data.Dataset):
    """Pre-extracted tokens: item (epoch, j) -> (tokens (h*w,) int64 of view epoch % views, label)
    of the j-th image with codes (those skipped as unreadable at extraction are left out)."""

    def __init__(self, out_dir):
        meta_path = os.path.join(out_dir, 'meta.json')
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no {meta_path}: run the extraction first "
                                    "(python extract_codes.py ...)")
        self.meta = json.load(open(meta_path))
        if not self.meta['complete']:
            raise RuntimeError(f"extraction in {out_dir} is incomplete: rerun it to finish")
        self.codes = np.load(os.path.join(out_dir, 'codes.npy'), mmap_mode='r')  # (views, N, h, w)
        labels = np.load(os.path.join(out_dir, 'labels.npy'))
        skipped = [s['index'] for s in self.meta.get('skipped', [])]
        self.present = np.setdiff1d(np.arange(self.codes.shape[1]), skipped)  # (len,) rows of N
        self.labels = labels[self.present]  # (len,) aligned with the items
        self.num_classes = self.meta['num_classes']

    def __len__(self):
        return len(self.present)

    def __getitem__(self, item):
        epoch, j = item if isinstance(item, tuple) else (0, item)
        tokens = self.codes[epoch % self.codes.shape[0], self.present[j]]  # (h, w)
        return torch.from_numpy(tokens.astype(np.int64)).flatten(), int(self.labels[j])
