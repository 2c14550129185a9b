"""Suite-wide settings: GPU tests skip with a stated reason where JAX sees no NVIDIA GPU."""

import jax
import pytest


def _gpu_reason():
    try:
        devices = jax.devices()
    except RuntimeError as e:  # no backend at all
        return f"needs an NVIDIA GPU; jax.devices() failed: {e}"
    if devices[0].platform != "gpu":
        return f"needs an NVIDIA GPU; jax {jax.__version__} sees {devices[0].platform} only"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
