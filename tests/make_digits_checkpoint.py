"""Re-create tests' digits checkpoint: snp_fast/data/digits_vit.safetensors.

    python tests/make_digits_checkpoint.py      # seed 0, 80 epochs, ~4-7 min on 2 CPU cores

The checkpoint is snp_fast.demo.train_digits_vit(seed=0) (config snp_fast.demo.DIGITS_VIT); it reached
96.6 % on the 500 held-out digits when committed (torch 2.14.1). Weights are stored as float16
(2.4 MB); loaded back as float32 they give the same 96.6 %.
"""
import os

import torch
from safetensors.torch import save_file

from snp_fast.demo import accuracy, train_digits_vit

if __name__ == '__main__':
    torch.set_num_threads(2)
    model, (_, _, x_te, y_te) = train_digits_vit(seed=0)
    out = os.path.join(os.path.dirname(__file__), '..', 'snp_fast', 'data', 'digits_vit.safetensors')
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out, metadata={'seed': '0', 'epochs': '80', 'test_accuracy': f'{accuracy(model, x_te, y_te):.4f}'})
    print(f'wrote {out}: test accuracy {accuracy(model, x_te, y_te):.2%}')
