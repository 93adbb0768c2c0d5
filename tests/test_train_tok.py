"""train_tok.py on CPU: the tiny preset learns, resume == an uninterrupted run, DDP (gloo, 2
processes) keeps the generator identical on both ranks, another config is refused, so is a rerun
onto a run without --resume (and --overwrite starts again), the global batch splits over the
processes, a corrupt image is skipped and counted, and the
evaluation's PSNR / codebook usage / streamed rFID agree with slow direct computations. The LPIPS
and Inception weight files are random: the numbers here test the code, they are not results."""
import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import fid
from conftest import (ROOT, codebook_usage, free_port, read_log, write_random_inception,
                      write_random_lpips)
import tokenizer
import train_tok
import utils
from data import build_dataset
from tokenizer import Tokenizer

# small and fast: 32px is the smallest size the PatchGAN takes (three stride-2 convs, then two 4x4
# convs)
FAST = ['--preset', 'tiny', '--device', 'cpu', '--batch-size', '4', '--eval-images', '8',
        '--log-every', '1']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('tiny') / 'run')
    return out, train_tok.main(FAST + ['--batch-size', '8', '--max-steps', '20', '--log-every',
                                       '5', '--out', out])


def test_tiny_learns_and_checkpoint_loads(tiny_run):
    out, run = tiny_run
    rows = read_log(out)
    train_rows = [r for r in rows if r['recon']]
    eval_rows = [r for r in rows if r['psnr']]
    recon = [float(r['recon']) for r in train_rows]
    # the L1 reconstruction loss falls
    assert len(recon) == 4 and recon[-1] < 0.85 * recon[0], recon
    assert [int(r['step']) for r in eval_rows] == [0, 20]  # before training and at the end
    assert float(eval_rows[-1]['psnr']) > float(eval_rows[0]['psnr']) + 1, eval_rows
    assert os.path.exists(os.path.join(out, 'recon_step20.png'))
    # the checkpoint feeds the next stage: Tokenizer.from_checkpoint takes its EMA weights and
    # config
    ckpt = utils.load_checkpoint(os.path.join(out, 'ckpt.pt'), expect_kind='tokenizer')
    torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)  # tensors and plain types only
    assert ckpt['step'] == 20 and ckpt['epoch'] == 0 and ckpt['batch_in_epoch'] == 20
    loaded = Tokenizer.from_checkpoint(os.path.join(out, 'ckpt.pt'))
    for a, b in zip(loaded.state_dict().values(), run.ema.state_dict().values()):
        assert torch.equal(a, b)
    # the EMA differs from the raw weights (it averages them) but has moved away from the
    # initialisation
    init = Tokenizer.from_preset('tiny')
    w_ema, w_raw = run.ema.decoder.conv_out.weight, run.raw_model.decoder.conv_out.weight
    assert not torch.equal(w_ema, w_raw) and not torch.equal(w_ema, init.decoder.conv_out.weight)


def test_resume_equals_uninterrupted(tmp_path):
    straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    train_tok.main(FAST + ['--max-steps', '4', '--out', straight])
    train_tok.main(FAST + ['--max-steps', '2', '--out', resumed])
    train_tok.main(FAST + ['--max-steps', '4', '--out', resumed, '--resume'])
    a = utils.load_checkpoint(os.path.join(straight, 'ckpt.pt'))
    b = utils.load_checkpoint(os.path.join(resumed, 'ckpt.pt'))
    assert a['step'] == b['step'] == 4
    for part in ('model', 'ema', 'disc', 'lecam'):
        for key in a[part]:
            assert torch.allclose(a[part][key].float(), b[part][key].float(), rtol=0, atol=1e-6), (part, key)
    assert b['lecam']['ema_real'] != 0  # the LeCAM EMAs are in the checkpoint, not restarted at 0
    for opt in ('opt_g', 'opt_d'):
        for index, state in a[opt]['state'].items():
            assert torch.allclose(state['exp_avg_sq'], b[opt]['state'][index]['exp_avg_sq'], rtol=0, atol=1e-6)
    # the same training rows in the log (the resumed run appends to it)
    rows_a = [r for r in read_log(straight) if r['recon']]
    rows_b = [r for r in read_log(resumed) if r['recon']]
    assert [r['step'] for r in rows_b] == ['1', '2', '3', '4']
    assert np.allclose([float(r['recon']) for r in rows_a], [float(r['recon']) for r in rows_b], atol=1e-6)


