"""
GPU benchmarks of every expensive step on synthetic inputs (no dataset, random weights), printed
beside the original Open-MAGVIT2 code's speed on the same rows (OFFICIAL below). One GPU:

    python bench.py                      # all rows, prints a table and writes out/bench.json
    python bench.py --rows entropy,gpt   # some rows
    python bench.py --rows attention     # gpt.py's attention choices alone (pair_attention, masks)
    python bench.py --compile            # torch.compile the tokenizer and the GPT step as well
    python bench.py --rows sample --profile   # and the GPU kernels that take the time, per row
                                              # (out/bench_profile.txt)
    torchrun --standalone --nproc_per_node=2 bench.py --rows allreduce   # the GPU-to-GPU link

Each row is timed with CUDA events after warm-up: the median of >= 10 repetitions (sampling: of 3
full runs). MFU is model FLOPs per second over the chip's datasheet bf16 peak (utils.peak_flops),
the same definition as train_gpt.py's log: the GPT rows count FLOPs with GPT.estimate_mfu, the
tokenizer rows with torch.utils.flop_counter (count_flops). The bf16 matmul rate measured on an
8192^3 product is printed beside it, as the ceiling a real kernel reaches. LPIPS and Inception use
random weights written to a temporary folder: speed does not depend on the values.
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import fid
import gpt as gpt_module
import quantizer
import tokenizer as tokenizer_module
import train_gpt
import train_tok
import utils

# the original Open-MAGVIT2 code timed by the same rows on one H200 (torch 2.11, bf16 autocast,
# TF32): row -> value in the row's unit
OFFICIAL = {
    'tok_step_256_b8': 41.0, 'tok_step_256_b32': 50.7, 'tok_step_128_b8': 70.0,
    'entropy_8192_ms': 122.0, 'entropy_2048_ms': 33.0, 'encode_256_b64': 465.0,
    'gpt_B_step_b64': 286.0, 'gpt_B_onthefly_b24': 150.0,
    'sample_B_b256': 25.5, 'sample_B_b50': 6.5, 'decode_b50': 355.0,
}


# --profile: 'names' (substrings of the rows to profile) and 'path' (the text file of their tables)
PROFILE = {}


def profile(fn, name):
    """With --profile: run fn once more under torch.profiler and keep the table of the GPU kernels
    that took the most time (self time, summed over the calls), the same by op and input shapes,
    and the callers of aten::copy_ (copy_callers). This is how each row's limit is found, not from
    estimates."""
    if not PROFILE or not any(p in name for p in PROFILE['names']):
        return
    from torch.profiler import ProfilerActivity
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                record_shapes=True, with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by='self_device_time_total', row_limit=15,
                                      max_name_column_width=70)
    # the same time by PyTorch op and input shapes: which layer a kernel comes from
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by='self_device_time_total', row_limit=25, max_name_column_width=40,
        max_shapes_column_width=100)
    print(f"--- profile of {name}\n{table}", flush=True)
    with open(PROFILE['path'], 'a') as f:  # row by row: a run cut short keeps the profiles it made
        f.write(f"--- {name}\n{table}\n--- {name}, by op and input shapes\n{by_shape}\n"
                f"--- {name}, aten::copy_ by caller\n{copy_callers(prof)}\n")


def copy_callers(prof, depth=3, rows=12):
    """Where a profile's aten::copy_ calls come from: each call's chain of parent ops (e.g.
    'aten::clone <- aten::contiguous <- aten::convolution_backward', a layout conversion inside a
    conv's backward) and, in a profile taken with_stack, the innermost Python frame (e.g. a compiled
    graph's wrapper; none for a backward op on CUDA, which runs on autograd's device thread), with
    the number of calls and their GPU time, most first. An activation-sized
    copy is memory traffic that no fused kernel absorbs; its callers say which layer to change."""
    totals = {}  # chain -> [calls, GPU microseconds]
    for event in prof.events():
        if event.name != 'aten::copy_':
            continue
        chain, frame, parent = [], None, event.cpu_parent
        while parent is not None and (len(chain) < depth or frame is None):
            if '.py(' in parent.name:  # with_stack: Python frames are parents too
                frame = frame or parent.name
            elif parent.name.startswith(('aten::', 'autograd::')) and len(chain) < depth:
                chain.append(parent.name)
            parent = parent.cpu_parent
        key = (' <- '.join(chain) or '(called directly)') + (f"  @ {frame}" if frame else '')
        entry = totals.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += event.self_device_time_total
    lines = [f"{us / 1e3:9.3f} ms {calls:5d} calls  {chain}"
             for chain, (calls, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:rows]]
    return '\n'.join(lines) or '(no aten::copy_: a replayed CUDA graph records kernels only)'


def cuda_time(fn, iters=10, warmup=3, name=None):
    """Median milliseconds of fn() over iters runs (after warmup runs), and the peak memory in
    GiB."""
    for _ in range(warmup):
        fn()
    if name is not None:
        profile(fn, name)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        # events time the GPU work itself; the synchronize after each run keeps runs from
        # overlapping
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 30


def matmul_peak():
    """The bf16 FLOP/s of one 8192^3 matrix product: what a real kernel reaches on this GPU."""
    a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
    ms, _ = cuda_time(lambda: a @ b, iters=10, warmup=3)
    return 2 * 8192 ** 3 / (ms / 1e3)  # 2 n^3 FLOPs: a multiply and an add


def write_random_lpips(folder):
    """A random VGG16 in torchvision's layout (features.N.*) and random LPIPS v0.1 heads
    (linK.model.1.weight), as vgg16.pth and lin.pth in folder: the real loading path with
    meaningless values (this file's rows and the tests, through tests/conftest.py)."""
    from losses import TAP_CHANNELS, VGG_LAYOUT
    vgg, index, in_ch = {}, 0, 3
    # conv at every non-'M' entry, each followed by a ReLU (2 indices), 'M' takes 1 index
    for v in VGG_LAYOUT:
        if v == 'M':
            index += 1
            continue
        # He init: activations keep their scale through the 13 convs
        vgg[f'features.{index}.weight'] = torch.randn(v, in_ch, 3, 3) * (2 / (9 * in_ch)) ** 0.5
        vgg[f'features.{index}.bias'] = torch.zeros(v)
        index, in_ch = index + 2, v
    paths = os.path.join(folder, 'vgg16.pth'), os.path.join(folder, 'lin.pth')
    torch.save(vgg, paths[0])
    torch.save({f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1)
                for i, c in enumerate(TAP_CHANNELS)}, paths[1])
    return paths


