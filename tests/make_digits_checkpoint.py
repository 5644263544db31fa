"""Re-create tests' digits checkpoint: snp_fast/data/digits_vit.safetensors.

    python tests/make_digits_checkpoint.py      # seed 0, 60 epochs, ~1 min on 2 CPU cores

The checkpoint is snp_fast.demo.train_digits_vit(seed=0) (config snp_fast.demo.DIGITS_VIT); it reached
96.0 % on the 500 held-out digits when committed (torch 2.14.1, 2 threads).
"""
import os

import torch
from safetensors.torch import save_file

from snp_fast.demo import accuracy, train_digits_vit

if __name__ == '__main__':
    torch.set_num_threads(2)
    model, (_, _, x_te, y_te) = train_digits_vit(seed=0)
    out = os.path.join(os.path.dirname(__file__), '..', 'snp_fast', 'data', 'digits_vit.safetensors')
    save_file(model.state_dict(), out, metadata={'seed': '0', 'test_accuracy': f'{accuracy(model, x_te, y_te):.4f}'})
    print(f'wrote {out}: test accuracy {accuracy(model, x_te, y_te):.2%}')
