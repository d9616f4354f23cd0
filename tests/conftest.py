"""Fixtures shared by the whole test suite: a small synthetic MSD folder and its slices.

``synthetic_root``: 10 synthetic cases of about 24 x 28 x 20 voxels (seed 0), written once per
session. ``synthetic_data_config`` / ``synthetic_slices``: those cases preprocessed to 32 x 32
slices (about 200 slices, 3 classes) in a session cache folder. ``shared_data_root``: the real
Hippocampus folder beside the checkout, or a visible skip when it is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainers.config import DataConfig
from trainers.data import SliceData, prepare_slices
from trainers.synthetic import write_synthetic_msd

SYNTHETIC_CASES = 10
SYNTHETIC_SHAPE = (24, 28, 20)
SYNTHETIC_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MSD-layout folder of 10 small synthetic cases (labels 0, 1, 2)."""
    folder = tmp_path_factory.mktemp("synthetic") / "msd"
    return write_synthetic_msd(folder, num_cases=SYNTHETIC_CASES, seed=0, shape=SYNTHETIC_SHAPE)


@pytest.fixture(scope="session")
def synthetic_data_config(synthetic_root: Path) -> DataConfig:
    """``DataConfig`` reading ``synthetic_root`` as an MSD folder at 32 x 32."""
    return DataConfig(kind="msd", root=str(synthetic_root), image_size=SYNTHETIC_IMAGE_SIZE)


@pytest.fixture(scope="session")
def synthetic_slices(
    synthetic_data_config: DataConfig, tmp_path_factory: pytest.TempPathFactory
) -> SliceData:
    """``synthetic_root`` preprocessed: images (S, 32, 32) in [0, 1], 10 volumes, 3 classes."""
    return prepare_slices(synthetic_data_config, tmp_path_factory.mktemp("slice-cache"))


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """``../shared/data/Task04_Hippocampus`` beside the checkout; skips the test when absent."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus"
    if not (root / "dataset.json").is_file():
        pytest.skip(
            "../shared/data/Task04_Hippocampus not found: real-data smoke test needs the shared data folder"
        )
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``):
    tiny tensors run faster on one thread, the test machine's cores are shared, and CPU
    kernels then take the same code path wherever a test compares runs exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
