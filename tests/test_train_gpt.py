"""train_gpt.py: the LR schedule against a piecewise-linear reference, extraction == on-the-fly
encoding (same crops, and the same training run from either), the loss falls, resume == an
uninterrupted run, DDP (gloo, 2 processes) keeps the ranks identical, clear errors for a bad
checkpoint path and a tokenizer / GPT mismatch; resume refuses other inputs (tokenizer, data, its
weights), a rerun onto a run needs --resume; the checkpoint records the tokenizer. The held-out loss
equals a direct computation (one process and two); extract_codes.py refuses a folder made from other
weights or data and skips unreadable images; --init-from copies weights."""
import io
import os
import shutil
import signal
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import data
from conftest import free_port, read_log, save_tokenizer
import extract_codes
import train_gpt
from gpt import GPT
from tokenizer import Tokenizer
from utils import load_checkpoint, save_checkpoint, weights_checksum


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """tok.pt, and 64 synthetic images of 20x24 pixels in an .npz, so that the 16px random crops
    really vary."""
    root = tmp_path_factory.mktemp('train_gpt')
    shapes = data.SyntheticShapes(n=64, size=24, num_classes=10)
    images = np.stack([np.asarray(shapes.load(i))[2:22] for i in range(64)])  # (64, 20, 24, 3)
    np.savez(root / 'shapes.npz', images=images, labels=shapes.labels)
    held_out = data.SyntheticShapes(n=9, size=24, num_classes=10, seed=5)  # 9: uneven rank shards
    val_images = np.stack([np.asarray(held_out.load(i))[2:22] for i in range(9)])
    np.savez(root / 'val.npz', images=val_images, labels=held_out.labels)
    return {'tokenizer': save_tokenizer(root / 'tok.pt'), 'data': str(root / 'shapes.npz'),
            'root': root, 'val': str(root / 'val.npz')}


def argv(files, out, *extra):
    """A tiny CPU run: 64 images, 16px (4x4 tokens), global batch 16 -> 4 steps per epoch, peak lr
    1e-3."""
    return ['--preset', 'tiny', '--device', 'cpu', '--tokenizer', files['tokenizer'], '--data',
            files['data'],
            '--image-size', '16', '--batch-size', '16', '--lr', '0.048', '--epochs', '2',
            '--warmup-epochs', '0.5',
            '--eval-every', '100', '--log-every', '1', '--sample-classes', '0,1',
            '--num-workers', '0',
            '--out', str(out), *extra]


def extract(files, codes, *extra, data_spec=None):
    """extract_codes.py with the settings of argv: 16px, batch 16, CPU."""
    return extract_codes.main(['--device', 'cpu', '--tokenizer', files['tokenizer'],
                               '--data', data_spec or files['data'], '--image-size', '16',
                               '--batch-size', '16', '--num-workers', '0', '--codes', str(codes),
                               *extra])


def held_out_rows(out):
    return [r for r in read_log(out) if r['val_ce_pre']]


def direct_held_out_ce(files, model_state):
    """Mean CE of the pre and post sub-tokens of the held-out centre crops, from GPT.forward."""
    tokenizer = Tokenizer.from_checkpoint(files['tokenizer']).eval()
    images = data.build_dataset(files['val'], 16, train=False)
    x = torch.stack([images[i][0] for i in range(len(images))])
    labels = torch.tensor([images[i][1] for i in range(len(images))])
    model = GPT.from_preset('tiny', num_classes=10, block_size=16)
    model.load_state_dict(model_state)
    model.eval()
    with torch.no_grad():
        tokens = tokenizer.encode(x)[1].flatten(1)  # (9, 16)
        pre, post = tokens & 63, tokens >> 6  # the low 6 bits (channels 0..5) and the high 12
        logits_pre, logits_post, _ = model(pre, post, labels)
    return (F.cross_entropy(logits_pre.flatten(0, 1), pre.flatten()).item(),
            F.cross_entropy(logits_post.flatten(0, 1), post.flatten()).item())


