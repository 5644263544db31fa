"""Evaluation on an image folder (snp_fast.evaluate) with timm's reader and transforms: the shipped digits ViT on
its 500 held-out digits written as PNG class folders gives exactly the in-memory accuracy of the same pixels;
unreadable files are skipped and counted; bad folders are refused by name."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from snp_fast.calib import data_config
from snp_fast.demo import digits_data, load_digits_vit
from snp_fast.evaluate import evaluate_folder


def write_digits(root, n=None):
    """The held-out digits as 8-bit PNGs in one folder per class ('0' .. '9'); returns the pixels and labels."""
    _, _, x, y = digits_data()
    if n:
        x, y = x[:n], y[:n]
    pixels = np.clip(np.round((x[:, 0].numpy() * 0.4 + 0.3) * 255), 0, 255).astype(np.uint8)
    for i, (p, label) in enumerate(zip(pixels, y.tolist())):
        d = os.path.join(root, str(label))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(p, mode='L').save(os.path.join(d, f'{i:04d}.png'))
    return pixels, y


def digits_config(model):
    return dict(data_config(model), mean=(0.3,), std=(0.4,), crop_pct=1.0, interpolation='bilinear')


def test_folder_accuracy_equals_the_in_memory_accuracy_of_the_same_pixels(tmp_path):
    model = load_digits_vit()
    pixels, y = write_digits(str(tmp_path))
    res = evaluate_folder(model, str(tmp_path), batch_size=64, workers=2, config=digits_config(model))
    x = (torch.tensor(pixels, dtype=torch.float32)[:, None] / 255 - 0.3) / 0.4
    with torch.no_grad():
        logits = model(x)
    assert res.images == 500 and res.skipped == 0
    assert res.top1 == int((logits.argmax(1) == y).sum()) / 500
    assert res.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert res.top5 >= res.top1 > 0.95


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    model = load_digits_vit()
    write_digits(str(tmp_path), n=40)
    with open(tmp_path / '3' / 'broken.png', 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n not really')
    res = evaluate_folder(model, str(tmp_path), batch_size=16, workers=0, config=digits_config(model))
    assert res.skipped == 1 and res.images == 40


def test_bad_folders_are_refused_by_name(tmp_path):
    model = load_digits_vit()
    cfg = digits_config(model)
    with pytest.raises(ValueError, match='does not exist'):
        evaluate_folder(model, str(tmp_path / 'nope'), config=cfg)
    (tmp_path / 'flat').mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), mode='L').save(tmp_path / 'flat' / 'a.png')
    with pytest.raises(ValueError, match='no class sub-folders'):
        evaluate_folder(model, str(tmp_path / 'flat'), config=cfg)
    few = tmp_path / 'few'
    for c in ('a', 'b', 'c'):
        (few / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8), mode='L').save(few / c / 'x.png')
    with pytest.raises(ValueError, match='the model has 10 outputs but the data has 3 classes'):
        evaluate_folder(model, str(few), config=cfg, workers=0)


def test_eval_command_on_a_pruned_folder_and_a_timm_checkpoint(tmp_path):
    """The CLI: a pruned folder evaluates with the preprocessing its recipe recorded (no flags), a timm name with
    its checkpoint; --json writes the numbers; a missing data folder is exit 2."""
    import json
    import snp_fast
    from safetensors.torch import save_file
    from snp_fast.cli import main
    model = load_digits_vit()
    data = tmp_path / 'val'
    write_digits(str(data), n=60)
    x_tr = digits_data()[0][:32]
    pruned, _ = snp_fast.prune(model, x_tr, 0.25)
    snp_fast.save_pruned(pruned, str(tmp_path / 'pruned'))
    flags = ['--mean', '0.3', '--std', '0.4', '--crop-pct', '1.0', '--interpolation', 'bilinear', '-j', '0',
             '--no-progress']
    out = ['--json', str(tmp_path / 'p.json')]
    assert main(['eval', str(tmp_path / 'pruned'), '--data', str(data)] + out + flags) == 0
    save_file(model.state_dict(), str(tmp_path / 'digits.safetensors'))
    kwargs = json.dumps({k: v for k, v in snp_fast.demo.DIGITS_VIT.items()})
    assert main(['eval', 'vit_tiny_patch16_224', '--model-kwargs', kwargs, '--checkpoint',
                 str(tmp_path / 'digits.safetensors'), '--data', str(data), '--json', str(tmp_path / 'o.json')]
                + flags) == 0
    p, o = (json.loads((tmp_path / f).read_text()) for f in ('p.json', 'o.json'))
    assert p['images'] == o['images'] == 60 and o['top1'] > 0.9 and p['top1'] > 0.85
    want = evaluate_folder(model, str(data), config=digits_config(model), workers=0)
    assert o['top1'] == want.top1 and o['top5'] == want.top5
    assert main(['eval', str(tmp_path / 'pruned'), '--data', str(tmp_path / 'none')]) == 2
