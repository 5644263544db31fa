"""The two small real-data tasks that ship with snp_fast, their trained ViT fixtures, and sample photos.

The CLI (`finetune --data digits|faces`), the demo, the quality harness and the tests use these:

- digits: scikit-learn's handwritten digits, `digits_vit.safetensors` (`load_digits_vit()`) and
  `swin_digits.safetensors` (`load_digits_swin()`),
- faces: scikit-image's LFW face / non-face subset and `faces_vit.safetensors` (`load_faces_vit()`),
- `sample_photos()`: real photos shipped with scikit-learn / scikit-image, ImageNet-normalised.

The .safetensors files are package data (pyproject.toml, [tool.setuptools.package-data]); the scripts that
re-create them are tests/make_digits_checkpoint.py, tests/make_swin_digits_checkpoint.py and
tests/make_faces_checkpoint.py.
"""
from .digits import (DIGITS_SWIN, DIGITS_VIT, digits_data, digits_swin, digits_vit, load_digits_swin, load_digits_vit,
                     train_digits_swin, train_digits_vit)
from .faces import FACES_VIT, faces_crop, faces_data, faces_vit, load_faces_vit, train_faces_vit
from .photos import sample_photos
from .train import accuracy, train_classifier

__all__ = ['DIGITS_VIT', 'digits_data', 'digits_vit', 'load_digits_vit', 'train_digits_vit', 'DIGITS_SWIN',
           'digits_swin', 'load_digits_swin', 'train_digits_swin',
           'FACES_VIT', 'faces_data', 'faces_vit', 'load_faces_vit', 'faces_crop', 'train_faces_vit',
           'sample_photos', 'accuracy', 'train_classifier']
