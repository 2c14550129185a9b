"""Differences between the jax versions gdn-jax supports (0.10.2 through 0.12), in one place."""

from __future__ import annotations

import jax
import numpy as np

def concrete_value(x):
    """x as a NumPy array when its value is known at trace time (an eager call), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