def write_random_inception(path):
    """A random FID InceptionV3 in pytorch-fid's layout at path (bench.py and the tests).
    Kaiming-initialised convs: PyTorch's default init shrinks the activations through the 94 conv
    units to ~1e-7, where every statistic is ~0."""
    inception = fid.InceptionV3()
    for m in inception.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    # logits of a few units, so the Inception Score is not ~1
    torch.nn.init.normal_(inception.fc.weight, std=0.1)
    torch.save(inception.state_dict(), path)
    return str(path)


def count_flops(fn):
    """FLOPs of one call of fn, counted by torch.utils.flop_counter (matmuls and convolutions,
    forward and backward; element-wise work is not counted, as in every MFU)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def compile_phases():
    """Seconds spent so far in phases of torch.compile, from Dynamo's own timers (nested, so they
    overlap): Dynamo's compilations with their forward graphs (forward), the backward graphs,
    compiled at the first backward (backward), and inside both Inductor's code generation
    (codegen), the wait for the parallel Triton builds (kernel_wait) and loading compiled modules
    (load); graphs counts Dynamo's compilations."""
    from torch._dynamo.utils import compilation_time_metrics as metrics
    phases = {'forward': '_compile.compile_inner', 'backward': 'compile_fx.<locals>.bw_compiler',
              'codegen': 'GraphLowering.codegen', 'kernel_wait': 'async_compile.wait',
              'load': 'PyCodeCache.load_by_key_path'}
    times = {name: sum(metrics.get(key, [])) for name, key in phases.items()}
    times['graphs'] = len(metrics.get('_compile.compile_inner', []))
    return times


