import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: a loaded 2-core box stays usable

import pytest
import torch

# Deterministic, and fair to a 2-core machine.
torch.manual_seed(0)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_cfg():
    from scratch_sd.config import tiny

    return tiny()


@pytest.fixture(scope="session")
def sd15_cfg():
    from scratch_sd.config import sd15

    return sd15()
