import os

# Triton runs on the CPU only under its interpreter, which must be chosen before any @triton.jit
# function is defined (i.e. before snp_fast.ops is imported).
if not os.environ.get('CUDA_VISIBLE_DEVICES') == '' and os.path.exists('/dev/nvidia0'):
    pass
else:
    os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
