"""sample.py: a fixed seed reproduces the images, the ADM-format .npz is valid, an interrupted
evaluation run resumes without duplicating or losing images (and gives the same file), 2 ranks give
what 1 rank gives, clear errors for a missing checkpoint and a tokenizer / GPT mismatch, and the
class-consistency score; the tokenizer weights the generator was trained on (recorded fingerprint
and EMA choice; raw for released files), arguments checked before any work, an existing .npz made
with other settings refused."""
import functools
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data
from conftest import fake_official_checkpoint, free_port, save_tokenizer
import sample
from gpt import GPT
from tokenizer import Tokenizer
from utils import load_checkpoint, save_checkpoint, weights_checksum


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """An untrained tiny tokenizer and a random tiny GPT (4x4 tokens -> 16px images, 5 classes) in
    our formats."""
    root = tmp_path_factory.mktemp('sample')
    tokenizer = save_tokenizer(root / 'tok.pt')
    torch.manual_seed(0)
    gpt = GPT.from_preset('tiny', num_classes=5, block_size=16)
    # random heads, so that the samples depend on the class and seed
    for head in (gpt.head_pre, gpt.head_post):
        torch.nn.init.normal_(head.weight, std=0.5)
    save_checkpoint(root / 'gpt.pt',
                    {'kind': 'gpt', 'config': asdict(gpt.config), 'model': gpt.state_dict(),
                                      'step': 0, 'tokenizer': {'path': tokenizer}})
    return {'gpt': str(root / 'gpt.pt'), 'tokenizer': tokenizer, 'root': root}


def argv(files, out, *extra):
    return ['--gpt', files['gpt'], '--device', 'cpu', '--classes', '0,2,4', '--num-per-class', '3',
            '--batch-size', '4', '--out', str(out), *extra]


def test_fixed_seed_reproduces_the_grid(files, tmp_path):
    images, labels = sample.main(argv(files, tmp_path / 'a.png', '--seed', '1'))
    again, _ = sample.main(argv(files, tmp_path / 'b.png', '--seed', '1'))
    other, _ = sample.main(argv(files, tmp_path / 'c.png', '--seed', '2'))
    assert images.shape == (9, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4]  # one grid row per class
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert (tmp_path / 'a.png').exists()


class Killed(Exception):
    pass


def test_npz_is_adm_format_and_an_interrupted_run_resumes_exactly(files, tmp_path, monkeypatch):
    sample.main(argv(files, tmp_path / 'full.npz'))  # 9 images in shards of 4, 4, 1
    full = np.load(tmp_path / 'full.npz')
    assert sorted(full.files) == ['arr_0', 'arr_1']
    assert full['arr_0'].shape == (9, 16, 16, 3) and full['arr_0'].dtype == np.uint8
    assert sorted(full['arr_1'].tolist()) == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert full['arr_1'].tolist() != sorted(full['arr_1'].tolist())  # shuffled (fixed seed)
    assert not os.path.exists(tmp_path / 'full.npz.shards')  # shards removed once merged

    real, calls, kill_at = sample.generate_images, [], [2]

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at[0]:  # killed while making the second shard
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, 'generate_images', counting)
    with pytest.raises(Killed):
        sample.main(argv(files, tmp_path / 'resumed.npz'))
    assert sorted(os.listdir(tmp_path / 'resumed.npz.shards')) == ['settings.json', 'shard000000.npz']
    calls.clear()
    kill_at[0] = None
    sample.main(argv(files, tmp_path / 'resumed.npz'))  # the same command again
    assert len(calls) == 2  # only shards 1 and 2 were generated
    resumed = np.load(tmp_path / 'resumed.npz')
    assert np.array_equal(full['arr_0'], resumed['arr_0']) and np.array_equal(full['arr_1'], resumed['arr_1'])


