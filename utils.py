"""
Plumbing shared by train_tok.py, train_gpt.py, sample.py and fid.py: device choice and DDP set-up,
bf16 autocast, atomic checkpoints with clear errors, RNG state capture for
exact resume, and image grids.

Device: `--device cuda | npu | cpu`. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the
environment) `setup` joins the process group with the backend that goes with the device: nccl
(cuda), hccl (Ascend npu, needs torch_npu), gloo (cpu). Nothing else in the repository needs to know
which one it is.
"""

import csv
import errno
import glob
import hashlib
import os
import pickle
import random
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# device and distributed set-up


@dataclass
class Env:
    """The device and this process's place in the job (rank 0 of 1 without torchrun)."""
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


DEVICES = ('cuda', 'npu', 'cpu')  # every script's --device: these choices, then setup(args.device)


def setup(device_name='cuda'):
    """Pick the device and, under torchrun, init the process group. Returns an Env."""
    if device_name not in DEVICES:
        raise ValueError(f"unknown --device {device_name!r}: choose cuda, npu or cpu")
    if device_name == 'npu':
        try:
            import torch_npu  # noqa: F401  registers the 'npu' device and the hccl backend
        except ImportError as e:
            raise RuntimeError("--device npu needs Huawei's torch_npu package (pip install torch-npu matching "
                               "your torch and CANN versions)") from e
    if device_name == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA GPU is visible; use --device cpu (or npu)")
    if device_name == 'cuda':
        # before the first allocation: the caching allocator grows one mapped range per stream
        # instead of keeping blocks of every size it ever cut, so that memory freed by one level of
        # the tokenizer serves the next (a CUDA graph's private pool is one range too: bench.py's
        # tok_step_256_b8_graph row, reserved_gib). A value the user set is kept
        os.environ.setdefault('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device_name == 'cpu':
        device = torch.device('cpu')
    else:
        device = torch.device(device_name, local_rank)
        # one accelerator per process: LOCAL_RANK picks it (torch.cuda or torch_npu's torch.npu)
        getattr(torch, device_name).set_device(device)
    if world_size > 1:
        backend = {'cuda': 'nccl', 'npu': 'hccl', 'cpu': 'gloo'}[device_name]
        # device_id binds the NCCL communicator to this GPU now, not lazily at the first collective
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if device_name == 'cuda' else None)
    if device_name == 'cuda':
        # TF32 for the fp32 matmuls left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # fixed input shapes: let cuDNN pick the fastest conv algorithms
        torch.backends.cudnn.benchmark = True
    return Env(device, device_name, rank, local_rank, world_size)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        # leave together: a rank exiting while another still communicates makes gloo abort
        dist.barrier()
        dist.destroy_process_group()


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption or time limit; torchrun passes both on to
    its workers) during training: instead of dying mid-step and losing every step since the last
    checkpoint, the trainer finishes the step, writes a checkpoint and exits with 128 + the
    signal's number; the same command with --resume continues exactly. A second Ctrl-C stops at
    once; a repeated SIGTERM does not (a launcher may pass on the one the job got as well, and a
    scheduler follows it with SIGKILL when its grace period ends). Every rank must stop at the
    same step: under DDP the ranks agree every CHECK_EVERY steps (one all-reduce of one number,
    and a host sync), so the stop comes within CHECK_EVERY steps; one process checks at every
    step. The DataLoader workers ignore both signals
    (data.ignore_stop_signals): a terminal sends Ctrl-C to them too, and one that died would end
    the run before its checkpoint."""
    CHECK_EVERY = 10

    def __init__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # (handlers: main thread only)
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:  # a second one
            if signum != signal.SIGINT:
                return
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping with a checkpoint after this step "
              "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def agreed(self, step, device):
        """True on every rank at the same step once any rank received a signal."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum is not None
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.signum is not None)], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def exit(self, step, ckpt_path):
        """After the checkpoint: leave the process group together, say how to go on, and exit."""
        self.restore()
        cleanup()
        signum = self.signum or signal.SIGTERM  # (another rank received it)
        print0(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {ckpt_path}: "
               "the same command with --resume continues")
        raise SystemExit(128 + signum)