def test_lr_schedule_at_key_steps_and_paper_presets():
    peak, total, warmup = 3e-4, 1000, 60
    decay_start = warmup + 0.05 * (total - 1 - warmup)  # the 5% plateau after the warmup
    # the schedule is piecewise linear through these knots: 0.005x -> 1x (warmup), 1x (plateau), 1x
    # -> 0.1x (decay)
    knots_x, knots_y = [0, warmup, decay_start, total - 1], [0.005, 1, 1, 0.1]
    for step in range(total):
        assert train_gpt.get_lr(step, total, warmup, peak) == pytest.approx(peak * np.interp(step, knots_x, knots_y))
    assert train_gpt.get_lr(0, total, warmup, peak) == pytest.approx(0.005 * peak)
    assert train_gpt.get_lr(warmup, total, warmup, peak) == peak
    assert train_gpt.get_lr(int(decay_start), total, warmup, peak) == peak
    assert train_gpt.get_lr(int(decay_start) + 2, total, warmup, peak) < peak
    assert train_gpt.get_lr(total - 1, total, warmup, peak) == pytest.approx(0.1 * peak)
    # the paper's runs: 768 images per step, warmup 6 / 6 / 7 epochs, peak 3e-4 / 3e-4 / 2.4e-4, 300
    # / 300 / 350 epochs
    for name, (lr, warmup_epochs, epochs) in {'B': (3e-4, 6, 300), 'L': (3e-4, 6, 300),
                                              'XL': (2.4e-4, 7, 350)}.items():
        args = train_gpt.get_args(['--preset', name])
        assert (args.lr, args.warmup_epochs, args.epochs, args.batch_size) == (lr, warmup_epochs, epochs, 768)
        assert (args.weight_decay, args.grad_clip) == (0.05, 1.0)
        assert args.model == name  # a named run: its architecture and training settings
    # the command line beats the preset
    assert train_gpt.get_args(['--preset', 'XL', '--lr', '1e-4']).lr == 1e-4
    assert train_gpt.get_args([]).model == 'B' and train_gpt.get_args(['--model', 'L']).lr == 3e-4


def test_loss_falls_and_lr_is_scaled_with_the_batch(files, tmp_path, capsys):
    out = tmp_path / 'run'
    model = train_gpt.main(argv(files, out, '--epochs', '8'))  # 32 steps
    assert 'peak lr 0.001 (= 0.048 x batch 16 / 768)' in capsys.readouterr().out
    log = read_log(out)
    assert [int(r['step']) for r in log] == list(range(1, 33))
    assert max(float(r['lr']) for r in log) == pytest.approx(1e-3)
    first = float(log[0]['loss_pre']) + float(log[0]['loss_post'])
    last = np.mean([float(r['loss_pre']) + float(r['loss_post']) for r in log[-4:]])
    # zero-initialised heads: uniform
    assert first == pytest.approx(np.log(64) + np.log(4096), abs=0.05)
    assert last < first - 1.5, (first, last)  # 12.48 -> ~10.7 nats in 32 steps
    ckpt = load_checkpoint(out / 'ckpt.pt', 'gpt')
    torch.load(out / 'ckpt.pt', weights_only=True)  # tensors and plain types only: no pickled code
    assert ckpt['step'] == 32 and (ckpt['epoch'], ckpt['batch_in_epoch']) == (8, 0)
    assert ckpt['config']['block_size'] == 16 and ckpt['config']['num_classes'] == 10
    assert ckpt['tokenizer']['path'] == files['tokenizer']
    assert all(torch.equal(v, ckpt['model'][k]) for k, v in model.state_dict().items())
    assert (out / 'samples_step32.png').exists()


