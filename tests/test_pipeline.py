"""pipeline.py --tiny on CPU: the four stages run in turn on a small .npz, the figures come back,
the .npz of samples has the ADM layout, and a rerun skips every finished stage. Ctrl-C or SIGTERM
during a stage lets the stage finish with its checkpoint."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import data
import pipeline
from conftest import ROOT

# labels with gaps, like Tiny-ImageNet's ImageNet-1k indices: 10 class slots, 4 of them present
PRESENT = [3, 5, 8, 9]


def write_npz(path, n, seed):
    shapes = data.SyntheticShapes(n=n, size=32, num_classes=len(PRESENT), seed=seed)
    images = np.stack([np.asarray(shapes.load(i)) for i in range(n)])  # (n, 32, 32, 3) uint8
    np.savez(path, images=images, labels=np.array(PRESENT)[shapes.labels])
    return str(path)


def test_tiny_pipeline_runs_and_reruns(tmp_path, capsys, monkeypatch):
    # 128 images: 4 generator steps per epoch at the tiny preset's batch of 32
    train, val = write_npz(tmp_path / 'train.npz', 128, 0), write_npz(tmp_path / 'val.npz', 32, 1)
    out = tmp_path / 'run'
    argv = ['--tiny', '--data', train, '--val-data', val, '--out', str(out), '--minutes', '0.3',
            '--num-per-class', '4']
    stages = pipeline.main(argv)
    printed = capsys.readouterr().out

    for key in ('psnr', 'codebook_usage'):
        assert np.isfinite(stages['tokenizer'][key])
    assert 0 < stages['tokenizer']['codebook_usage'] <= 1
    gpt = stages['gpt']
    assert gpt['epochs'] >= 1 and gpt['step'] == gpt['epochs'] * gpt['steps_per_epoch']
    for key in ('val_ce_pre', 'val_ce_post', 'val_bits_pre', 'val_bits_post'):
        assert np.isfinite(gpt[key]) and gpt[key] > 0
    assert stages['sample']['images_per_s'] > 0
    for line in ('held-out PSNR', 'codebook usage', 'held-out NLL', 'img/s', 'wall time'):
        assert line in printed

    with np.load(out / 'samples.npz') as samples:
        images, labels = samples['arr_0'], samples['arr_1']
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    # only the classes of the training data, each --num-per-class times
    assert sorted(labels.tolist()) == sorted(PRESENT * 4)
    assert (out / 'samples.png').exists()

    # a rerun of the same command finds every stage done and runs nothing
    def no_run(script, flags):
        raise AssertionError(f"{script} ran again")
    monkeypatch.setattr(pipeline, 'run', no_run)
    assert pipeline.main(argv) == stages


def test_gpu_recipes_are_valid_flags_of_each_script():
    """The GPU path runs only on a GPU: its flags must at least parse, with the values meant."""
    import extract_codes
    import sample
    import train_gpt
    import train_tok
    tok = train_tok.get_args(pipeline.TOKENIZER_RECIPE + ['--data', 'a.npz', '--val-data', 'b.npz',
                                                          '--out', 'o', '--max-minutes', '7'])
    assert (tok.model, tok.image_size, tok.batch_size, tok.lr, tok.gan_weight) == \
        ('tin64', 64, 128, 1e-3, 0)
    assert tok.perceptual_weight == 0 and tok.cooldown == 0.3 and tok.compile
    assert tok.warmup_steps == 100 and tok.eval_images == 2000 and tok.num_workers == 8
    codes = extract_codes.get_args(pipeline.CODES_RECIPE + ['--views', str(pipeline.VIEWS),
                                                            '--tokenizer', 't', '--codes', 'c',
                                                            '--data', 'a.npz'])
    assert codes.image_size == 64 and codes.views == pipeline.VIEWS
    gpt = train_gpt.get_args(pipeline.GPT_RECIPE + ['--codes', 'c', '--tokenizer', 't',
                                                    '--val-codes', 'v', '--out', 'o',
                                                    '--epochs', '3'])
    assert gpt.model == 'B' and gpt.compile and gpt.epochs == 3 and gpt.batch_size == 256
    samples, _ = sample.get_args(pipeline.SAMPLE_RECIPE + ['--gpt', 'g', '--classes', '1,2',
                                                            '--num-per-class', '50',
                                                            '--out', 's.npz'])
    assert samples.batch_size == 250


def test_a_budget_too_small_for_one_generator_epoch_warns(capsys):
    # 60 s left, epochs of 100 s: one epoch anyway, and a warning that names the flag
    assert pipeline.plan_epochs(60.0, 100.0, 7) == 1
    warning = capsys.readouterr().err
    assert '--minutes 7' in warning and 'past its budget' in warning
    # 1,000 s left: 9 epochs of 100 s with the 5% margin, and no warning
    assert pipeline.plan_epochs(1000.0, 100.0, 15) == 9
    assert capsys.readouterr().err == ''
    assert pipeline.plan_epochs(-152.0, 26.5, 7) == 1  # time already overspent


# a stage that stops as the trainers do (utils.StopOnSignal) and prints at every step: had the
# pipeline left, closing the pipe, the print after the signal would kill it before its checkpoint
STAGE = f"""
import sys, time
sys.path.insert(0, {ROOT!r})
import utils
stop = utils.StopOnSignal()
print('ready', flush=True)
for step in range(1, 600):
    time.sleep(0.05)
    print(f'step {{step}}', flush=True)
    if stop.agreed(step, 'cpu'):
        print(f'checkpoint at step {{step}}', flush=True)
        stop.exit(step, 'ckpt.pt')
"""


@pytest.mark.parametrize("how", ['ctrl-c', 'sigterm to the pipeline'])
def test_a_signal_during_a_stage_waits_for_its_checkpoint(tmp_path, how):
    stage = tmp_path / 'stage.py'
    stage.write_text(STAGE)
    driver = f"import sys; sys.path.insert(0, {ROOT!r}); import pipeline; pipeline.run({str(stage)!r}, [])"
    # a process group of its own, as a shell gives a command it runs
    process = subprocess.Popen([sys.executable, '-c', driver], start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while 'ready' not in process.stdout.readline():
            assert process.poll() is None
        if how == 'ctrl-c':  # the terminal signals the whole group: pipeline and stage
            os.killpg(process.pid, signal.SIGINT)
        else:  # the pipeline alone, which passes it on
            os.kill(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    code = 128 + (signal.SIGINT if how == 'ctrl-c' else signal.SIGTERM)
    assert 'checkpoint at step' in output, output[-2000:]
    assert f'was stopped (exit status {code})' in output and process.returncode == 1
