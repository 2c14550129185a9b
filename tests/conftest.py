"""Suite-wide settings: GPU tests skip with a stated reason where JAX sees no NVIDIA GPU.

Eight host (CPU) devices for the tensor-parallel tests (tests/models/test_tensor_parallel.py):
`--xla_force_host_platform_device_count=8` is added to XLA_FLAGS here, before jax is imported,
unless XLA_FLAGS already sets a device count. It only affects the CPU platform; every other test
keeps running on the first device.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

# Each pytest-xdist worker (`pytest -m gpu -n 6`) is a process with its own JAX client: none may
# take 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module. The whole suite runs in one process
    (609 tests), and with every module's executables kept, jax 0.10.2's CPU compiler segfaulted
    late in the run (tests/test_speculative.py, twice, at tests that pass alone)."""
    yield
    jax.clear_caches()
    import gc
    gc.collect()