def _two_rank_worker(rank, args, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sample.main(args)
    # skip interpreter teardown: with torch 2.13 + gloo it sometimes aborts (SIGABRT) after the work
    os._exit(0)


def test_two_ranks_write_what_one_rank_writes(files, tmp_path):
    sample.main(argv(files, tmp_path / 'one.npz'))
    port = free_port()
    mp.spawn(_two_rank_worker, args=(argv(files, tmp_path / 'two.npz'), port), nprocs=2)
    one, two = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    assert np.array_equal(one['arr_0'], two['arr_0']) and np.array_equal(one['arr_1'], two['arr_1'])


def test_clear_errors(files, tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*nope.pt'):
        sample.main(argv(files, tmp_path / 'a.png', '--gpt', str(tmp_path / 'nope.pt')))
    with pytest.raises(ValueError, match='not a gpt checkpoint'):
        sample.main(argv(files, tmp_path / 'a.png', '--gpt', files['tokenizer']))
    tok16 = save_tokenizer(tmp_path / 'tok16.pt', num_bits=16)
    with pytest.raises(ValueError, match='18-bit tokens .*262144.* 16-bit tokens'):
        sample.main(argv(files, tmp_path / 'a.png', '--tokenizer', tok16))
    with pytest.raises(ValueError, match='--classes must lie in 0..4'):
        sample.main(argv(files, tmp_path / 'a.png', '--classes', '5'))
    # resuming an evaluation run with other settings would mix two sample sets in one file
    os.makedirs(tmp_path / 'b.npz.shards')
    with open(tmp_path / 'b.npz.shards' / 'settings.json', 'w') as f:
        f.write('{"seed": 7}')
    with pytest.raises(ValueError, match='other settings'):
        sample.main(argv(files, tmp_path / 'b.npz'))


def test_class_consistency_scores_requested_classes(files):
    # unseen real images as "samples"
    shapes = data.SyntheticShapes(n=40, size=32, num_classes=10, seed=7)
    images = np.stack([np.asarray(shapes.load(i)) for i in range(40)])
    tokenizer = Tokenizer.from_checkpoint(files['tokenizer']).eval()
    scores = sample.check_class_consistency(images, shapes.labels, tokenizer, epochs=3)
    assert scores['real'] > 0.9 and scores['samples'] > 0.85  # chance is 0.1
    assert scores['reconstructed'] < 0.5  # an untrained tokenizer destroys the shapes
    wrong = sample.check_class_consistency(images, (shapes.labels + 1) % 10, tokenizer, epochs=3)
    assert wrong['samples'] < 0.2  # the score is agreement with the *requested* class


def test_official_ar_checkpoint_is_accepted(files, tmp_path):
    from sample import load_models
    ckpt = fake_official_checkpoint(num_classes=5)
    ckpt['state_dict'] = {k: v.float() for k, v in ckpt['state_dict'].items()}
    torch.save(ckpt, tmp_path / 'AR_fake.ckpt')
    gpt, tokenizer = load_models(f"open-magvit2:{tmp_path / 'AR_fake.ckpt'}", files['tokenizer'])
    assert gpt.config.num_classes == 5 and gpt.config.n_inter == 4
    assert torch.equal(gpt.head_pre.weight, ckpt['state_dict']['transformer.head.0.weight'])
    with pytest.raises(ValueError, match='--tokenizer open-magvit2'):
        load_models(str(tmp_path / 'AR_fake.ckpt'))


def test_decodes_with_the_tokenizer_weights_it_was_trained_on(files, tmp_path):
    raw = Tokenizer.from_checkpoint(files['tokenizer'])
    torch.manual_seed(1)
    ema = Tokenizer.from_preset('tiny')  # stands in for the EMA copy: other weights, same shapes
    tok = str(tmp_path / 'tok.pt')
    save_checkpoint(tok, {'kind': 'tokenizer', 'config': asdict(raw.config),
                          'model': raw.state_dict(), 'ema': ema.state_dict()})
    ckpt = load_checkpoint(files['gpt'])  # trained on the raw weights (train_gpt.py --no-ema)
    ckpt['tokenizer'] = {'path': tok, 'ema': False, 'fingerprint': weights_checksum(raw)}
    gpt = str(tmp_path / 'gpt.pt')
    save_checkpoint(gpt, ckpt)
    def decoder(*args, **kwargs):  # the fingerprint of the tokenizer load_models decodes with
        return weights_checksum(sample.load_models(gpt, *args, **kwargs)[1])
    assert decoder() == weights_checksum(raw)  # the recorded choice
    assert decoder(tok) == weights_checksum(raw)  # the same tokenizer, named
    assert decoder(ema=True) == weights_checksum(ema)  # --ema overrides
    # another tokenizer: the error names the one it was trained with and the ways out
    other = save_tokenizer(tmp_path / 'other.pt', seed=2)
    expected = (f"trained with tokenizer {re.escape(tok)} \\(raw weights, fingerprint "
                f"{weights_checksum(raw)}\\).*--tokenizer with the one it was trained with, or "
                "--allow-tokenizer-mismatch")
    with pytest.raises(ValueError, match=expected):
        sample.load_models(gpt, other)
    with pytest.raises(ValueError, match='--allow-tokenizer-mismatch'):
        sample.main(['--gpt', gpt, '--tokenizer', other, '--device', 'cpu',
                     '--out', str(tmp_path / 'a.png')])
    assert decoder(other, allow_tokenizer_mismatch=True) == \
        weights_checksum(Tokenizer.from_checkpoint(other))
    # a released AR checkpoint decodes with the raw tokenizer weights, as the official pipeline
    # (not model_ema.*)
    official_tok = dict(raw.state_dict())
    official_tok.update({'model_ema.' + k.replace('.', ''): v
                         for k, v in ema.state_dict().items()})
    torch.save({'state_dict': official_tok}, tmp_path / 'tok.ckpt')
    ar = fake_official_checkpoint(num_classes=5)
    ar['state_dict'] = {k: v.float() for k, v in ar['state_dict'].items()}
    torch.save(ar, tmp_path / 'AR.ckpt')
    _, tokenizer = sample.load_models(f"open-magvit2:{tmp_path / 'AR.ckpt'}",
                                      f"open-magvit2:{tmp_path / 'tok.ckpt'}")
    assert weights_checksum(tokenizer) == weights_checksum(raw)


def test_arguments_are_checked_before_any_work(files, tmp_path, capsys):
    for flags, message in ((['--cfg-scale', '1,2,3'], "--cfg-scale '1,2,3'"),
                           (['--classes', '0,,1'], '--classes'),
                           (['--batch-size', '0'], '--batch-size must'),
                           (['--batch-size', '-2'], '--batch-size'),
                           (['--num-per-class', '0'], '--num-per-class must'),
                           (['--temperature', '-1'], '--temperature'),
                           (['--temperature', '1,x'], '--temperature'),
                           (['--top-p', '0'], '--top-p'), (['--top-p', '1,1.5'], '--top-p'),
                           (['--top-k', '-1'], '--top-k'), (['--top-k', '2.5'], '--top-k')):
        with pytest.raises(SystemExit):
            sample.main(argv(files, tmp_path / 'x.npz', *flags))
        assert message in capsys.readouterr().err, flags
    assert os.listdir(tmp_path) == []  # nothing was written
    flags = ['--cfg-scale', '3', '--temperature', '0', '--top-k', '5,0']  # 0: greedy, passed on
    _, sampling = sample.get_args(argv(files, 'a.png', *flags))
    assert sampling == dict(cfg_scale=(3.0, 3.0), temperature=(0.0, 0.0), top_k=(5, 0),
                            top_p=(1.0, 1.0))


def test_an_existing_npz_is_never_silently_stale(files, tmp_path, capsys):
    out = tmp_path / 's.npz'
    sample.main(argv(files, out, '--num-per-class', '1'))  # 3 images, one shard
    first = np.load(out)['arr_0']
    sample.main(argv(files, out, '--num-per-class', '1'))  # the same command again: nothing to do
    assert 'exists already, made with these settings: nothing to do' in capsys.readouterr().out
    with pytest.raises(FileExistsError, match=r'made with other settings \(seed\).*--overwrite'):
        sample.main(argv(files, out, '--num-per-class', '1', '--seed', '3'))
    assert np.array_equal(np.load(out)['arr_0'], first)
    sample.main(argv(files, out, '--num-per-class', '1', '--seed', '3', '--overwrite'))
    assert not np.array_equal(np.load(out)['arr_0'], first)
    os.remove(str(out) + '.settings.json')  # a file without its settings is not trusted either
    with pytest.raises(FileExistsError, match='none recorded'):
        sample.main(argv(files, out, '--num-per-class', '1', '--seed', '3'))


def test_compile_flag_samples_the_same_images(files, tmp_path, monkeypatch):
    """--compile runs generate_fast(compile=True): traced by the aot_eager backend (the same ops,
    no fusion) it gives the plain command's images; Inductor's fused kernels may round otherwise."""
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))
    calls = []
    fast = GPT.generate_fast
    monkeypatch.setattr(GPT, 'generate_fast',
                        lambda self, *a, **k: calls.append(k['compile']) or fast(self, *a, **k))
    plain, _ = sample.main(argv(files, tmp_path / 'a.png', '--seed', '3'))
    compiled, _ = sample.main(argv(files, tmp_path / 'b.png', '--seed', '3', '--compile'))
    torch._dynamo.reset()
    assert calls == [False] * 3 + [True] * 3  # 9 images in shards of 4
    assert np.array_equal(plain, compiled)