def bench_tokenizer_step(name, preset, image_size, batch, env, weights_dir, compile_model, peak,
                         perceptual=True, cuda_graph=False):
    """One train_tok.train_step (G + D + LPIPS, Adam steps, EMA) on random images. Returns a dict:
    img/s, peak GiB, TFLOP per image (counted on the eager step), MFU against the datasheet peak,
    and with compile_model the compile time (first compiled step minus an eager one) and the first
    step's losses compiled vs. eager. name: the row, as in the table and the profile."""
    argv = ['--preset', preset, '--device', 'cuda', '--batch-size', str(batch), '--image-size',
            str(image_size),
            '--channels-last', '--vgg-weights', os.path.join(weights_dir, 'vgg16.pth'),
            '--lpips-weights', os.path.join(weights_dir, 'lin.pth')]
    argv += [] if perceptual else ['--perceptual-weight', '0']
    argv += ['--cuda-graph'] if cuda_graph else []  # steps 0-2 eager, then replays
    args = train_tok.get_args(argv)
    x = torch.rand(batch, 3, image_size, image_size, device='cuda') * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last)
    # eager; build() seeds, so a second build has the same initial weights
    run = train_tok.build(args, env)
    eager_losses = train_tok.train_step(x, run, args, 0)
    flops = count_flops(lambda: train_tok.train_step(x, run, args, 1))
    torch.cuda.synchronize()
    start = time.perf_counter()
    train_tok.train_step(x, run, args, 2)
    torch.cuda.synchronize()
    eager_s = time.perf_counter() - start
    result = {}
    if compile_model:
        run = None  # free the eager copy first
        torch.cuda.empty_cache()
        run = train_tok.build(args, env)
        train_tok.compile_step_modules(run.raw_model, run.raw_disc, run.lpips)
        before = compile_phases()
        start = time.perf_counter()
        losses = train_tok.train_step(x, run, args, 0)
        torch.cuda.synchronize()
        result['compile_s'] = time.perf_counter() - start - eager_s
        # where the compile time goes: seconds per phase of this row's compilation
        after = compile_phases()
        result['compile_phases'] = ' '.join(f"{k}={after[k] - before[k]:.0f}" for k in after)
        # the same function: first-step losses (before any update) of the compiled and the eager
        # step, in bf16
        for k in ('recon', 'lpips', 'per_sample_entropy', 'codebook_entropy'):
            result[f'rel_diff_{k}'] = (abs(losses[k].item() - eager_losses[k].item())
                                       / max(abs(eager_losses[k].item()), 1e-6))
    # steps 0-2 ran above; a list so that one_step() can advance it (the EMA decay reads the step)
    step = [2]

    def one_step():
        step[0] += 1
        train_tok.train_step(x, run, args, step[0])
    ms, mem = cuda_time(one_step, iters=10, warmup=3, name=name)
    # a CUDA graph's intermediates sit in its private pool: reserved, but not counted as allocated
    result['reserved_gib'] = torch.cuda.max_memory_reserved() / 2 ** 30
    result.update(img_per_s=batch / (ms / 1e3), peak_gib=mem, tflop_per_image=flops / batch / 1e12,
                  mfu=flops / (ms / 1e3) / peak if peak else float('nan'))
    run = None
    torch.cuda.empty_cache()
    return result


