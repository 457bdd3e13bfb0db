"""Make the flat top-level modules importable however pytest is launched."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest


def tiny_train_args(runs_dir, *extra):
    """Flags of a seconds-long training run: tiny preset, a 48-sample built-in world shared by the session
    (6 steps per epoch, so 8 steps and a resume at step 4 cross an epoch boundary)."""
    data_dir = Path(runs_dir).parent / "data"
    return ["--preset", "tiny", "--runs-dir", str(runs_dir), "--data-dir", str(data_dir), "--num-train", "48",
            "--steps", "8", "--ckpt-every", "4", "--keep-every", "4", *extra]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A tiny MIRO run (runs/miro, 8 steps, checkpoints kept at 4 and 8) and a tiny baseline (runs/baseline)."""
    import train
    runs = tmp_path_factory.mktemp("shared") / "runs"
    train.main(tiny_train_args(runs))
    train.main(tiny_train_args(runs, "--no-rewards", "--keep-every", "0"))
    return runs


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long multi-process test (CI runs it; -m 'not slow' skips it)")
