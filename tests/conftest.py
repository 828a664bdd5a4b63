"""Make the repository root importable (`import clip, models, datasets ...`) however pytest is started,
and the small synthetic benchmark that the training and CUDA-path tests share."""
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synthetic  # noqa: E402  (needs the path above)
import utils  # noqa: E402

# 6 + 4 identities at 64x32: seconds per run on 2 CPU cores
SMALL_BENCHMARK = dict(seed=3, num_train_ids=6, num_test_ids=4, outfits=3, cameras=4, img_size=(64, 32))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """A folder holding the small synthetic benchmark (one per test module)."""
    root = tmp_path_factory.mktemp("data")
    synthetic.generate_synthetic(str(root), synthetic.SyntheticConfig(**SMALL_BENCHMARK), workers=1)
    return str(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared two-core machine: a second thread's synchronisation costs more than it
    brings. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stop_at_epoch(monkeypatch, epoch: int = 2) -> None:
    """SIGTERM to this process at the first step of `epoch` (any stage)."""
    original, updates = utils.Progress.update, []

    def update(self, step, images, losses=None, lr=None):
        original(self, step, images, losses, lr)
        if not self.desc.startswith(("stage1 ", "stage2 ")):
            return  # training steps only, not a feature extraction's
        updates.append(step)
        if len(updates) == (epoch - 1) * self.total + 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(utils.Progress, "update", update)