def autocast(device_type):
    """bf16 autocast on accelerators; full fp32 on CPU (bf16 on CPU is slow and only adds noise to
    the tests)."""
    if device_type == 'cpu':
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def print0(*args, **kwargs):
    # reads the environment, not an Env: callable before setup and from any module
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x):
    """Sum a tensor over ranks (a copy; no-op without DDP): evaluation totals."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()  # all_reduce works in place: the caller's tensor is kept
        dist.all_reduce(x)
    return x


def plan_last_step(step, seconds_left, steps_per_s, max_steps, env):
    """A wall-clock budget as a step: rank 0's estimate of the step the run reaches in
    seconds_left at steps_per_s, handed to every rank (the sum over ranks of rank 0's value and
    zeros), so that all stop at the same step with the same lr. Never below step nor above
    max_steps. Both trainers' --max-minutes call it at each log line."""
    plan = step + max(0.0, seconds_left) * steps_per_s if env.is_main else 0.0
    plan = all_reduce_sum(torch.tensor(plan, dtype=torch.float64, device=env.device))
    return min(max_steps, max(step, int(plan.item())))


def all_reduce_mean(x):
    """Average a tensor over ranks (no-op without DDP): logged losses."""
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(x) / dist.get_world_size()
    return x


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def peak_memory_gib(device_type):
    """Peak memory allocated by tensors on this process's accelerator so far, in GiB (nan on
    CPU)."""
    if device_type in ('cuda', 'npu'):
        return getattr(torch, device_type).max_memory_allocated() / 2 ** 30
    return float('nan')


# bf16 dense tensor-core peak of one chip from its datasheet (no sparsity), the denominator of every
# MFU in this repository (train_gpt.py's log, bench.py's rows); nanoGPT uses the A100's 312e12
PEAK_FLOPS = {'A100': 312e12, 'A800': 312e12, 'H100': 989e12, 'H800': 989e12, 'H200': 989e12}


def peak_flops(device_type):
    """The datasheet bf16 peak (FLOP/s) of this process's GPU, or None for a chip not in
    PEAK_FLOPS."""
    name = torch.cuda.get_device_name() if device_type == 'cuda' else ''
    # a substring of the device name, e.g. 'NVIDIA H100 80GB HBM3' -> 'H100'
    return next((flops for chip, flops in PEAK_FLOPS.items() if chip in name), None)


