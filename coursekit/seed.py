"""Deterministic seeding in one call."""
from __future__ import annotations

import os
import random


def set_seed(seed: int = 0) -> int:
    """Seed Python, NumPy and PyTorch (CPU and CUDA). Returns the seed for printing."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return seed