def test_extraction_writes_the_on_the_fly_tokens_and_trains_identically(files, tmp_path):
    codes = tmp_path / 'codes'
    extract(files, codes, '--views', '2')
    tokenizer = Tokenizer.from_checkpoint(files['tokenizer']).eval()
    images = data.build_dataset(files['data'], 16, train=True, seed=0)  # the trainer's: no flip
    extracted = data.CodesDataset(str(codes))
    views = []
    for epoch in range(2):  # view v = the augmentation of epoch v
        with torch.no_grad():
            batch = torch.stack([images[(epoch, i)][0] for i in range(64)])
            expected = tokenizer.encode(batch)[1].flatten(1)
        got = torch.stack([extracted[(epoch, i)][0] for i in range(64)])
        assert torch.equal(got, expected)
        views.append(got)
    assert (views[0] != views[1]).any(1).float().mean() > 0.5  # the views are different crops
    assert extracted[(0, 5)][1] == images[(0, 5)][1]
    # two epochs from the codes (views 0, 1) == two epochs encoded on the fly, to the bit
    on_the_fly = train_gpt.main(argv(files, tmp_path / 'a')).state_dict()
    from_codes = train_gpt.main(argv(files, tmp_path / 'b', '--codes', str(codes))).state_dict()
    assert all(torch.equal(on_the_fly[k], from_codes[k]) for k in on_the_fly)