def bench_entropy(n, compile_mode=None):
    """Forward + backward of quantizer.entropy_terms on n random 18-d latents. Returns ms, peak
    GiB and the largest difference from the full 2^18-code table."""
    z = torch.randn(n, 18, device='cuda', requires_grad=True)
    # eager, the entropy loss is a few dozen small kernels and launch-bound (time flat in N);
    # torch.compile fuses them
    entropy_terms = torch.compile(quantizer.entropy_terms, mode=compile_mode) if compile_mode else \
        quantizer.entropy_terms

    def run():
        per_sample, codebook = entropy_terms(z, 0.01)
        (per_sample - codebook).backward()
    ms, mem = cuda_time(run, iters=20, warmup=5, name=f'entropy_{n}')
    # the same value as the materialised 2^18 table of the official code (exact logs, fp32)
    with torch.no_grad():
        codes = quantizer.indices_to_codes(torch.arange(2 ** 18, device='cuda'), 18)  # (2^18, 18)
        # softmax(-||z - c||^2 / t) = softmax(2 z.c / t): ||z||^2 and ||c||^2 = K are the same for
        # every code
        probs = torch.softmax(2 * z[:2048] @ codes.T / 0.01, dim=1)  # (2048, 2^18): ~2 GB
        table = (-(probs * probs.clamp_min(1e-30).log()).sum(1).mean(),
                 -(probs.mean(0) * probs.mean(0).clamp_min(1e-30).log()).sum())
        ours = quantizer.entropy_terms(z[:2048].detach(), 0.01)
        max_diff = max(abs(a.item() - b.item()) for a, b in zip(table, ours))
    return ms, mem, max_diff


def bench_encode(batch, compile_model):
    """Returns images/s, peak GiB, and the tokenizer, its encode / decode compiled when
    compile_model is set. Eager, most of the encoder's GPU time goes to GroupNorm, swish and layout
    copies, which torch.compile fuses around the convolutions."""
    model = tokenizer_module.Tokenizer.from_preset('imagenet256').cuda().eval()
    model = model.to(memory_format=torch.channels_last)
    if compile_model:
        # Dynamo's default, as train_gpt.py: fixed sizes for the first batch (64 here), and for a
        # later batch size (24 on the fly, 50 and 64 when decoding) one recompile with the batch
        # alone symbolic. Symbolic image sizes would slow the GroupNorm reductions
        model.encode = torch.compile(model.encode)
        model.decode = torch.compile(model.decode)
    x = (torch.rand(batch, 3, 256, 256,
                    device='cuda') * 2 - 1).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        with utils.autocast('cuda'):
            model.encode(x)
    ms, mem = cuda_time(run, name='encode_256_b64')
    return batch / (ms / 1e3), mem, model


def bench_gpt_step(batch, peak, compile_model, encode_with=None, cuda_graph=False):
    """One train_gpt.train_step of GPT-B on random tokens (encode_with: a tokenizer that encodes
    random images first, as on the fly; cuda_graph: the step replayed as train_gpt.py
    --cuda-graph does, the encoding outside it). Returns images/s, tokens/s, MFU and peak GiB."""
    model = gpt_module.GPT.from_preset('B', num_classes=1000).cuda()
    optimizer = model.configure_optimizers(0.05, 3e-4, (0.9, 0.95), 'cuda', capturable=cuda_graph)
    step_model = torch.compile(model) if compile_model else model
    graphed = train_gpt.GraphedStep(step_model, optimizer, 1.0) if cuda_graph else None
    T = model.config.block_size
    tokens = torch.randint(0, 2 ** 18, (batch, T), device='cuda')
    labels = torch.randint(0, 1000, (batch,), device='cuda')
    images = torch.rand(batch, 3, 256, 256,
                        device='cuda').contiguous(memory_format=torch.channels_last) * 2 - 1

    def run():
        toks = tokens
        # the official data path: the frozen tokenizer encodes every batch
        if encode_with is not None:
            with torch.no_grad(), utils.autocast('cuda'):
                toks = encode_with.encode(images)[1].flatten(1)
        if graphed is not None:
            graphed([(toks, labels)], 3e-4)
        else:
            train_gpt.train_step(step_model, optimizer, [(toks, labels)], 3e-4, 'cuda')
    name = f"gpt_B_{'onthefly' if encode_with is not None else 'step'}_b{batch}"
    # graph: 3 plain warm-ups (compiling), the recording, then replays
    ms, mem = cuda_time(run, iters=10, warmup=5 if compile_model or cuda_graph else 3,
                        name=name + ('_graph' if cuda_graph else ''))
    tokens_per_s = batch * T / (ms / 1e3)
    # as train_gpt.py logs it
    mfu = model.estimate_mfu(tokens_per_s, peak) if peak else float('nan')
    return batch / (ms / 1e3), tokens_per_s, mfu, mem


