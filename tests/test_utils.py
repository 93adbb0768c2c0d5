"""utils.py's run plumbing: durable checkpoints (fsync, no partial file on a full disk), loading
runs no pickled code, the run-folder guard, log.csv truncated to the checkpoint's step on resume,
one resume check for both trainers."""
import csv
import errno
import os
import random
import signal

import numpy as np
import pytest
import torch

import utils


def test_save_checkpoint_syncs_and_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(fd) or real_fsync(fd))
    utils.save_checkpoint(path, {'kind': 'gpt', 'step': 1})
    assert len(synced) == 2  # the file, then its folder (the rename)

    def full_disk(obj, f):  # writes a part, then the disk is full
        f.write(b'PK' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OSError, match='the disk is full: could not write checkpoint .*ckpt') as e:
        utils.save_checkpoint(path, {'kind': 'gpt', 'step': 2})
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no partial temporary file left behind
    assert utils.load_checkpoint(path)['step'] == 1  # the previous checkpoint is intact


class RunsCode:
    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):  # unpickling this calls os.makedirs(folder)
        return os.makedirs, (self.folder,)


def test_load_checkpoint_runs_no_pickled_code_but_rng_state_round_trips(tmp_path):
    evil = str(tmp_path / 'made_by_unpickling')
    torch.save({'kind': 'gpt', 'payload': RunsCode(evil)}, tmp_path / 'evil.pt')
    with pytest.raises(RuntimeError, match='more than tensors and plain types(.|\n)*magvit2:'):
        utils.load_checkpoint(tmp_path / 'evil.pt')
    assert not os.path.exists(evil)
    # a released file is named as such: loaded in full (a numpy array, which weights_only refuses)
    torch.save({'state_dict': {}, 'hparams': np.arange(3)}, tmp_path / 'official.ckpt')
    official = utils.load_checkpoint(f"open-magvit2:{tmp_path / 'official.ckpt'}")
    assert official['hparams'].tolist() == [0, 1, 2]
    # the RNG states are plain types and tensors, and restore every generator exactly
    utils.save_checkpoint(tmp_path / 'rng.pt', {'rng': utils.rng_state()})
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: E731
    expected = draws()
    utils.set_rng_state(torch.load(tmp_path / 'rng.pt', weights_only=True)['rng'])
    assert draws() == expected


def test_csv_log_keeps_the_rows_up_to_the_checkpoint_step(tmp_path):
    path = str(tmp_path / 'log.csv')
    log = utils.CSVLog(path, ['step', 'loss'], enabled=True)
    for step in (0, 1, 2, 3, 4):
        log.write({'step': step, 'loss': 1 / (step + 1)})
    resumed = utils.CSVLog(path, ['step', 'loss', 'new'], enabled=True, resume_step=2)
    resumed.write({'step': 3, 'new': 'x'})
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r['step'] for r in rows] == ['0', '1', '2', '3']  # 3 and 4 dropped, 3 logged again
    assert rows[1]['loss'] == '0.5' and rows[3] == {'step': '3', 'loss': '', 'new': 'x'}
    utils.CSVLog(path, ['step'], enabled=False, resume_step=0)  # another rank: leaves it alone
    assert len(open(path).readlines()) == 5


def test_check_resume_compares_every_flag_but_the_allowed_ones():
    saved = {'lr': 0.1, 'data': 'a', 'device': 'cuda', 'log_every': 5}
    ckpt, config = {'config': {'dim': 8}, 'train_args': saved}, {'dim': 8}
    may_change = {'device', 'log_every'}
    utils.check_resume(ckpt, config, dict(saved, device='cpu', log_every=1), may_change, 'p')
    with pytest.raises(ValueError, match="another config:\n  data: checkpoint 'a' vs. now 'b'"):
        utils.check_resume(ckpt, config, dict(saved, data='b'), may_change, 'p')
    with pytest.raises(ValueError, match="new_flag: checkpoint '<absent>' vs. now 3"):
        utils.check_resume(ckpt, config, dict(saved, new_flag=3), may_change, 'p')
    with pytest.raises(ValueError, match="dim: checkpoint 8 vs. now 9"):
        utils.check_resume(ckpt, {'dim': 9}, saved, may_change, 'p')


def test_prepare_run_folder_refuses_a_run_and_removes_stale_temporary_files(tmp_path):
    out = str(tmp_path / 'run')
    assert utils.prepare_run_folder(out, False, False, is_main=True) == f'{out}/ckpt.pt'
    for name in ('log.csv', 'ckpt.pt', 'ckpt.pt.tmp123'):
        open(os.path.join(out, name), 'w').close()
    with pytest.raises(FileExistsError, match='a run already .*--resume .* --out, or --overwrite'):
        utils.prepare_run_folder(out, resume=False, overwrite=False, is_main=True)
    with pytest.raises(ValueError, match='one of them'):
        utils.prepare_run_folder(out, resume=True, overwrite=True, is_main=True)
    utils.prepare_run_folder(out, resume=True, overwrite=False, is_main=True)
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.csv']  # the killed write's tmp: gone
    utils.prepare_run_folder(out, resume=False, overwrite=True, is_main=True)
    assert os.listdir(out) == []


