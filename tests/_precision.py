"""Tolerances derived from the precision of what is compared, not from one machine.

Two float32 computations of the same quantity that take different paths (another batch shape, a KV cache
instead of a full forward, one thread instead of two, AVX2 instead of AVX-512 kernels) agree only to
float32 rounding accumulated along the path, and that rounding scales with the magnitude of the result.
The tiny test models are a few layers of width <= 64, so each output passes through a handful of
reductions of <= 64 terms; summation-order differences then stay within a few dozen units of float32
round-off relative to the magnitude. ``FLOAT32_PATHS`` allows 64 of them: far below any real bug
(a wrong token, mask or position changes a log-likelihood by more than 1e-2 relative) and independent of
the CPU. Comparisons of float64 accumulations of identical inputs keep their own, much tighter bounds.
"""

from __future__ import annotations

import pytest
import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
# Relative tolerance between two float32 paths through a tiny model (see the module docstring).
FLOAT32_PATHS = 64 * FLOAT32_EPS


def float32_approx(expected: float, *, floor: float = 1e-6):
    """``pytest.approx`` for a float32 result reached by another computation path.

    ``floor`` is the absolute tolerance for values near zero, where relative rounding says nothing.
    """
    return pytest.approx(expected, rel=FLOAT32_PATHS, abs=floor)