def bench_fid_features(tf32, weights, n=5000, batch_size=250):
    """fid.py's feature extraction on random 256px uint8 images ('tf' resize). Returns images/s and
    the pool features of one fixed batch, to compare TF32 on and off."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    model = fid.load_inception(weights, 'cuda', allow_unverified=True)  # random weights: speed only
    images = torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to('cuda')
    steps = math.ceil(n / batch_size)
    with torch.no_grad():
        # warm-up (cuDNN picks its kernels); .cpu() waits for the device
        pool = model(images)['pool'].cpu()
        start = time.perf_counter()
        for _ in range(steps):
            last = model(images)['pool']
        last.cpu()
        seconds = time.perf_counter() - start
    return {'images_per_s': steps * batch_size / seconds, 'pool': pool}


def bench_allreduce(numel, dtype):
    """One all-reduce of numel values, as DDP does with the gradients every step. Returns ms and the
    bus bandwidth in GB/s as nccl-tests count it (2 (n - 1) / n x bytes / time), to compare with the
    link's rated speed."""
    x = torch.ones(numel, device='cuda', dtype=dtype)
    ms, _ = cuda_time(lambda: torch.distributed.all_reduce(x))
    n = torch.distributed.get_world_size()
    return ms, 2 * (n - 1) / n * numel * x.element_size() / (ms / 1e3) / 1e9


def bench_attention():
    """The two attention choices of gpt.py, alone, in bf16: (1) the intra blocks' pairs at the B
    step, batch 64 ((64 x 256, 16, 2, 64), forward + backward): F.scaled_dot_product_attention vs.
    gpt.pair_attention, compiled as in the compiled training step (eager, its element-wise products
    are materialised, which only torch.compile fuses away); (2) one decoding position at batch 256
    with CFG (512 rows, 256 cache slots): cuDNN's with a boolean or an additive mask, over all
    256 slots and over the first 32 to 224, and gpt.pair_attention compiled.
    Returns {name: ms}."""
    results = {}
    q, k, v = (torch.randn(64 * 256, 16, 2, 64, device='cuda', dtype=torch.bfloat16,
                           requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    pair_attention = torch.compile(gpt_module.pair_attention)
    pair = {'pair_sdpa':
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad),
            'pair_written_out': lambda: pair_attention(q, k, v).backward(grad)}
    with utils.autocast('cuda'):
        for name, fn in pair.items():
            results[name] = cuda_time(fn)[0]
    q = torch.randn(512, 16, 1, 64, device='cuda', dtype=torch.bfloat16)
    k, v = (torch.randn(512, 16, 256, 64, device='cuda', dtype=torch.bfloat16) for _ in range(2))
    # the training step's written-out form on one query, compiled once for any number of slots
    written_out = torch.compile(gpt_module.pair_attention, dynamic=False)
    # reading only the first slots of the cache (those written so far, rounded up): does it pay?
    for slots in (32, 64, 96, 128, 224, 256):
        # (1, slots): the last two are stale
        visible = torch.arange(slots, device='cuda')[None] < slots - 2
        bias = torch.zeros(1, slots, device='cuda',
                           dtype=torch.bfloat16).masked_fill(~visible, float('-inf'))
        keys, values = k[:, :, :slots], v[:, :, :slots]
        for name, mask in (('bool', visible), ('additive', bias)):
            results[f'decode_{slots}_{name}'] = cuda_time(
                lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))[0]
        # the number of slots is symbolic, except for 256: a view of the whole cache is
        # specialised by Dynamo (one more compilation), and marking it dynamic is an error
        if slots < 256:
            for t, dim in ((keys, 2), (values, 2), (bias, 1)):
                torch._dynamo.mark_dynamic(t, dim)
        results[f'decode_{slots}_written_out'] = cuda_time(
            lambda: written_out(q, keys, values, bias))[0]
    return results


