"""Suite-wide settings: eager flow kernels unless a test asks for compilation; a one-thread fixture.

torch.compile takes tens of seconds per new shape on a small CPU, which would dominate a suite
of many tiny images; the compiled path has its own tests that turn it back on.
"""

import os

import pytest
import torch

os.environ.setdefault("TWOSTREAM_NO_COMPILE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    on a shared 2-core machine two spinning threads make tiny models and convolutions 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
