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


@pytest.fixture(scope="session")
def tiny_refs():
    """diffusers' / transformers' tiny networks on the zoo's seeded weights (parity.references)."""
    from parity.references import build_references, quiet_libraries

    quiet_libraries()
    return build_references("tiny")


def scratch_from(refs, exact: bool = False) -> dict:
    """Fresh float32 scratch networks holding `refs`' weights (the `scratch` candidate's conversion)."""
    from parity.pipelines import scratch_networks

    return scratch_networks(refs, exact)
