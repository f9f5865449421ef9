import pytest
import torch

# Input notebooks of the build_labs tests, not notebooks to run (nbmake would collect them).
collect_ignore = ["fixtures"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the test models are tiny, and on a shared 2-core machine more
    threads only oversubscribe it (two threads were seen to run 50x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
