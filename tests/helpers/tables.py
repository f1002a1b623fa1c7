"""Generated tabular data with features on very different scales, like scikit-learn's breast-cancer table."""

from __future__ import annotations

import numpy as np


def raw_scale_table(samples: int = 600, features: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes (about 63 % / 37 %), separable after standardising; raw features span 1e-3 .. 3e3.

    Every feature is positive with an offset several times its spread, as measurements are, so that an
    unscaled MLP sees inputs dominated by a few huge columns.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(samples) < 0.37).astype(np.int64)
    direction = rng.normal(0.0, 1.0, size=features)
    direction /= np.linalg.norm(direction)
    z = rng.normal(0.0, 1.0, size=(samples, features)) + np.outer(2.0 * y - 1.0, 1.6 * direction)
    scale = 10.0 ** rng.uniform(-3.0, 3.5, size=features)
    offset = scale * rng.uniform(3.0, 8.0, size=features)
    return (z * scale + offset).astype(np.float32), y
