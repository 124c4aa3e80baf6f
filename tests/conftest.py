import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The safety net under the recorder (zygote_torch/ad/safety.py) is always on in the tests: a
# kernel reading a tensor being differentiated outside any recorded call fails the test.
os.environ.setdefault("ZYGOTE_TORCH_CHECK_UNSEEN", "1")


@pytest.fixture
def float64():
    """Every tensor of a test in float64 (restored after it, for the other tests)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
