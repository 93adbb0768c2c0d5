"""Make the top-level modules importable from tests/ and keep CPU tests on few threads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # small CPU tests: one thread degrades gently when cores are shared


@pytest.fixture(autouse=True)
def allow_random_inception(monkeypatch):
    """Every test's Inception weights are random (bench.write_random_inception), not the
    published file: let fid.load_inception take them where no argument reaches it (train_tok.py's
    rFID). tests/test_fid.py passes the override itself, and removes this to test the refusal."""
    monkeypatch.setenv('NANOMAGVIT2_ALLOW_UNVERIFIED_WEIGHTS', '1')
