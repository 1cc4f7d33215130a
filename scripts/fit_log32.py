"""Fit the polynomial of fastkl's float32 log (fastkl/kernels/fastmath.py, log_ratio32).

log(1 + r) = r + r**2 * P(r) for r in [2/3 - 1, 4/3 - 1), P of degree 7.
P is fitted for the relative error of log(1 + r) (weight r**2 / |log1p r|)
by Lawson's iteratively reweighted least squares, which converges to the
weighted minimax polynomial; the reference is mpmath at 40 digits. Prints
the coefficients rounded to float32 and the fit's maximum relative error.

    python scripts/fit_log32.py [degree]
"""

from __future__ import annotations

import sys

import mpmath
import numpy as np


def fit(degree: int = 7, nodes: int = 4000, iterations: int = 300) -> tuple[np.ndarray, float]:
    lo = float(np.float32(2 / 3)) - 1.0
    hi = float(np.nextafter(np.float32(4 / 3), np.float32(0))) - 1.0
    x = np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes) * (hi - lo) / 2 + (hi + lo) / 2
    x = x[np.abs(x) > 1e-6]
    with mpmath.workdps(40):
        g = np.array([float((mpmath.log1p(mpmath.mpf(v)) - v) / mpmath.mpf(v) ** 2) for v in x])
    vander = np.vander(x, degree + 1, increasing=True)
    weight = x**2 / np.abs(np.log1p(x))
    u = np.full(x.size, 1.0 / x.size)
    for _ in range(iterations):
        w = np.sqrt(u) * weight
        coef, *_ = np.linalg.lstsq(vander * w[:, None], g * w, rcond=None)
        err = np.abs(vander @ coef - g) * weight
        u *= err
        u /= u.sum()
    return coef.astype(np.float32), float(err.max())


if __name__ == "__main__":
    coef, err = fit(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
    for i, c in enumerate(coef):
        sign = "-" if c < 0 else ""
        print(f'_P{i} = np.float32({sign}float.fromhex("{float.hex(abs(float(c)))}"))')
    print(f"# max relative error of the fit (before float32 rounding): {err:.2e}")
