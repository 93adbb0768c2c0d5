"""
Plumbing shared by train_tok.py, train_gpt.py, sample.py and fid.py: device choice and DDP set-up, bf16 autocast,
atomic checkpoints with clear errors, RNG state capture for exact resume, and image grids.

Device: `--device cuda | npu | cpu`. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) `setup`
joins the process group with the backend that goes with the device: nccl (cuda), hccl (Ascend npu, needs torch_npu),
gloo (cpu). Nothing else in the repository needs to know which one it is.
"""

import hashlib
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# device and distributed set-up


@dataclass
class Dist:
    device: torch.device
    device_type: str  # 'cuda' | 'npu' | 'cpu'
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(device_name='cuda'):
    """Pick the device and, under torchrun, init the process group. Returns a Dist."""
    if device_name not in ('cuda', 'npu', 'cpu'):
        raise ValueError(f"unknown --device {device_name!r}: choose cuda, npu or cpu")
    if device_name == 'npu':
        try:
            import torch_npu  # noqa: F401  (registers the 'npu' device and the hccl backend with torch)
        except ImportError as e:
            raise RuntimeError("--device npu needs Huawei's torch_npu package (pip install torch-npu matching "
                               "your torch and CANN versions)") from e
    if device_name == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA GPU is visible; use --device cpu (or npu)")
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device_name == 'cpu':
        device = torch.device('cpu')
    else:
        device = torch.device(device_name, local_rank)
        getattr(torch, device_name).set_device(device)
    if world_size > 1:
        backend = {'cuda': 'nccl', 'npu': 'hccl', 'cpu': 'gloo'}[device_name]
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if device_name == 'cuda' else None)
    if device_name == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls left outside autocast
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest conv algorithms
    return Dist(device, device_name, rank, local_rank, world_size)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # leave together: a rank exiting while another still communicates makes gloo abort
        dist.destroy_process_group()


def autocast(device_type):
    """bf16 autocast on accelerators; full fp32 on CPU (bf16 on CPU is slow and only adds noise to the tests)."""
    if device_type == 'cpu':
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def print0(*args, **kwargs):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x):
    """Sum a tensor over ranks (a copy; no-op without DDP): evaluation totals."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """Average a tensor over ranks (no-op without DDP): logged losses."""
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(x) / dist.get_world_size()
    return x


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def peak_memory_gib(device_type):
    """Peak memory allocated by tensors on this process's accelerator so far, in GiB (nan on CPU)."""
    if device_type in ('cuda', 'npu'):
        return getattr(torch, device_type).max_memory_allocated() / 2 ** 30
    return float('nan')


def weights_checksum(module):
    """First 16 hex digits of the sha256 of every parameter and buffer, bit for bit, in name order. DDP keeps the
    ranks' weights identical; the trainers print this on every rank at the end so that a run shows it did."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# pretrained weights (LPIPS's VGG16 and heads, FID's Inception): one cache folder, one checked download

CACHE_DIR = os.environ.get('NANOMAGVIT2_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'nanomagvit2')


def download(url, path, sha256):
    """url -> path, through a temporary file that is moved into place only if its sha256 matches (torch.hub's
    download_url_to_file). Raises OSError without network, RuntimeError on a wrong checksum."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    print(f"downloading {url} -> {path}", flush=True)
    torch.hub.download_url_to_file(url, path, hash_prefix=sha256)


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, obj):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact, never a truncated file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, expect_kind=None):
    """Load one of our checkpoints (a dict with 'kind' and 'config') with errors a person can act on."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise RuntimeError(f"could not read checkpoint {path} (truncated or not a PyTorch file?): {e}") from e
    if expect_kind is not None:
        check_kind(ckpt, expect_kind, path)
    return ckpt


def check_kind(ckpt, expect_kind, path):
    """Our checkpoints say what they hold ('tokenizer' or 'gpt'); refuse the other one, or a foreign file."""
    kind = ckpt.get('kind') if isinstance(ckpt, dict) else None
    if kind != expect_kind:
        raise ValueError(f"{path} is not a {expect_kind} checkpoint (its kind is {kind!r})")


def check_config(saved, current, path):
    """Refuse to resume a run whose model/optimisation config differs from the one on the command line."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        lines = '\n'.join(f"  {k}: checkpoint {a!r} vs. now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} was written with another config:\n{lines}")


def rng_state():
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        # one state per GPU the saving process saw (all of the node's under torchrun); a run resumed on fewer
        # visible GPUs restores those it has (each process only draws on its own device)
        for i, cuda_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


# -----------------------------------------------------------------------------
# images


def to_uint8(x):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 numpy, official convention: clamp, scale, truncate."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images, path, nrow=8):
    """Save (N, 3, H, W) in [-1, 1] or (N, H, W, 3) uint8 as one PNG grid, nrow images per row."""
    from PIL import Image
    if torch.is_tensor(images):
        images = to_uint8(images)
    n, h, w, _ = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + 2) + 2, ncol * (w + 2) + 2, 3), 255, np.uint8)  # white 2px borders
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
