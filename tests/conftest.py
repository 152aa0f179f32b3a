import os

import pytest
import torch

# Triton kernels run in the interpreter when there is no GPU; the flag must be set before any kernel
# module is imported, so it is set here, before collection of any test module
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