def test_sigterm_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM during step 3 of 6: the step finishes, a checkpoint of step 3 is written without an
    evaluation, the run exits with 143; --resume ends where an uninterrupted run ends."""
    straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
    train_tok.main(FAST + ['--max-steps', '6', '--out', straight])
    real_step, calls = train_tok.train_step, []

    def preempted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train_tok, 'train_step', preempted_step)
    with pytest.raises(SystemExit) as exit_status:
        train_tok.main(FAST + ['--max-steps', '6', '--out', stopped])
    monkeypatch.undo()
    assert exit_status.value.code == 128 + signal.SIGTERM and len(calls) == 3
    assert utils.load_checkpoint(os.path.join(stopped, 'ckpt.pt'))['step'] == 3
    assert [int(r['step']) for r in read_log(stopped) if r['psnr']] == [0]  # no evaluation
    train_tok.main(FAST + ['--max-steps', '6', '--out', stopped, '--resume'])
    a, b = (utils.load_checkpoint(os.path.join(run, 'ckpt.pt')) for run in (straight, stopped))
    assert a['step'] == b['step'] == 6
    for part in ('model', 'ema', 'disc'):
        for key in a[part]:  # as test_resume_equals_uninterrupted
            assert torch.allclose(a[part][key].float(), b[part][key].float(), rtol=0, atol=1e-6)


def test_ctrl_c_in_a_terminal_with_loader_workers_leaves_a_checkpoint(tmp_path):
    """Ctrl-C in a terminal signals the whole process group, DataLoader workers included: they
    ignore it, and the trainer stops after its step with a checkpoint and exit status 130."""
    out = tmp_path / 'run'
    command = [sys.executable, 'train_tok.py'] + FAST + ['--max-steps', '100000', '--num-workers',
                                                         '2', '--out', str(out)]
    # a process group of its own, as a shell gives a command it runs
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:  # until training has begun
            if (out / 'log.csv').exists() and len(read_log(str(out))) >= 3:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[0][-2000:]
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGINT, output[-2000:]
    step = utils.load_checkpoint(str(out / 'ckpt.pt'))['step']
    assert f'stopped by SIGINT at step {step}' in output and step >= 2
    # the workers ignored it: forked, they would otherwise run the trainer's handler too (spawned,
    # die of a KeyboardInterrupt)
    assert output.count('SIGINT: stopping') == 1, output[-2000:]


def test_resume_refuses_another_config(tiny_run, tmp_path):
    out, _ = tiny_run
    same = FAST + ['--batch-size', '8', '--max-steps', '21', '--out', out, '--resume']
    with pytest.raises(ValueError, match=r"another config(.|\n)*image_size"):
        train_tok.main(same + ['--image-size', '64'])
    with pytest.raises(ValueError, match=r"another config(.|\n)*gan_weight"):
        train_tok.main(same + ['--gan-weight', '0.5'])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train_tok.main(FAST + ['--max-steps', '2', '--out', str(tmp_path / 'nothing'), '--resume'])


def test_rerun_without_resume_refuses_and_overwrite_starts_again(tiny_run, tmp_path):
    out, _ = tiny_run
    before = [open(os.path.join(out, name), 'rb').read() for name in ('log.csv', 'ckpt.pt')]
    with pytest.raises(FileExistsError, match=r'a run already.*--resume.*new --out.*--overwrite'):
        train_tok.main(FAST + ['--max-steps', '2', '--ckpt-every', '2', '--out', out])
    assert [open(os.path.join(out, name), 'rb').read() for name in ('log.csv', 'ckpt.pt')] \
        == before
    # --overwrite starts again; the temporary file of a kill during a checkpoint write is removed
    run = str(tmp_path / 'run')
    train_tok.main(FAST + ['--max-steps', '2', '--out', run])
    open(os.path.join(run, 'ckpt.pt.tmp4242'), 'wb').write(b'PK partial')
    train_tok.main(FAST + ['--max-steps', '1', '--out', run, '--overwrite'])
    assert sorted(f for f in os.listdir(run) if not f.endswith('.png')) == ['ckpt.pt', 'log.csv']
    assert [r['step'] for r in read_log(run)] == ['0', '1', '1']  # eval, train, eval: no old rows
    assert utils.load_checkpoint(os.path.join(run, 'ckpt.pt'))['step'] == 1


def test_out_of_memory_names_the_flag_to_change(tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB")
    monkeypatch.setattr(train_tok, 'train_step', no_memory)
    with pytest.raises(SystemExit, match=r'out of cpu memory at step 0 with 16 images per process '
                                         r'\(--batch-size 16 .*smaller --batch-size'):
        train_tok.main(['--preset', 'tiny', '--device', 'cpu', '--out', str(tmp_path / 'a')])


def test_global_batch_must_split_over_the_processes(monkeypatch):
    three = utils.Env(torch.device('cpu'), 'cpu', world_size=3)
    monkeypatch.setattr(utils, 'setup', lambda device: three)
    with pytest.raises(ValueError, match='--batch-size 8 .global. does not split evenly over 3 '
                                         'processes: pass a multiple of 3'):
        train_tok.main(FAST + ['--batch-size', '8'])


def write_random_lpips_weights(folder):
    """Random LPIPS weight files in both standard layouts (conftest.write_random_lpips) -> the flags
    that load them."""
    vgg, lin = write_random_lpips(str(folder))
    return ['--perceptual-weight', '1', '--vgg-weights', vgg, '--lpips-weights', lin]


def _ddp_worker(rank, world_size, port, out, lpips_flags):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run = train_tok.main(FAST + ['--batch-size', '8', '--max-steps', '3', '--out', out]
                         + lpips_flags)
    # noqa: E731
    flat = lambda module: torch.cat([p.detach().flatten() for p in module.parameters()])
    torch.save({'model': flat(run.raw_model), 'ema': flat(run.ema), 'disc': flat(run.raw_disc),
                'checksum': utils.weights_checksum(run.raw_model)},
               os.path.join(out, f'rank{rank}.pt'))
    # skip interpreter teardown: with torch 2.13 + gloo it sometimes aborts (SIGABRT) after the work
    os._exit(0)


def test_ddp_two_processes_keep_generator_identical(tmp_path):
    """gloo, 2 processes, with the LPIPS term on (random weights; rank 0 loads them first, the other
    waits)."""
    port = free_port()
    out = str(tmp_path / 'ddp')
    torch.manual_seed(0)
    mp.spawn(_ddp_worker, args=(2, port, out, write_random_lpips_weights(tmp_path)),
             nprocs=2, join=True)
    rank0, rank1 = (torch.load(os.path.join(out, f'rank{r}.pt')) for r in (0, 1))
    for part in ('model', 'ema', 'disc'):
        assert torch.equal(rank0[part], rank1[part]), part
    # the checksum each rank prints at the end: equal here, and it sees a change in a single weight
    assert rank0['checksum'] == rank1['checksum']
    model = Tokenizer.from_preset('tiny')
    model.load_state_dict(utils.load_checkpoint(os.path.join(out, 'ckpt.pt'))['model'])
    assert utils.weights_checksum(model) == rank0['checksum']
    with torch.no_grad():
        model.decoder.conv_out.bias[0] += 1e-6
    assert utils.weights_checksum(model) != rank0['checksum']
    init = torch.cat([p.flatten() for p in Tokenizer.from_preset('tiny').parameters()])
    assert not torch.allclose(rank0['model'], init)  # it trained
    assert utils.load_checkpoint(os.path.join(out, 'ckpt.pt'))['step'] == 3
    rows = [r for r in read_log(out) if r['recon']]
    assert len(rows) == 3 and all(float(r['lpips']) > 0 for r in rows)
    # the 2-process checkpoint (global --batch-size 8 = 2 x 4 images) resumes in one process at the
    # same global batch (1 x 8), not another
    lpips_flags = write_random_lpips_weights(tmp_path)
    with pytest.raises(ValueError, match=r"another config:\n  batch_size: checkpoint 8 vs. now 4"):
        train_tok.main(FAST + ['--max-steps', '4', '--out', out, '--resume'] + lpips_flags)
    run = train_tok.main(FAST + ['--batch-size', '8', '--max-steps', '4', '--out', out,
                                 '--resume'] + lpips_flags)
    assert utils.load_checkpoint(os.path.join(out, 'ckpt.pt'))['step'] == 4
    weights = torch.cat([p.detach().flatten() for p in run.raw_model.parameters()])
    assert not torch.equal(weights, rank0['model'])


def test_corrupt_image_is_skipped_and_counted(tmp_path, capfd):
    root = tmp_path / 'images'
    rng = np.random.default_rng(0)
    for c in ('cat', 'dog'):
        (root / c).mkdir(parents=True)
        for i in range(8 if c == 'cat' else 7):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3),
                                         dtype=np.uint8)).save(root / c / f'{i}.png')
    (root / 'dog' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 10)
    out = str(tmp_path / 'run')
    # 16 files, batch 4, 4 steps: one epoch, so every file (the broken one too) is read exactly once
    run = train_tok.main(FAST + ['--data', str(root), '--max-steps', '4', '--out', out])
    assert run.num_bad == 1
    # the last training row (the last row is the evaluation)
    assert read_log(out)[-2]['bad_images'] == '1'
    assert 'broken.png' in capfd.readouterr().err


def test_evaluate_matches_direct_computation(tmp_path, monkeypatch):
    """PSNR per image on uint8, codebook usage over the whole set, and the rFID statistics streamed
    as feature moments, against the plain formulas and fid.py's own feature extraction and
    statistics on the same images. Random weights everywhere: a check of the code, not a metric."""

    # 75px network input instead of 299: the same code path, 16x cheaper
    class SmallInception(fid.InceptionV3):
        def forward(self, images, resize='tf', size=75):
            return super().forward(images, resize, size)

    monkeypatch.setattr(fid, 'InceptionV3', SmallInception)  # what fid.load_inception builds
    torch.manual_seed(0)
    # O(1) features, so the comparisons below can fail
    weights = write_random_inception(tmp_path / fid.WEIGHTS_NAME)
    # the statistics handed to the Frechet distance (its 2048x2048 sqrtm is fid.py's, tested there)
    received = []
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: received.extend(stats) or 1.5)
    args = train_tok.get_args(FAST + ['--eval-images', '6', '--inception-weights', str(weights),
                                      '--out', str(tmp_path)])
    env = utils.setup('cpu')
    model = Tokenizer.from_preset('tiny').eval()
    val_set = build_dataset('synthetic', 32, train=False)
    metrics = train_tok.evaluate(model, val_set, args, env, step=7)

    x = torch.stack([val_set[i][0] for i in range(6)])
    with torch.no_grad():
        x_rec, indices, _ = model(x)
    x_rec = x_rec.clamp(-1, 1)
    real = ((x + 1) * 127.5).to(torch.uint8).numpy().astype(np.float64)
    fake = ((x_rec + 1) * 127.5).to(torch.uint8).numpy().astype(np.float64)
    psnr = [10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)) for a, b in zip(real, fake)]
    assert metrics['psnr'] == pytest.approx(np.mean(psnr), rel=1e-6)
    assert metrics['codebook_usage'] == codebook_usage(indices, 18)
    with torch.no_grad():
        # (6, 18, h, w): the share of +1 of bit k is that of z_k > 0 over all tokens
        z = model.encoder(x)
    shares = [(z[:, k] > 0).double().mean().item() for k in range(18)]
    assert [metrics[f'bit{k}'] for k in range(18)] == pytest.approx(shares, abs=1e-12)
    assert metrics['dead_bits'] == sum(share in (0, 1) for share in shares)
    assert metrics['rfid'] == 1.5 and len(received) == 4
    inception = fid.load_inception(str(weights))
    # as conftest.rfid: (x + 1) / 2, bilinear
    for images, mu, sigma in ((x, *received[:2]), (x_rec, *received[2:])):
        pool = fid.extract_features(inception, [(images + 1) / 2], resize='bilinear')['pool']
        expected_mu, expected_sigma = fid.compute_statistics(pool)
        # features far above the tolerances: a wrong statistic fails
        assert np.abs(expected_mu).max() > 0.01
        assert np.allclose(mu, expected_mu, rtol=1e-4, atol=1e-6)
        assert np.allclose(sigma, expected_sigma, rtol=1e-3, atol=1e-6)
    assert os.path.exists(tmp_path / 'recon_step7.png')


def test_eval_only_accepts_ours_and_official_checkpoints(tiny_run, tmp_path):
    out, run = tiny_run
    ours = train_tok.main(FAST + ['--eval-only', os.path.join(out, 'ckpt.pt'), '--out',
                                  str(tmp_path / 'a')])
    assert 0 < ours['psnr'] < 100 and 0 < ours['codebook_usage'] <= 1
    # the same EMA weights in the official Lightning layout (raw weights under their names, EMA as
    # LitEma keys) raw: deliberately wrong
    state = {k: torch.zeros_like(v) for k, v in run.ema.state_dict().items()}
    state.update({'model_ema.' + k.replace('.', ''): v for k, v in run.ema.state_dict().items()})
    state.update({'model_ema.decay': torch.tensor(0.999),
                  'model_ema.num_updates': torch.tensor(20)})
    torch.save({'state_dict': state}, tmp_path / 'official.ckpt')
    theirs = train_tok.main(FAST + ['--eval-only', f"open-magvit2:{tmp_path / 'official.ckpt'}",
                                    '--out', str(tmp_path / 'b')])
    # EMA weights were picked, not the zeros
    assert theirs['psnr'] == pytest.approx(ours['psnr'], abs=1e-6)


def test_schedule_warmup_and_cooldown(tmp_path):
    """--warmup-steps and --cooldown shape the logged lr exactly; --gan-weight 0 never touches D."""
    out = str(tmp_path / 'run')
    run = train_tok.main(FAST + ['--max-steps', '8', '--lr', '1e-3', '--warmup-steps', '4',
                                 '--cooldown', '0.5', '--gan-weight', '0', '--out', out])
    rows = [r for r in read_log(out) if r['recon']]
    # the row of step s + 1 logs the lr used for step s
    expected = [1e-3 * min(1, (s + 1) / 4) * min(1, (1 - s / 8) / 0.5) for s in range(8)]
    assert [float(r['lr']) for r in rows] == pytest.approx(expected, rel=1e-9)
    assert all(float(r['d_loss']) == 0 for r in rows)
    # build() seeds: same init
    init = train_tok.build(train_tok.get_args(FAST), utils.setup('cpu')).raw_disc
    for a, b in zip(init.state_dict().values(), run.raw_disc.state_dict().values()):
        assert torch.equal(a, b)  # no D step was taken


def test_max_minutes_stops_in_time_with_checkpoint(tmp_path):
    """A wall-clock budget (compile and evaluations included) ends the run early, with a checkpoint
    and a last evaluation on every held-out image."""
    out = str(tmp_path / 'run')
    t0 = time.time()
    # 50 of the 200 held-out images per evaluation: the reserve for the last one (every image) is
    # then 6x the first evaluation's time, not 37x, which on a slow machine would take the budget
    train_tok.main(FAST + ['--max-steps', '100000', '--max-minutes', '0.25', '--cooldown', '0.3',
                           '--eval-images', '50', '--out', out])
    assert time.time() - t0 < 0.25 * 60 + 5
    ckpt = utils.load_checkpoint(os.path.join(out, 'ckpt.pt'), expect_kind='tokenizer')
    assert 0 < ckpt['step'] < 100000
    rows = read_log(out)
    assert rows[-1]['psnr'] and int(rows[-1]['step']) == ckpt['step']
    assert float(rows[-1]['minutes']) < 0.25
    lrs = [float(r['lr']) for r in rows if r['recon']]
    assert lrs[-1] < 0.5 * lrs[0]  # the cooldown ran, planned from the measured step rate


def test_max_minutes_reserve_follows_a_warm_evaluation(tmp_path, monkeypatch):
    """The reserve for the last evaluation comes from the latest evaluation's time, not only from
    the first one, which also pays for one-off warm-ups: a slow first evaluation must not leave
    most of the budget unused."""
    evaluate, calls = train_tok.evaluate, []

    def slow_first(*args, **kwargs):  # 0.3 s more on the first call: a reserve of >= 12.6 s from it
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train_tok, 'evaluate', slow_first)
    out, budget_min = str(tmp_path / 'run'), 0.45  # 27 s
    t0 = time.time()
    # an evaluation every 2 steps: the first warm one comes before the first reserve (>= 12.6 s of
    # 27, with a few seconds of start-up on a slow machine) has stopped the run
    train_tok.main(FAST + ['--max-steps', '100000', '--max-minutes', str(budget_min),
                           '--eval-every', '2', '--out', out])
    assert time.time() - t0 < budget_min * 60 + 5
    rows = read_log(out)
    # the first evaluation's reserve alone would stop the run before 27 - 12.6 = 14.4 s (0.53 of
    # the budget); the warm ones (8 images, ~0.1 s: a reserve of ~5 s) let it run to ~22 s
    assert 0.65 * budget_min < float(rows[-1]['minutes']) < budget_min
    assert rows[-1]['psnr'] and len(calls) > 3


@pytest.mark.parametrize('channels_last', [False, True])
def test_compile_blocks_same_function(channels_last):
    """compile_blocks captures the same forward and backward (graph capture with the aot_eager
    backend: the Inductor kernels themselves are compared with the eager step by bench.py on the
    GPU). channels_last: the compiled norms take GroupNorm's written-out NHWC form, eager ones
    F.group_norm; in float64, so that the two agree to far below fp32's rounding."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    dtype = torch.float64 if channels_last else torch.float32
    eager = Tokenizer.from_preset('tiny').to(dtype).to(memory_format=layout)
    compiled = tokenizer.compile_blocks(copy.deepcopy(eager), backend='aot_eager')
    x = (torch.rand(2, 3, 32, 32, dtype=dtype) * 2 - 1).contiguous(memory_format=layout)
    outputs = []
    for model in (eager, compiled):
        x_rec, indices, losses = model(x)
        (x_rec.square().mean() + losses['entropy_loss'] + losses['commitment_loss']).backward()
        outputs.append((x_rec, indices, losses['entropy_loss'], model.encoder.conv_in.weight.grad))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(*outputs):
        assert torch.allclose(a.double(), b.double(), **tol)
    # fixed sizes (compile_blocks): each new batch and resolution compiles graphs of its own
    from torch._dynamo.utils import counters
    graphs = []
    for shape in ((3, 3, 48, 48), (4, 3, 40, 40)):
        graphs.append(counters['stats']['unique_graphs'])
        x = (torch.rand(*shape, dtype=dtype) * 2 - 1).contiguous(memory_format=layout)
        (ref, ref_indices, _), (out, indices, _) = eager(x), compiled(x)
        assert torch.equal(indices, ref_indices) and torch.allclose(out, ref, **tol)
    assert counters['stats']['unique_graphs'] > graphs[1] > graphs[0]
    # the heads (norm -> swish -> conv) are compiled too, and a copy of the model runs its own
    assert compiled.decoder.head.__func__ is not tokenizer.Decoder.head
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        twin.decoder.conv_out.bias.add_(1.0)
        # the bias inside the conv's sum against 1 added after it: a few fp32 roundings of values
        # near 1, far from the 1.0 that a shared graph or weight would miss
        assert torch.allclose(twin(x)[0], compiled(x)[0] + 1.0, rtol=0, atol=1e-5)