def bench_sampling(model, batch, variant, decoder=None):
    """GPT sampling of batch images (2 * batch rows with CFG) under bf16 autocast, the paper's B
    settings. variant: 'loop' (GPT.generate), 'graph' (GPT.generate_fast) or 'compiled'
    (generate_fast(compile=True)). Returns a dict: images_per_s (median of 3 runs after a first
    one, which compiles and captures), first_run_s, and for the graph variants ms_per_position
    (the replays alone) and, compiled, compile_s (first run minus a later one)."""
    labels = torch.arange(batch, device='cuda') % 1000
    settings = dict(cfg_scale=(1.9, 2.0), temperature=(1.0, 1.0), top_k=0, top_p=1.0,
                    generator=torch.Generator(device='cuda').manual_seed(0))
    compile_step = variant == 'compiled'

    def run():
        with utils.autocast('cuda'):
            if variant == 'loop':
                pre, post = model.generate(labels, **settings)
            else:
                pre, post = model.generate_fast(labels, compile=compile_step, **settings)
            if decoder is not None:
                indices = quantizer.merge_indices(pre, post).view(batch, 16, 16)
                # 256 images at 256px do not fit in one decode: chunks of 64
                for chunk in indices.split(64):
                    decoder.decode_indices(chunk)
    times = []
    # run 0 compiles and captures; the median of runs 1-3 is the speed
    for _ in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    later = statistics.median(times[1:])
    result = dict(images_per_s=batch / later, first_run_s=times[0])
    if compile_step:
        result['compile_s'] = times[0] - later
    if decoder is not None or variant == 'loop':
        return result
    # ms per position: generate_fast's graph alone, 3 x 50 replays (every position reads the whole
    # cache, so the cost is the same at each); one autocast region around warm-up, capture and
    # replays, as in sampling, so that the weights are cast to bf16 once and not inside the graph
    T = model.config.block_size
    with torch.no_grad(), utils.autocast('cuda'):
        step, _, _ = model.decode_step(labels, compile=compile_step, **settings)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as in GPT.generate_fast
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        profile(step, f"sample_B_b{batch}_{variant}_one_position")  # one position, not a whole run
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replays = 50  # x (1 warm-up + 3 timed): with the 3 positions above, stays inside the T
        assert 3 + 4 * replays <= T
        ms = cuda_time(lambda: [graph.replay() for _ in range(replays)], iters=3, warmup=1)[0]
    result['ms_per_position'] = ms / replays
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', default='tok,entropy,encode,gpt,sample,fid')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--sample-batches', default='50,256')
    parser.add_argument('--gpt-batches', default='24,64',
                        help="batches of the GPT step rows (the on-the-fly row "
                        "runs when 24 is one of them)")
    parser.add_argument('--profile', nargs='?', const='', default=None,
                        help="print the top GPU kernels of each row (or of the rows whose names "
                        "contain one of these comma-separated strings)")
    parser.add_argument('--out', default='out/bench.json')
    args = parser.parse_args()
    start = time.time()  # the whole run: set-up, every row, compiles included
    if args.profile is not None:
        PROFILE.update(names=args.profile.split(','),
                       path=os.path.splitext(args.out)[0] + '_profile.txt')
    env = utils.setup('cuda')
    rows = set(args.rows.split(','))
    results = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__,
               'date': time.strftime('%Y-%m-%d'), 'compile': args.compile}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if PROFILE and os.path.exists(PROFILE['path']):
        os.remove(PROFILE['path'])
    peak = utils.peak_flops('cuda')  # the MFU denominator; None on a GPU not in utils.PEAK_FLOPS
    results['bf16_matmul_tflops'] = matmul_peak() / 1e12
    results['datasheet_bf16_tflops'] = peak / 1e12 if peak else None
    print(f"bf16 peak: datasheet {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s (MFU is against "
          f"it), measured 8192^3 matmul {results['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)
    weights_dir = tempfile.mkdtemp()
    # random LPIPS and Inception weights: speed does not depend on the values
    write_random_lpips(weights_dir)
    write_random_inception(os.path.join(weights_dir, 'inception.pth'))

    def report(key, value, unit, **extra):
        results[key] = dict(value=value, unit=unit, **extra)
        results['seconds_so_far'] = time.time() - start  # all rows until this one, compiles included
        official = f"  official {OFFICIAL[key]:g}" if key in OFFICIAL else ''
        more = ' '.join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in extra.items())
        if env.is_main:  # (under torchrun for the allreduce row: one table)
            print(f"{key:24s} {value:10.3f} {unit:6s} {more}{official}", flush=True)
            # after every row: a run cut short keeps what it measured
            with open(args.out, 'w') as f:
                json.dump(results, f, indent=1)

    if 'allreduce' in rows:
        if not env.ddp:
            raise SystemExit("the allreduce row needs several GPUs: torchrun --nproc_per_node=2 bench.py "
                             "--rows allreduce")
        # the imagenet128 tokenizer's gradients (112.02M values): is the link what limits DDP's
        # scaling?
        for dtype in (torch.float32, torch.bfloat16):
            ms, bus = bench_allreduce(112_020_000, dtype)
            report(f"allreduce_tok_grads_{str(dtype).split('.')[-1]}", ms, 'ms', bus_gb_per_s=bus)

    if 'attention' in rows:
        for name, ms in bench_attention().items():
            report(f'attention_{name}', ms, 'ms')
    if 'entropy' in rows:
        for n in (2048, 8192):
            ms, mem, diff = bench_entropy(n)
            report(f'entropy_{n}_ms', ms, 'ms', peak_gib=mem, max_abs_diff_vs_table=diff)
            # mode 'default': 'reduce-overhead' (CUDA graphs) overwrites an output the backward
            # needs
            if args.compile:
                ms, mem, diff = bench_entropy(n, compile_mode='default')
                report(f'entropy_{n}_ms_compiled', ms, 'ms', peak_gib=mem,
                       max_abs_diff_vs_table=diff)
    encoder = None
    if 'encode' in rows or 'gpt' in rows or 'sample' in rows:
        ips, mem, encoder = bench_encode(64, args.compile)
        report('encode_256_b64', ips, 'img/s', peak_gib=mem)
    if 'gpt' in rows:
        batches = [int(b) for b in args.gpt_batches.split(',')]
        # '_graph': the step replayed as a CUDA graph (train_gpt.py --cuda-graph)
        for graph in (False, True):
            suffix = '_graph' if graph else ''
            for batch in batches:
                ips, tps, mfu, mem = bench_gpt_step(batch, peak, args.compile, cuda_graph=graph)
                report(f'gpt_B_step_b{batch}{suffix}', ips, 'img/s', tokens_per_s=tps, mfu=mfu,
                       peak_gib=mem)
            if 24 in batches:
                ips, tps, mfu, mem = bench_gpt_step(24, peak, args.compile, encode_with=encoder,
                                                    cuda_graph=graph)
                report(f'gpt_B_onthefly_b24{suffix}', ips, 'img/s', tokens_per_s=tps, mfu=mfu,
                       peak_gib=mem)
            torch.cuda.empty_cache()
    if 'sample' in rows or 'sampling' in rows:  # 'sampling': the GPT alone, no tokenizer decoding
        # the plain loop (batch 50), generate_fast's CUDA graph, and the graph of the compiled step
        model = gpt_module.GPT.from_preset('B', num_classes=1000).cuda().eval()
        for batch in [int(b) for b in args.sample_batches.split(',')]:
            variants = ('loop', 'graph') if batch == 50 else ('graph',)
            for variant in variants + (('compiled',) if args.compile else ()):
                result = bench_sampling(model, batch, variant)
                if variant == 'graph' and encoder is not None:  # tokens to images, as sample.py
                    result['with_decode'] = bench_sampling(model, batch, variant,
                                                           decoder=encoder)['images_per_s']
                name = f'sample_B_b{batch}' + ('' if variant == 'graph' else f'_{variant}')
                report(name, result.pop('images_per_s'), 'img/s', **result)
            model.free_caches()
            torch.cuda.empty_cache()
        if encoder is not None:
            z = (torch.randint(0, 2, (50, 18, 16, 16), device='cuda') * 2 - 1).float()
            with torch.no_grad(), utils.autocast('cuda'):
                ms, mem = cuda_time(lambda: encoder.decode(z), name='decode_b50')
            report('decode_b50', 50 / (ms / 1e3), 'img/s', peak_gib=mem)
    if any(r.startswith('tok') for r in rows):
        # (row, train_tok preset, image size, batch, LPIPS): the paper's two runs at batch 8 and
        # 32 per GPU; the 128px model at 64px (Tiny-ImageNet's size, 8x8 tokens) without LPIPS;
        # the 64px recipe's own step (the tin64 run: 16x16 tokens, no LPIPS, no D). '_graph':
        # the same step replayed as a CUDA graph (train_tok.py --cuda-graph)
        shape = None
        for name, preset, size, batch, perceptual in (
                ('tok_step_256_b8', 'imagenet256', 256, 8, True),
                ('tok_step_256_b8_graph', 'imagenet256', 256, 8, True),
                ('tok_step_256_b32', 'imagenet256', 256, 32, True),
                ('tok_step_256_b32_graph', 'imagenet256', 256, 32, True),
                ('tok_step_128_b8', 'imagenet128', 128, 8, True),
                ('tok_step_128_b8_graph', 'imagenet128', 128, 8, True),
                ('tok_step_64_b128', 'imagenet128', 64, 128, False),
                ('tok_step_64_b128_graph', 'imagenet128', 64, 128, False),
                ('tok_step_64_b128_tin64', 'tin64', 64, 128, False),
                ('tok_step_64_b128_tin64_graph', 'tin64', 64, 128, False)):
            if not any(name.startswith(r) for r in rows):
                continue
            if (preset, size, batch) != shape:
                # each row compiles for its own sizes, as a training run does, and its compile
                # time counts only its own graphs (D and LPIPS, compiled with Dynamo's default,
                # would recompile with symbolic sizes after a change). The '_graph' rows reuse
                # their plain row's compiled graphs
                shape = (preset, size, batch)
                torch._dynamo.reset()
            try:
                r = bench_tokenizer_step(name, preset, size, batch, env, weights_dir,
                                         args.compile, peak, perceptual,
                                         cuda_graph=name.endswith('_graph'))
                report(name, r.pop('img_per_s'), 'img/s', **r)
            except torch.cuda.OutOfMemoryError:
                print(f"{name}: out of memory")
            except RuntimeError as e:  # e.g. a capture that fails: the other rows still run
                print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
    if 'fid' in rows:
        weights = os.path.join(weights_dir, 'inception.pth')
        on, off = bench_fid_features(True, weights), bench_fid_features(False, weights)
        # how far TF32 moves the features, relative to their largest value
        diff = ((on['pool'] - off['pool']).abs().max() / off['pool'].abs().max()).item()
        report('fid_features_tf32', on['images_per_s'], 'img/s', fp32_img_per_s=off['images_per_s'],
               max_rel_feature_diff=diff)
    utils.print0(f"wrote {args.out}; all rows in {time.time() - start:.0f} s")
    utils.cleanup()


if __name__ == '__main__':
    main()
