"""Numerical conventions every stage shares: how parity is measured, what counts as greedy."""

from __future__ import annotations

import numpy as np

from mgm_ref.constants import GREEDY_TEMPERATURE  # noqa: F401  (the runtime's name for the reference's threshold)


def is_greedy(temperature: float | None) -> bool:
    return temperature is None or temperature <= GREEDY_TEMPERATURE


def _float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (any dtype, any device)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_l2(got, want) -> float:
    """||got - want|| / ||want|| in float64 (numpy arrays or torch tensors)."""
    g, w = _float64(got), _float64(want)
    if g.shape != w.shape:
        raise ValueError(f"shape mismatch: got {g.shape}, expected {w.shape}")
    return float(np.linalg.norm(g - w)) / max(float(np.linalg.norm(w)), 1e-30)