def test_compile_blocks_graphs_under_autocast():
    """Under bf16 autocast, with channels_last (as train_tok.py --compile runs), every activation
    that enters a compiled block is bf16: AdaptiveGroupNorm returns its input's dtype, not
    GroupNorm's fp32. So the decoder's ResBlocks reuse the graphs of the encoder's blocks of the
    same shape, and the Upsamplers (eager) compile none. The tiny preset captures 11 graphs: 3
    encoder ResBlock shapes (the middle block shares the last level's), the LFQ, the encoder's
    head, 3 AdaptiveGroupNorms, 2 decoder ResBlock shapes of their own (64 channels at 16px, the
    64 -> 32 shortcut) and the decoder's head. With fp32 decoder blocks and compiled Upsamplers it
    was 14."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    entries = []

    def record(gm, example_inputs):  # the first tensor input of a block's graph is its activation
        entries.append(next(t for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward
    model = Tokenizer.from_preset('tiny').to(memory_format=torch.channels_last)
    tokenizer.compile_blocks(model, backend=record)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        x_rec, _, losses = model(x)
    assert len(entries) == 11
    activations = [t for t in entries if t.dim() == 4]
    assert activations and all(t.dtype == torch.bfloat16 for t in activations)
    # fp32 input (no autocast): fp32 throughout, the same 11 shapes
    entries.clear()
    model(x)
    assert len(entries) == 11 and all(t.dtype == torch.float32 for t in entries if t.dim() == 4)


def test_compile_blocks_options(monkeypatch):
    """Every block and head compiles with fixed sizes; with Inductor (the default backend) also
    with its channels_last layout forced and one configuration per element-wise kernel, options
    that another backend would not accept."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, **kw: calls.append(kw))
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: calls.append(kw) or fn)
    tokenizer.compile_blocks(Tokenizer.from_preset('tiny'))
    # ResBlocks, AdaptiveGroupNorms, the LFQ and the two heads
    assert len(calls) > 10
    assert all(kw == {'dynamic': False, 'options': {'force_layout_optimization': True,
                                                    'triton.autotune_pointwise': False}}
               for kw in calls)
    calls.clear()
    tokenizer.compile_blocks(Tokenizer.from_preset('tiny'), backend='aot_eager')
    assert calls and all(kw == {'dynamic': False, 'backend': 'aot_eager'} for kw in calls)


