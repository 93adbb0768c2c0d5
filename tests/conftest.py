"""Make the top-level modules importable from tests/ and keep CPU tests on few threads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

torch.set_num_threads(1)  # small CPU tests: one thread degrades gently when cores are shared