def test_plan_last_step_is_clamped_between_now_and_the_cap():
    from types import SimpleNamespace
    from utils import plan_last_step
    single = SimpleNamespace(is_main=True, device=torch.device('cpu'))  # no process group
    assert plan_last_step(10, 5.0, 2.0, 100, single) == 20  # 10 s at 2 steps/s
    assert plan_last_step(10, -3.0, 2.0, 100, single) == 10  # over budget: stop now
    assert plan_last_step(10, 50.0, 2.0, 15, single) == 15  # never past --max-steps / --epochs


@pytest.mark.parametrize('preset', [None, 'expandable_segments:False'])
def test_setup_turns_on_expandable_segments_for_cuda_unless_set(monkeypatch, preset):
    """utils.setup('cuda') sets PYTORCH_CUDA_ALLOC_CONF before the first CUDA call, and keeps a value
    the user set. CUDA itself is stubbed: setup's checks and device calls see a GPU."""
    monkeypatch.delenv('PYTORCH_CUDA_ALLOC_CONF', raising=False)
    if preset is not None:
        monkeypatch.setenv('PYTORCH_CUDA_ALLOC_CONF', preset)
    seen = []  # the variable when setup first touches the device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device',
                        lambda device: seen.append(os.environ.get('PYTORCH_CUDA_ALLOC_CONF')))
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    # setup's global switches, put back afterwards (cuBLAS's flag is not an attribute monkeypatch
    # can restore)
    switches = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark)
    try:
        env = utils.setup('cuda')
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = switches
    assert env.device == torch.device('cuda', 0)
    assert seen == [preset or 'expandable_segments:True']


def test_load_optimizer_state_keeps_this_runs_capturable():
    """A run resumed with --cuda-graph from a checkpoint written without it (and back) keeps its
    own optimizer's `capturable`: load_state_dict alone takes the saved flag, and a step recorded
    with capturable=False fails."""
    param = torch.nn.Parameter(torch.randn(3))
    param.grad = torch.randn(3)
    writer = torch.optim.AdamW([param], lr=1e-3)  # capturable=False
    writer.step()
    state = writer.state_dict()
    reader = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=5e-4, capturable=True)
    utils.load_optimizer_state(reader, state)
    assert reader.param_groups[0]['capturable'] is True
    assert reader.param_groups[0]['lr'] == 1e-3  # the rest is the checkpoint's
    assert torch.equal(reader.state[reader.param_groups[0]['params'][0]]['exp_avg'],
                       writer.state[param]['exp_avg'])
    reader.load_state_dict(state)  # what the helper replaces: the saved flag wins
    assert reader.param_groups[0]['capturable'] is False


def test_cuda_graph_capture_failure_names_the_flag(monkeypatch):
    """A step that cannot be recorded (e.g. a cuDNN error during capture) ends the run with a
    message that names --cuda-graph, not a CUDA traceback; the optimisers' gradients were set to
    None first, so that the graph would have allocated them. CPU: the graph API is replaced."""
    import contextlib
    from types import SimpleNamespace

    @contextlib.contextmanager
    def failing_capture(graph, capture_error_mode):
        assert capture_error_mode == 'thread_local'  # the loader's thread may call CUDA meanwhile
        yield
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore")
    monkeypatch.setattr(torch.cuda, 'CUDAGraph', lambda: None)
    monkeypatch.setattr(torch.cuda, 'graph', failing_capture)
    monkeypatch.setattr(torch.cuda, 'Stream', lambda: None)  # no GPU
    zeroed, seen = [], []
    optimiser = SimpleNamespace(zero_grad=lambda set_to_none: zeroed.append(set_to_none))
    graphed = utils.CUDAGraphed(lambda x: seen.append(x.shape) or {}, [optimiser, optimiser])
    graphed.calls = graphed.WARMUP  # the warm-ups are over: the next call records
    with pytest.raises(SystemExit, match=r'--cuda-graph: .*previous error during capture\); '
                                         r'rerun without --cuda-graph'):
        graphed(torch.zeros(2, 3, 8, 8))
    assert zeroed == [True, True] and seen == [(2, 3, 8, 8)]  # fn ran inside the capture


def test_a_second_ctrl_c_stops_at_once_and_a_repeated_sigterm_does_not():
    """The trainers' StopOnSignal: the first signal asks for a checkpoint after the step. A launcher
    may pass on a SIGTERM its job got as well, so SIGTERM never escalates; Ctrl-C twice does."""
    previous = signal.getsignal(signal.SIGINT)
    stop = utils.StopOnSignal()
    try:
        assert not stop.agreed(0, 'cpu')
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(1, 'cpu') and stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # still running, still stopping after the step
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is previous  # the handlers are put back
    finally:
        stop.restore()