class StopBeforeStep(Exception):
    pass


def test_init_from_copies_the_weights_with_fresh_optimizers(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    ckpt = utils.load_checkpoint(os.path.join(out, 'ckpt.pt'), expect_kind='tokenizer')
    first_steps = []

    def first_step(x, run, args, step):  # what step 0 starts from, then stop
        first_steps.append((run, step))
        raise StopBeforeStep

    monkeypatch.setattr(train_tok, 'train_step', first_step)
    with pytest.raises(StopBeforeStep):
        train_tok.main(FAST + ['--init-from', os.path.join(out, 'ckpt.pt'),
                               '--out', str(tmp_path / 'a')])
    run, step = first_steps.pop()
    assert step == 0 and not run.opt_g.state and not run.opt_d.state  # fresh Adam states
    for module, key in ((run.raw_model, 'model'), (run.ema, 'ema'), (run.raw_disc, 'disc'),
                        (run.lecam, 'lecam')):
        assert all(torch.equal(v, ckpt[key][k]) for k, v in module.state_dict().items()), key
    # a released file: raw weights to the generator, EMA weights to the EMA, a fresh discriminator
    state = {k: v + 1 for k, v in ckpt['model'].items()}
    state.update({'model_ema.' + k.replace('.', ''): v for k, v in ckpt['ema'].items()})
    torch.save({'state_dict': state}, tmp_path / 'official.ckpt')
    with pytest.raises(StopBeforeStep):
        train_tok.main(FAST + ['--init-from', f"open-magvit2:{tmp_path / 'official.ckpt'}",
                               '--out', str(tmp_path / 'b')])
    run, _ = first_steps.pop()
    assert all(torch.equal(v, state[k]) for k, v in run.raw_model.state_dict().items())
    assert all(torch.equal(v, ckpt['ema'][k]) for k, v in run.ema.state_dict().items())
    assert not torch.equal(run.raw_disc.state_dict()['main.0.weight'],
                           ckpt['disc']['main.0.weight'])
    # another architecture (16-bit codes for the 18-bit preset): refused, naming the field
    other = Tokenizer.from_preset('tiny', num_bits=16)
    utils.save_checkpoint(tmp_path / 'tok16.pt', {'kind': 'tokenizer', 'model': other.state_dict(),
                                                  'config': vars(other.config)})
    with pytest.raises(ValueError, match='num_bits: checkpoint 16 vs. now 18'):
        train_tok.main(FAST + ['--init-from', str(tmp_path / 'tok16.pt'),
                               '--out', str(tmp_path / 'c')])


def test_cuda_graph_flag_names_what_it_needs():
    args = train_tok.get_args(['--preset', 'tiny', '--device', 'cpu', '--cuda-graph'])
    with pytest.raises(SystemExit, match='--cuda-graph needs one CUDA GPU'):
        train_tok.build(args, utils.setup('cpu'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_update_equals_the_plain_one(tmp_path):
    """--cuda-graph: three eager warm-up steps, then replays, and a short batch falls back to the
    plain step; losses and weights follow the plain run's (the same kernels, fused Adam both)."""
    weights = str(tmp_path)
    write_random_lpips(weights)
    runs = []
    for graph in (False, True):
        args = train_tok.get_args(
            ['--preset', 'tiny', '--device', 'cuda', '--batch-size', '4', '--lr', '1e-3',
             '--vgg-weights', os.path.join(weights, 'vgg16.pth'),
             '--lpips-weights', os.path.join(weights, 'lin.pth')]
            + (['--cuda-graph'] if graph else []))
        run = train_tok.build(args, utils.setup('cuda'))
        g = torch.Generator(device='cuda').manual_seed(0)
        losses = []
        for step in range(8):  # steps 0-2 warm up, 3 records and replays, 6 is a short batch
            train_tok.set_lr(run, 1e-3 * (0.9 ** step))  # a schedule the graph must follow
            x = torch.rand(2 if step == 6 else 4, 3, 32, 32, device='cuda', generator=g) * 2 - 1
            losses.append(train_tok.train_step(x, run, args, step))
        runs.append((losses, run))
    (plain, t_plain), (graphed, t_graph) = runs
    assert t_graph.graphed.graph is not None
    for a, b in zip(plain, graphed):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for p, q in zip(t_plain.ema.parameters(), t_graph.ema.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