class Killed(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(files, tmp_path, monkeypatch):
    common = ('--epochs', '3', '--eval-every', '3')  # 12 steps, checkpoints at 3, 6, 9, 12
    train_gpt.main(argv(files, tmp_path / 'full', *common))
    real_step, calls = train_gpt.train_step, []

    # killed during step 8: the last checkpoint is mid-epoch 1 (step 6)
    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_gpt, 'train_step', dying_step)
    with pytest.raises(Killed):
        train_gpt.main(argv(files, tmp_path / 'resumed', *common))
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / 'resumed' / 'ckpt.pt', 'gpt')
    assert (ckpt['step'], ckpt['epoch'], ckpt['batch_in_epoch']) == (6, 1, 2)
    train_gpt.main(argv(files, tmp_path / 'resumed', *common, '--resume'))
    full, resumed = (load_checkpoint(tmp_path / run / 'ckpt.pt',
                                     'gpt') for run in ('full', 'resumed'))
    assert resumed['step'] == full['step'] == 12
    assert all(torch.equal(full['model'][k], resumed['model'][k]) for k in full['model'])
    assert len(full['optimizer']['state']) == len(resumed['optimizer']['state']) > 0
    for a, b in zip(full['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert torch.equal(a['exp_avg'], b['exp_avg']) and torch.equal(a['exp_avg_sq'], b['exp_avg_sq'])
    assert read_log(tmp_path / 'full')[-1]['loss_post'] == read_log(tmp_path / 'resumed')[-1]['loss_post']
    # step 7 was logged before the kill and again after the resume from step 6: once in the log
    assert [int(r['step']) for r in read_log(tmp_path / 'resumed')] == list(range(1, 13))
    # --max-steps stops early (mid-epoch, with a checkpoint) on the same schedule; --resume finishes
    # the same run
    train_gpt.main(argv(files, tmp_path / 'stopped', *common, '--max-steps', '5'))
    ckpt = load_checkpoint(tmp_path / 'stopped' / 'ckpt.pt', 'gpt')
    assert (ckpt['step'], ckpt['epoch'], ckpt['batch_in_epoch']) == (5, 1, 1)
    train_gpt.main(argv(files, tmp_path / 'stopped', *common, '--resume'))
    stopped = load_checkpoint(tmp_path / 'stopped' / 'ckpt.pt', 'gpt')
    assert stopped['step'] == 12 and all(torch.equal(full['model'][k], stopped['model'][k]) for k in full['model'])


def test_checkpoint_records_the_tokenizer_and_resume_refuses_other_inputs(files, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tokenizer(tmp_path / 'tok.pt')
    run = argv(files, tmp_path / 'run', '--epochs', '1', '--max-steps', '2')
    run[run.index('--tokenizer') + 1] = 'tok.pt'  # relative, as typed
    train_gpt.main(run)
    info = load_checkpoint(tmp_path / 'run' / 'ckpt.pt', 'gpt')['tokenizer']
    assert info['path'] == str(tmp_path / 'tok.pt') and info['ema']  # absolute
    assert info['fingerprint'] == weights_checksum(Tokenizer.from_checkpoint('tok.pt'))
    with pytest.raises(FileExistsError, match='holds a run already.*--resume.*--overwrite'):
        train_gpt.main(run)  # the same command again, without --resume
    shutil.copy(files['data'], tmp_path / 'moved.npz')
    other_tokenizer = save_tokenizer(tmp_path / 'other.pt', seed=1)
    for name, flags in (('tokenizer', ['--tokenizer', other_tokenizer]),
                        ('data', ['--data', 'moved.npz']), ('seed', ['--seed', '1']),
                        ('ema', ['--no-ema'])):
        with pytest.raises(ValueError, match=f"another config:\n  {name}: checkpoint"):
            train_gpt.main(run + ['--resume'] + flags)
    save_tokenizer(tmp_path / 'tok.pt', seed=1)  # retrained in place: the same path, other weights
    with pytest.raises(ValueError, match='tokenizer_fingerprint'):
        train_gpt.main(run + ['--resume'])
    save_tokenizer(tmp_path / 'tok.pt')
    # how often it logs / samples, where it stops and the micro-batching may change
    train_gpt.main(run + ['--resume', '--log-every', '2', '--eval-every', '3', '--max-steps', '4',
                          '--grad-accum', '2'])
    assert load_checkpoint(tmp_path / 'run' / 'ckpt.pt', 'gpt')['step'] == 4


def _ddp_worker(rank, args, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = train_gpt.main(args)
    torch.save(model.state_dict(), os.path.join(out, f'rank{rank}.pt'))
    # skip interpreter teardown: with torch 2.13 + gloo it sometimes aborts (SIGABRT) after the work
    os._exit(0)


def test_ddp_gloo_two_processes_keep_identical_weights(files, tmp_path):
    port = free_port()
    args = argv(files, tmp_path / 'ddp', '--epochs', '1', '--val-data', files['val'])
    mp.spawn(_ddp_worker, args=(args, port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # the held-out loss over both ranks' shards (5 + 4 images) == the direct one over all 9
    final = held_out_rows(tmp_path / 'ddp')[-1]
    ce_pre, ce_post = direct_held_out_ce(files, rank0)
    assert float(final['val_ce_pre']) == pytest.approx(ce_pre, abs=2e-6)
    assert float(final['val_ce_post']) == pytest.approx(ce_post, abs=2e-6)
    assert rank0['head_post.weight'].abs().sum() > 0  # trained: the zero-initialised head moved
    # each rank's RNG, for --resume
    assert len(load_checkpoint(tmp_path / 'ddp' / 'ckpt.pt', 'gpt')['rng']) == 2


def test_sigterm_stops_with_a_checkpoint_that_resumes_exactly(files, tmp_path, monkeypatch):
    """SIGTERM (a cluster's preemption, or torchrun passing on Ctrl-C) during step 7: the step
    finishes, a checkpoint of step 7 is written without an evaluation, the run exits with 143
    (128 + SIGTERM) and restores the signal handlers; --resume then ends exactly where an
    uninterrupted run ends."""
    common = ('--epochs', '3', '--eval-every', '3')  # 12 steps
    train_gpt.main(argv(files, tmp_path / 'full', *common))
    real_step, calls = train_gpt.train_step, []

    def preempted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, in the main thread
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_gpt, 'train_step', preempted_step)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        train_gpt.main(argv(files, tmp_path / 'resumed', *common))
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) == 7
    assert signal.getsignal(signal.SIGTERM) is handler
    ckpt = load_checkpoint(tmp_path / 'resumed' / 'ckpt.pt', 'gpt')
    assert (ckpt['step'], ckpt['epoch'], ckpt['batch_in_epoch']) == (7, 1, 3)
    assert not (tmp_path / 'resumed' / 'samples_step7.png').exists()  # no evaluation
    train_gpt.main(argv(files, tmp_path / 'resumed', *common, '--resume'))
    full, resumed = (load_checkpoint(tmp_path / run / 'ckpt.pt', 'gpt') for run in ('full', 'resumed'))
    assert resumed['step'] == full['step'] == 12
    assert all(torch.equal(full['model'][k], resumed['model'][k]) for k in full['model'])


def _ddp_signal_worker(rank, args, port, out):
    """Rank 1 alone receives SIGTERM during its step 3; both ranks must stop at the same step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real_step, calls = train_gpt.train_step, []

    def step(*a, **k):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a, **k)
    train_gpt.train_step = step
    try:
        train_gpt.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    with open(os.path.join(out, f'rank{rank}.txt'), 'w') as f:
        f.write(f'{code} {len(calls)}')
    os._exit(0)  # as _ddp_worker


def test_ddp_ranks_agree_on_the_step_to_stop_at(files, tmp_path):
    """Under DDP the ranks agree every StopOnSignal.CHECK_EVERY (10) steps: one rank's signal
    at step 3 stops both after step 10, with one checkpoint of step 10."""
    port = free_port()
    args = argv(files, tmp_path / 'ddp', '--epochs', '4', '--eval-every', '100')  # 16 steps
    mp.spawn(_ddp_signal_worker, args=(args, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert open(tmp_path / f'rank{rank}.txt').read() == f'{128 + signal.SIGTERM} 10'
    assert load_checkpoint(tmp_path / 'ddp' / 'ckpt.pt', 'gpt')['step'] == 10


def test_clear_errors_for_bad_paths_and_mismatches(files, tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*missing.pt'):
        train_gpt.main(argv(files, tmp_path / 'a', '--tokenizer', str(tmp_path / 'missing.pt')))
    save_checkpoint(tmp_path / 'gpt.pt', {'kind': 'gpt', 'config': {}})
    with pytest.raises(ValueError, match='not a tokenizer checkpoint'):
        train_gpt.main(argv(files, tmp_path / 'a', '--tokenizer', str(tmp_path / 'gpt.pt')))
    # tokens of a 16-bit tokenizer for a GPT trained on 18-bit tokens: resume refuses, naming the
    # field
    train_gpt.main(argv(files, tmp_path / 'b', '--epochs', '1'))
    tok16 = save_tokenizer(tmp_path / 'tok16.pt', num_bits=16)
    with pytest.raises(ValueError, match='vocab_bits: checkpoint 18 .* now 16'):
        train_gpt.main(argv(files, tmp_path / 'b', '--epochs', '1', '--tokenizer', tok16,
                            '--resume'))
    # pre-extracted 18-bit codes with a 16-bit tokenizer for the grids
    codes = tmp_path / 'codes'
    extract(files, codes, '--views', '1')
    with pytest.raises(ValueError, match='18-bit tokens on a 4x4 grid.* 16-bit tokens'):
        train_gpt.main(argv(files, tmp_path / 'c', '--codes', str(codes), '--tokenizer', tok16))
    with pytest.raises(ValueError, match='not a multiple'):
        train_gpt.main(argv(files, tmp_path / 'd', '--image-size', '18'))


def test_max_minutes_stops_in_time_with_the_lr_decayed(files, tmp_path):
    """A 6-second budget on a run of 400 planned steps: it stops in time with a checkpoint at its
    last logged step, and the lr decay was planned to end there."""
    out = tmp_path / 'budget'
    start = time.time()
    train_gpt.main(argv(files, out, '--epochs', '100', '--warmup-epochs', '0.5',
                        '--max-minutes', '0.1'))
    took = time.time() - start
    rows = read_log(out)
    last = int(rows[-1]['step'])
    assert 4 < last < 400 and took < 6 + 15, (last, took)  # the reserve covers grid and checkpoint
    assert load_checkpoint(out / 'ckpt.pt', 'gpt')['step'] == last
    lrs = [float(r['lr']) for r in rows]
    # the schedule's end: 0.1 x peak at the planned last step (peak 1e-3)
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < 0.3e-3, lrs[-5:]
    # with --max-steps as well, the earlier end wins
    train_gpt.main(argv(files, tmp_path / 'both', '--epochs', '100', '--max-minutes', '0.1',
                        '--max-steps', '3'))
    assert int(read_log(tmp_path / 'both')[-1]['step']) == 3


def test_out_of_memory_names_the_flags_to_change(files, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB")
    monkeypatch.setattr(train_gpt, 'train_step', no_memory)
    message = r'out of cpu memory at step 0 with \d+ sequences.*--grad-accum 2 .*smaller --batch-size'
    with pytest.raises(SystemExit, match=message):
        train_gpt.main(argv(files, tmp_path / 'a'))


def test_held_out_loss_is_logged_and_equals_a_direct_computation(files, tmp_path, capsys):
    out = tmp_path / 'images'
    model = train_gpt.main(argv(files, out, '--epochs', '1', '--eval-every', '2',
                                '--val-data', files['val']))
    assert 'held-out CE: pre' in capsys.readouterr().out
    rows = held_out_rows(out)
    assert [int(r['step']) for r in rows] == [0, 2, 4]  # before training and at every evaluation
    assert float(rows[0]['val_ce_pre']) == pytest.approx(np.log(64), abs=1e-5)  # zero heads
    assert float(rows[0]['val_ce_post']) == pytest.approx(np.log(4096), abs=1e-5)
    assert float(rows[0]['val_bits_pre']) == pytest.approx(6, abs=1e-5)
    ce_pre, ce_post = direct_held_out_ce(files, model.state_dict())  # the final weights, at step 4
    assert float(rows[-1]['val_ce_pre']) == pytest.approx(ce_pre, abs=2e-6)
    assert float(rows[-1]['val_ce_post']) == pytest.approx(ce_post, abs=2e-6)
    assert float(rows[-1]['val_bits_post']) == pytest.approx(ce_post / np.log(2), abs=2e-6)
    assert ce_pre < np.log(64)  # it has learnt something, so the final row is not the step-0 one
    # the same held-out images as codes (one centre-crop view): the same numbers
    extract(files, tmp_path / 'val_codes', '--val', data_spec=files['val'])
    out_codes = tmp_path / 'codes'
    train_gpt.main(argv(files, out_codes, '--epochs', '1', '--eval-every', '2',
                        '--val-codes', str(tmp_path / 'val_codes')))
    assert [r['val_ce_post'] for r in held_out_rows(out_codes)] == [r['val_ce_post'] for r in rows]
    extract(files, tmp_path / 'train_codes', '--views', '1')  # random crops: not held-out codes
    with pytest.raises(ValueError, match='not one centre-crop view'):
        train_gpt.main(argv(files, str(tmp_path / 'refused'), '--val-codes',
                            str(tmp_path / 'train_codes')))


def test_extraction_refuses_a_folder_made_from_other_weights_or_data(files, tmp_path):
    codes = tmp_path / 'codes'
    meta = extract(files, codes, '--views', '1')
    made_from = meta['made_from']
    tokenizer = Tokenizer.from_checkpoint(files['tokenizer'])
    assert made_from['tokenizer_sha256'] == weights_checksum(tokenizer)
    assert made_from['data'] == [os.path.abspath(files['data'])]
    assert made_from['data_bytes'] == [os.path.getsize(files['data'])]
    assert (made_from['num_images'], made_from['image_size'], made_from['views']) == (64, 16, 1)
    assert made_from['crop'] == 'random' and meta['complete'] and meta['skipped'] == []
    before = np.load(codes / 'codes.npy')
    extract(files, codes, '--views', '1')  # the same again: nothing to do, nothing refused
    other_tokenizer = save_tokenizer(tmp_path / 'tok1.pt', seed=1)
    with pytest.raises(ValueError, match=f'codes folder {codes} was made from.*\n'
                       '  tokenizer_sha256(.|\n)*--overwrite'):
        extract(files, codes, '--views', '1', '--tokenizer', other_tokenizer)
    with pytest.raises(ValueError, match='  data: folder .*shapes.npz.*val.npz'):
        extract(files, codes, '--views', '1', data_spec=files['val'])
    with pytest.raises(ValueError, match='  views: folder 1 vs. now 2'):
        extract(files, codes, '--views', '2')
    assert np.array_equal(np.load(codes / 'codes.npy'), before)  # untouched by the refusals
    meta = extract(files, codes, '--views', '2', '--tokenizer', other_tokenizer, '--overwrite')
    assert meta['made_from']['views'] == 2 and np.load(codes / 'codes.npy').shape == (2, 64, 4, 4)


def _jpeg_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=90)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def test_extraction_skips_unreadable_images_as_training_does(files, tmp_path):
    """110 JPEGs in an .npz: a corrupt one is skipped (listed, no codes); three (> 1%) stop it."""
    shapes = data.SyntheticShapes(n=110, size=16, num_classes=10)
    blobs = [_jpeg_bytes(np.asarray(shapes.load(i))) for i in range(110)]

    def archive(path, bad):
        parts = [b'not a jpeg' if i in bad else blob.tobytes() for i, blob in enumerate(blobs)]
        offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        jpeg = np.frombuffer(b''.join(parts), np.uint8)
        np.savez(path, jpeg=jpeg, offsets=offsets, labels=shapes.labels)
        return str(path)

    one_bad = archive(tmp_path / 'one_bad.npz', {37})
    meta = extract(files, tmp_path / 'codes', '--views', '2', data_spec=one_bad)
    assert meta['complete'] and meta['skipped'] == [{'index': 37, 'file': f'{one_bad}[37]'}]
    codes = data.CodesDataset(str(tmp_path / 'codes'))
    assert len(codes) == 109  # the others, in order, with their labels and their own views
    images = data.build_dataset(one_bad, 16, train=True)
    tokenizer = Tokenizer.from_checkpoint(files['tokenizer']).eval()
    for j, i in ((0, 0), (36, 36), (37, 38), (108, 109)):
        with torch.no_grad():
            expected = tokenizer.encode(images[(1, i)][0][None])[1].flatten()
        assert torch.equal(codes[(1, j)][0], expected) and codes[(1, j)][1] == shapes.labels[i]
    three_bad = archive(tmp_path / 'bad3.npz', {3, 50, 90})
    with pytest.raises(RuntimeError, match='could not be read'):
        extract(files, tmp_path / 'codes3', '--views', '1', data_spec=three_bad)


def to_official(state):
    """Our GPT state_dict in the released Lightning layout (gpt.convert_official_gpt inverted)."""
    names = {'class_emb.weight': 'class_emb.embedding_table.weight',
             'head_pre.weight': 'head.0.weight', 'head_post.weight': 'head.1.weight',
             'inter_blocks': 'spatial_blocks', 'intra_blocks': 'factorized_blocks',
             'attn_norm': 'attention_norm', 'attn.qkv': 'attention.wqkv',
             'attn.proj': 'attention.wo', 'ffn.down': 'feed_forward.w2'}
    official = {}
    for key, value in state.items():
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        if key.endswith('ffn.gate_up.weight'):
            w1, w3 = value.chunk(2)
            official[key.replace('ffn.gate_up', 'feed_forward.w1')] = w1
            official[key.replace('ffn.gate_up', 'feed_forward.w3')] = w3
        else:
            official[key] = value
    return {'state_dict': {'transformer.' + k: v for k, v in official.items()}}


def test_init_from_copies_the_weights_with_a_fresh_optimizer(files, tmp_path, monkeypatch):
    trained = train_gpt.main(argv(files, tmp_path / 'a', '--epochs', '1')).state_dict()
    torch.save(to_official(trained), tmp_path / 'AR_tiny.ckpt')
    first_steps = []

    def first_step(model, optimizer, micro_batches, lr, *args):  # what step 0 starts from; stop
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        first_steps.append((weights, len(optimizer.state), lr))
        raise Killed

    monkeypatch.setattr(train_gpt, 'train_step', first_step)
    for i, source in enumerate((str(tmp_path / 'a' / 'ckpt.pt'),
                                f"open-magvit2:{tmp_path / 'AR_tiny.ckpt'}")):
        with pytest.raises(Killed):
            train_gpt.main(argv(files, tmp_path / f'b{i}', '--init-from', source))
        weights, optimizer_entries, lr = first_steps.pop()
        assert all(torch.equal(weights[k], trained[k]) for k in trained)
        assert optimizer_entries == 0  # a fresh AdamW
        assert lr == pytest.approx(0.005 * 1e-3)  # step 0's lr
    # a checkpoint of another network (7 classes, the data has 10): refused, naming the field
    other = GPT.from_preset('tiny', num_classes=7, block_size=16)
    save_checkpoint(tmp_path / 'other.pt', {'kind': 'gpt', 'config': asdict(other.config),
                                            'model': other.state_dict()})
    torch.save(to_official(other.state_dict()), tmp_path / 'AR_other.ckpt')
    for source in (str(tmp_path / 'other.pt'), f"open-magvit2:{tmp_path / 'AR_other.ckpt'}"):
        with pytest.raises(ValueError, match='--init-from: .*\n  num_classes: checkpoint 7 vs. '
                           'now 10'):
            train_gpt.main(argv(files, tmp_path / 'c', '--init-from', source))
    with pytest.raises(ValueError, match='not a gpt checkpoint'):
        train_gpt.main(argv(files, tmp_path / 'c', '--init-from', files['tokenizer']))


def test_cuda_graph_flag_names_what_it_needs():
    with pytest.raises(SystemExit, match='--cuda-graph needs one CUDA GPU'):
        train_gpt.main(['--preset', 'tiny', '--device', 'cpu', '--cuda-graph',
                        '--codes', 'unused'])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize('compiled', [False, True])
def test_cuda_graph_step_equals_the_plain_one(compiled):
    """--cuda-graph (GraphedStep): three plain warm-up steps, then one recording and replays that
    follow the plain step's losses and weights under an lr schedule, two micro-batches each, with
    dropout off (the noise of a replay is drawn differently). With dropout on, the replays draw
    new noise: the same batch twice gives two losses."""
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = GPT.from_preset('tiny', vocab_bits=8, block_size=16, num_classes=5, dropout=0.0,
                                class_dropout=0.0).cuda()
        optimizer = model.configure_optimizers(0.05, 1e-3, (0.9, 0.95), 'cuda', capturable=graph)
        step_model = torch.compile(model) if compiled else model
        graphed = train_gpt.GraphedStep(step_model, optimizer, 1.0) if graph else None
        g = torch.Generator(device='cuda').manual_seed(0)
        losses = []
        for step in range(7):
            batches = [(torch.randint(0, 256, (4, 16), device='cuda', generator=g),
                        torch.randint(0, 5, (4,), device='cuda', generator=g)) for _ in range(2)]
            lr = 1e-3 * 0.8 ** step
            losses.append(graphed(batches, lr) if graph else
                          train_gpt.train_step(step_model, optimizer, batches, lr, 'cuda'))
        runs.append((losses, model, graphed))
    (plain, m_plain, _), (replayed, m_graph, graphed) = runs
    assert graphed.graph is not None
    for a, b in zip(plain, replayed):
        torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-4, atol=1e-5)
    # compiled, the two runs' kernels may pick other reduction configurations (Inductor times
    # them at the first call): Adam turns such rounding in near-zero gradients into up to a few
    # percent of one step (lr 1e-3) in a few weights, hence 1e-4 there
    atol = 1e-4 if compiled else 1e-5
    for p, q in zip(m_plain.parameters(), m_graph.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=atol)
    # dropout on: a replay of the same batch draws new masks. A new recording, after warm-ups
    # (compiled, the new dropout rate compiles anew, which must not happen during a recording)
    for module in m_graph.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    graphed.graph, graphed.calls = None, 0
    batches = [(t.clone(), l.clone()) for t, l in zip(graphed.inputs[0::2], graphed.inputs[1::2])]
    for _ in range(graphed.WARMUP + 1):  # warm-ups, then the recording and its first replay
        graphed(batches, 0.0)  # lr 0: the weights stay
    first, second = graphed(batches, 0.0), graphed(batches, 0.0)
    assert not torch.equal(torch.stack(first), torch.stack(second))
