import sys
from pathlib import Path

import pytest
import torch

# The tests import small shared modules (tests/toys.py) by name.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = usefixtures("one_thread")``).

    Their tensors are tiny: a second thread gains nothing, and on a busy machine its OpenMP
    barrier waits turned a 0.6 s test into 14 s.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