def weights_checksum(module):
    """First 16 hex digits of the sha256 of every parameter and buffer, bit for bit, in name order.
    DDP keeps the ranks' weights identical; the trainers print this on every rank at the end so that
    a run shows it did."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        # the names too: the same values under other keys are other weights
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# --cuda-graph: one training step recorded once, replayed for every batch (both trainers)


class CUDAGraphed:
    """fn(*inputs) recorded once as a CUDA graph, then replayed. For small batches the host needs
    longer to launch a step's kernels one by one than the GPU needs to run them; a replay launches
    them all in one call. The recorded kernels read and write fixed memory, so:
    - each call's inputs (tensors) are copied into input buffers that the graph reads;
    - whatever else changes between steps (the learning rate) must be a GPU tensor that the caller
      fills in place, and the optimisers must be capturable (their step count on the GPU);
    - the outputs (a dict or tuple of tensors) are the graph's own memory, so each call returns
      copies: the next replay overwrites them.
    The first WARMUP calls run fn itself on a side stream, as capture requires (torch.compile
    compiles there, cuDNN and cuBLAS pick their kernels). Inputs of another shape or layout (a short
    last batch) also run fn itself. Random numbers (dropout) come from the CUDA generator, which
    every replay advances as a plain call would. optimizers: their gradients are set to None before
    recording, so that the graph allocates them in its own memory pool."""
    WARMUP = 3

    def __init__(self, fn, optimizers=()):
        self.fn, self.optimizers = fn, list(optimizers)
        self.calls, self.graph, self.inputs, self.outputs = 0, None, None, None
        self.side = torch.cuda.Stream()

    def __call__(self, *inputs):
        self.calls += 1
        if self.calls <= self.WARMUP:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                outputs = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(self.side)
            return outputs
        if self.graph is None:  # record: runs nothing, the replay below does the step
            self.record(inputs)
        if any(x.shape != b.shape or x.stride() != b.stride() for x, b in zip(inputs, self.inputs)):
            return self.fn(*inputs)
        for x, buffer in zip(inputs, self.inputs):
            buffer.copy_(x)
        self.graph.replay()
        if isinstance(self.outputs, dict):
            return {k: v.clone() for k, v in self.outputs.items()}
        return tuple(v.clone() for v in self.outputs)

    def record(self, inputs):
        self.inputs = [x.clone() for x in inputs]  # clone keeps each input's memory format
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data loader's pin-memory thread keeps calling CUDA (pinned buffers,
            # event queries) while this thread records. In the default 'global' mode such a call
            # from any thread invalidates the recording; thread_local checks only this thread's
            with torch.cuda.graph(self.graph, capture_error_mode='thread_local'):
                self.outputs = self.fn(*self.inputs)
        except RuntimeError as e:  # (torch.AcceleratorError is one): a kernel refused capture
            first_line = str(e).strip().split('\n')[0] or type(e).__name__
            raise SystemExit(f"--cuda-graph: recording the training step as a CUDA graph failed "
                             f"({first_line}); rerun without --cuda-graph (add --resume if a "
                             f"checkpoint was written)") from e
        # the warm-ups' freed activations stay cached for the side stream only: release them
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# pretrained weights (LPIPS's VGG16 and heads, FID's Inception): one cache
# folder, one checked download

CACHE_DIR = (os.environ.get('NANOMAGVIT2_CACHE')
             or os.path.join(os.path.expanduser('~'), '.cache', 'nanomagvit2'))


def download(url, path, sha256):
    """url -> path, through a temporary file that is moved into place only if its sha256 matches
    (torch.hub's download_url_to_file). Raises OSError without network, RuntimeError on a wrong
    checksum."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    print(f"downloading {url} -> {path}", flush=True)
    torch.hub.download_url_to_file(url, path, hash_prefix=sha256)


# -----------------------------------------------------------------------------
# run folders: the guard against overwriting a run, checkpoints, resume checks, log.csv


def prepare_run_folder(out, resume, overwrite, is_main):
    """Called by both trainers before any work. A fresh run refuses a folder that holds one (its
    log and checkpoint would be overwritten); --overwrite deletes them first. Every rank checks (so
    all of them stop together); rank 0 then removes the temporary files that a kill during a
    checkpoint write left behind."""
    ckpt_path, log_path = os.path.join(out, 'ckpt.pt'), os.path.join(out, 'log.csv')
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: "
                         "pass one of them")
    existing = [name for name in ('ckpt.pt', 'log.csv') if os.path.exists(os.path.join(out, name))]
    if existing and not (resume or overwrite):
        raise FileExistsError(f"{out} holds a run already ({', '.join(existing)}): pass --resume "
                              "to continue it, a new --out, or --overwrite to delete it and start "
                              "again")
    barrier()  # no rank writes to the folder before every rank has looked at it
    if is_main:
        os.makedirs(out, exist_ok=True)
        # save_checkpoint's temporary files, left by a kill during a write
        for stale in glob.glob(glob.escape(ckpt_path) + '.tmp*'):
            os.remove(stale)
        if overwrite:
            for path in (ckpt_path, log_path):
                if os.path.exists(path):
                    os.remove(path)
    barrier()
    return ckpt_path


