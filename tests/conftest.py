import os

import pytest
import torch

# Triton runs on the CPU only under its interpreter, which must be chosen before any @triton.jit
# function is defined (i.e. before snp_fast.ops is imported).
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
