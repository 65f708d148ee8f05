"""Shared helpers: reference models with random weights, and the error measure every parity test uses."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the module lives at the top of the repo

torch.set_num_threads(2)


def rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the relative error all tolerances in these tests refer to."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(module, seed):
    """Every parameter random, norms included (a norm left at ones would hide a missing multiply).
    Weights ~ N(0, 1/fan_in) so activations stay O(1) through the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))
    return module