def save_checkpoint(path, obj):
    """Write atomically and durably: the bytes go to a temporary file, which is synced to disk and
    renamed over `path` (then the folder is synced, so that the rename survives a power cut). A
    crash or a full disk mid-write leaves the previous checkpoint intact and no temporary file
    behind. obj must hold only tensors and plain Python types: load_checkpoint refuses anything
    else (weights_only=True)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also KeyboardInterrupt: never leave a partial file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"the disk is full: could not write checkpoint {path} "
                          f"(the previous one, if any, is intact); free space in {folder} and "
                          "--resume") from e
        raise
    if hasattr(os, 'O_DIRECTORY'):  # POSIX: make the rename itself durable
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# marks a released Lightning checkpoint: the only files that are unpickled in full
OFFICIAL_PREFIX = 'open-magvit2:'


def load_checkpoint(path, expect_kind=None):
    """Load a checkpoint with errors a person can act on. Ours (a dict with 'kind' and 'config')
    hold only tensors and plain types and load with weights_only=True, which runs no pickled code.
    A released Open-MAGVIT2 file, given as 'open-magvit2:PATH', also holds pickled Lightning
    objects: it is loaded in full (weights_only=False), so load only ones you trust."""
    path = os.fspath(path)
    official = path.startswith(OFFICIAL_PREFIX)
    path = path.removeprefix(OFFICIAL_PREFIX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=not official)
    except pickle.UnpicklingError as e:  # torch's message names the first object it refused
        lines = str(e).splitlines()
        refused = next((line.strip() for line in lines if 'Unsupported global' in line), '')
        raise RuntimeError(f"{path} holds more than tensors and plain types, so it is not loaded "
                           f"(weights_only=True). A released Open-MAGVIT2 checkpoint you trust: "
                           f"pass it as {OFFICIAL_PREFIX}{path}. {refused}") from e
    except Exception as e:
        raise RuntimeError(f"could not read checkpoint {path} (truncated or not a PyTorch file?): {e}") from e
    if expect_kind is not None:
        check_kind(ckpt, expect_kind, path)
    return ckpt


def check_kind(ckpt, expect_kind, path):
    """Our checkpoints say what they hold ('tokenizer' or 'gpt'); refuse the other one, or a foreign
    file."""
    kind = ckpt.get('kind') if isinstance(ckpt, dict) else None
    if kind != expect_kind:
        raise ValueError(f"{path} is not a {expect_kind} checkpoint (its kind is {kind!r})")


def check_config(saved, current, path):
    """Refuse to resume a run whose model/optimisation config differs from the one on the command
    line."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        lines = '\n'.join(f"  {k}: checkpoint {a!r} vs. now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} was written with another config:\n{lines}")


def check_resume(ckpt, config, args, may_change, path):
    """Refuse to resume with another model config or with other flags, except the names in
    may_change (each trainer's RESUME_MAY_CHANGE: where and how fast it runs, how often it logs,
    when it stops). Every other flag changes what is trained, so it must match the checkpoint's; a
    flag the checkpoint does not know (written before the flag existed) counts as a difference."""
    check_config(ckpt['config'], config, path)
    saved = ckpt['train_args']
    names = sorted((set(saved) | set(args)) - set(may_change))
    check_config({k: saved.get(k, '<absent>') for k in names},
                 {k: args.get(k, '<absent>') for k in names}, path)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping this run's `capturable` (--cuda-graph). The saved
    param_groups carry the flag of the run that wrote them, and recording a step whose optimizer is
    not capturable fails, so a run must be free to resume with or without --cuda-graph."""
    capturable = [group.get('capturable', False) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flag in zip(optimizer.param_groups, capturable):
        group['capturable'] = flag


def rng_state():
    """Every RNG a training step draws on, as tensors and plain types (so that the checkpoint
    loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key is a uint32 array: stored as an int64 tensor, which weights_only loading allows
    state = {'python': [version, list(internal), gauss],
             'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        # one state per GPU the saving process saw (all of the node's under torchrun); a run resumed
        # on fewer visible GPUs restores those it has (each process only draws on its own device)
        for i, cuda_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


class CSVLog:
    """A run's log.csv, written by rank 0 only: a header, then a row per write (missing fields stay
    empty). On resume the rows after the checkpoint's step are dropped, since the resumed run logs
    those steps again."""

    def __init__(self, path, fields, enabled, resume_step=None):
        self.path, self.fields, self.enabled = path, fields, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline='') as f:
                # the rows up to the checkpoint's step; the resumed run writes the later ones again
                rows = [row for row in csv.DictReader(f) if int(row['step']) <= resume_step]
        # rewritten whole, then renamed: never half a log
        with open(path + '.tmp', 'w', newline='') as f:
            writer = csv.DictWriter(f, fields, restval='', extrasaction='ignore')
            writer.writeheader()
            writer.writerows(rows)
        os.replace(path + '.tmp', path)

    def write(self, row):
        if self.enabled:
            with open(self.path, 'a', newline='') as f:
                csv.DictWriter(f, self.fields, restval='').writerow(row)


def read_log(path, column=None):
    """The rows of a log.csv (CSVLog's) as dicts of strings; with `column`, only the rows where it
    is filled (e.g. 'psnr': the evaluation rows of train_tok.py)."""
    with open(path, newline='') as f:
        return [row for row in csv.DictReader(f) if column is None or row.get(column)]


# -----------------------------------------------------------------------------
# images


def to_uint8(x):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 numpy, official convention: clamp, scale,
    truncate."""
    # to(uint8) truncates (255.9 -> 255), as the official code, rather than rounding
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
        # image i at row r, column c of the grid, inside its 2px border
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
