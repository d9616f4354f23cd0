"""What a worker runs: data, augmentation, model, losses, stage loops and metrics (no Ray here)."""

from __future__ import annotations

import os
import random

# Bumped whenever a change alters what a stage computes, so stale store entries are not reused.
STAGE_CODE_VERSION = 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) and ask cuDNN for deterministic kernels."""
    import numpy as np  # here, not at module level: the spec and the CLI import this package
    import torch

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
