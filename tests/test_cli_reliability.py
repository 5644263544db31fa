"""The command line never loses a user's file and says exit 2 (not a traceback) for bad input (issue 20).

Every case runs through snp_fast.cli.main() in-process. "Before any compute" is checked by replacing the
compute (load_calib, prune, finetune, bench.compare, export_onnx) with a function that fails the test.
"""
import json
import os

import pytest
import torch

import snp_fast
from snp_fast import cli

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
TINY_NAME = 'vit_tiny_patch16_224'
TINY_KW = json.dumps(TINY)
PRUNE = ['prune', TINY_NAME, '--model-kwargs', TINY_KW, '--ratios', '0.5', '--num-calib', '2', '--quiet']
FT_FAST = ['--data', 'digits', '--epochs', '1', '--limit-train', '64', '--limit-val', '32', '--batch-size', '32']


def main_rc(capsys, *args):
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def tiny_model(**kw):
    import timm
    torch.manual_seed(0)
    return timm.create_model(TINY_NAME, pretrained=False, **dict(TINY, **kw)).eval()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A tiny ViT checkpoint, broken variants of it, checkpoints of other patch / image sizes, a pruned folder."""
    d = tmp_path_factory.mktemp('rel')
    sd = tiny_model().state_dict()
    torch.save(sd, d / 'ok.pth')
    nan = {k: v.clone() for k, v in sd.items()}
    nan['blocks.0.mlp.fc1.weight'][0, 0] = float('nan')
    torch.save(nan, d / 'nan.pth')
    inf = {k: v.clone() for k, v in sd.items()}
    inf['head.bias'][3] = float('inf')
    torch.save(inf, d / 'inf.pth')
    torch.save({k: v.double() for k, v in sd.items()}, d / 'f64.pth')
    torch.save({k: (v * 100).long() for k, v in sd.items()}, d / 'i64.pth')
    torch.save(tiny_model(patch_size=4).state_dict(), d / 'patch4.pth')
    torch.save(tiny_model(img_size=64).state_dict(), d / 'img64.pth')
    pruned, _ = snp_fast.prune(tiny_model(), torch.randn(4, 3, 32, 32), ratios=0.5)
    snp_fast.save_pruned(pruned, str(d / 'pruned'))
    return d


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """The shipped digits ViT (teacher) and a folder with it pruned at 50 %."""
    from snp_fast.demo import digits_data, load_digits_vit
    d = tmp_path_factory.mktemp('digits')
    teacher = load_digits_vit()
    student, _ = snp_fast.prune(teacher, digits_data()[0][:16], ratios=0.5, refit=False)
    snp_fast.save_pruned(student, str(d / 'pruned'))
    return teacher, d / 'pruned'


def snapshot(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def no_compute(*_a, **_k):
    raise AssertionError('compute started before the output was checked')


# ------------------------------------------------------------------------------------------------
# 1. bench --json: an existing file is refused without --overwrite; the pruned folder's files never

def test_bench_json_refuses_existing_file(files, capsys, tmp_path):
    bench = ['bench', files / 'pruned', '--batch', '1', '--repeats', '1', '--warmup', '0', '--quiet']
    (tmp_path / 'rows.json').write_text('precious')
    rc, text = main_rc(capsys, *bench, '--json', tmp_path / 'rows.json')
    assert rc == 2 and '--json' in text and '--overwrite' in text, text
    assert (tmp_path / 'rows.json').read_text() == 'precious'
    rc, text = main_rc(capsys, *bench, '--json', tmp_path / 'rows.json', '--overwrite')
    assert rc == 0, text
    assert json.loads((tmp_path / 'rows.json').read_text())['rows']


@pytest.mark.parametrize('name', ['model.safetensors', 'recipe.json'])
def test_bench_json_never_over_the_pruned_folder(name, files, capsys):
    before = snapshot(files / 'pruned')
    for extra in ([], ['--overwrite']):
        rc, text = main_rc(capsys, 'bench', files / 'pruned', '--batch', '1', '--repeats', '1', '--warmup', '0',
                           '--quiet', '--json', files / 'pruned' / name, *extra)
        assert rc == 2 and '--json' in text, text
    assert snapshot(files / 'pruned') == before
    snp_fast.load_pruned(str(files / 'pruned'))


def test_export_never_over_the_pruned_folder(files, capsys, monkeypatch):
    import snp_fast.export
    monkeypatch.setattr(snp_fast.export, 'export_onnx', no_compute)
    before = snapshot(files / 'pruned')
    rc, text = main_rc(capsys, 'export', files / 'pruned', '--onnx', files / 'pruned' / 'model.safetensors',
                       '--overwrite')
    assert rc == 2 and '--onnx' in text, text
    assert snapshot(files / 'pruned') == before


# ------------------------------------------------------------------------------------------------
# 2. --overwrite never deletes an input of the command nor a file the command did not write

def previous_model(folder, files):
    """`folder` holding a model written by an earlier run."""
    import shutil
    shutil.copytree(files / 'pruned', folder)


def test_prune_overwrite_keeps_ratios_inside_out(files, capsys, tmp_path):
    out = tmp_path / 'x'
    previous_model(out, files)
    (out / 'ratios.json').write_text('{"qk": 0.5, "v": 0.5, "mlp": 0.5}')
    before = snapshot(out)
    rc, text = main_rc(capsys, *PRUNE[:4], '--ratios', out / 'ratios.json', '--num-calib', 2, '--quiet',
                       '--out', out, '--overwrite')
    assert rc == 2 and '--ratios' in text and 'inside --out' in text, text
    assert snapshot(out) == before


def test_finetune_overwrite_keeps_teacher_weights_inside_out(digits, capsys, tmp_path, monkeypatch):
    import shutil
    from safetensors.torch import save_file
    import snp_fast.finetune
    monkeypatch.setattr(snp_fast.finetune, 'finetune', no_compute)
    teacher, pruned = digits
    out = tmp_path / 'y'
    shutil.copytree(pruned, out)
    save_file(teacher.state_dict(), str(out / 'teacher.safetensors'))
    before = snapshot(out)
    rc, text = main_rc(capsys, 'finetune', pruned, *FT_FAST, '--teacher-weights', out / 'teacher.safetensors',
                       '--out', out, '--overwrite', '--checkpoint-dir', tmp_path / 'ck')
    assert rc == 2 and '--teacher-weights' in text and 'inside --out' in text, text
    assert snapshot(out) == before


def test_overwrite_refuses_a_folder_with_other_files(files, capsys, tmp_path, monkeypatch):
    import snp_fast.calib
    monkeypatch.setattr(snp_fast.calib, 'load_calib', no_compute)
    out = tmp_path / 'z'
    previous_model(out, files)
    (out / 'notes.txt').write_text('precious')
    (out / 'sub').mkdir()
    before = sorted(os.listdir(out))
    rc, text = main_rc(capsys, *PRUNE, '--out', out, '--overwrite')
    assert rc == 2 and '--out' in text and 'notes.txt' in text, text
    assert sorted(os.listdir(out)) == before and (out / 'notes.txt').read_text() == 'precious'


@pytest.mark.parametrize('where', ['cwd', 'ancestor'])
def test_out_dot_overwrite_never_empties_the_current_directory(where, capsys, tmp_path, monkeypatch):
    import snp_fast.calib
    monkeypatch.setattr(snp_fast.calib, 'load_calib', no_compute)
    (tmp_path / 'notes.txt').write_text('precious')
    (tmp_path / 'work').mkdir()
    monkeypatch.chdir(tmp_path if where == 'cwd' else tmp_path / 'work')
    rc, text = main_rc(capsys, *PRUNE, '--out', '.' if where == 'cwd' else '..', '--overwrite')
    assert rc == 2 and '--out' in text and 'current directory' in text, text
    assert (tmp_path / 'notes.txt').read_text() == 'precious' and (tmp_path / 'work').is_dir()


def test_overwrite_replaces_a_model_folder(files, capsys, tmp_path):
    """What --overwrite is for still works: a folder of an earlier run is replaced."""
    out = tmp_path / 'm'
    previous_model(out, files)
    (out / 'attention.png').write_bytes(b'old picture')
    rc, text = main_rc(capsys, *PRUNE, '--checkpoint', files / 'ok.pth', '--out', out, '--overwrite')
    assert rc == 0, text
    assert sorted(os.listdir(out)) == ['model.safetensors', 'recipe.json', 'report.json']
    assert json.loads((out / 'report.json').read_text())['cli']['weights'] == str(files / 'ok.pth')


# ------------------------------------------------------------------------------------------------
# 3. an unwritable output place fails before any compute

@pytest.mark.parametrize('cmd', ['prune', 'finetune', 'bench', 'export'])
def test_unwritable_output_fails_before_compute(cmd, files, digits, capsys, monkeypatch, tmp_path):
    import snp_fast.bench
    import snp_fast.calib
    import snp_fast.export
    import snp_fast.finetune
    for mod, name in ((snp_fast.calib, 'load_calib'), (snp_fast.finetune, 'finetune'), (snp_fast.bench, 'compare'),
                      (snp_fast.export, 'export_onnx')):
        monkeypatch.setattr(mod, name, no_compute)
    args, flag = {
        'prune': ([*PRUNE, '--out', '/proc/snp_fast_x'], '--out'),
        'finetune': (['finetune', digits[1], *FT_FAST, '--out', '/proc/snp_fast_x', '--checkpoint-dir',
                      tmp_path / 'ck'], '--out'),
        'bench': (['bench', files / 'pruned', '--json', '/proc/snp_fast_x/rows.json'], '--json'),
        'export': (['export', files / 'pruned', '--onnx', '/proc/snp_fast_x.onnx'], '--onnx'),
    }[cmd]
    rc, text = main_rc(capsys, *args)
    assert rc == 2 and flag in text and '/proc' in text, text
    assert 'Traceback' not in text


# ------------------------------------------------------------------------------------------------
# 4. + 5. bad weights, bad model arguments, a bad device: exit 2 with the argument named, no traceback

@pytest.mark.parametrize('case', ['nan', 'inf', 'float64', 'int64', 'patch_size', 'img_size', 'img_size_7', 'meta'])
def test_bad_model_input_is_exit_2(case, files, capsys, tmp_path):
    extra, expect = {
        'nan': (['--checkpoint', files / 'nan.pth'], ['--checkpoint', 'blocks.0.mlp.fc1.weight', 'NaN']),
        'inf': (['--checkpoint', files / 'inf.pth'], ['--checkpoint', 'head.bias', 'Inf']),
        'float64': (['--checkpoint', files / 'f64.pth'], ['--checkpoint', 'float64']),
        'int64': (['--checkpoint', files / 'i64.pth'], ['--checkpoint', 'int64']),
        # another patch size / image size: refused, not resampled by timm's checkpoint_filter_fn
        'patch_size': (['--checkpoint', files / 'patch4.pth'],
                       ['--checkpoint', 'patch_embed.proj.weight (64, 3, 4, 4) -> (64, 3, 8, 8)', 'pos_embed']),
        'img_size': (['--checkpoint', files / 'img64.pth'], ['--checkpoint', 'pos_embed (1, 65, 64) -> (1, 17, 64)']),
        'img_size_7': (['--model-kwargs', '{"img_size": 7}'], ['--model-kwargs', 'input size']),
        'meta': (['--device', 'meta'], ['--device']),
    }[case]
    rc, text = main_rc(capsys, *PRUNE, *extra, '--out', tmp_path / 'o')
    assert rc == 2, text
    assert 'Traceback' not in text and 'internal error' not in text, text
    for e in expect:
        assert e in text, (e, text)
    assert not (tmp_path / 'o').exists()


# ------------------------------------------------------------------------------------------------
# 6. --num-calib far above what fits is refused before anything is built

def test_num_calib_above_memory_is_refused(capsys, tmp_path, monkeypatch):
    """(The cap is snp_fast.calib's, checked on the first image; the pruning itself must never start.)"""
    monkeypatch.setattr(snp_fast, 'prune', no_compute)
    rc, text = main_rc(capsys, 'prune', 'deit_tiny_patch16_224', '--preset', 'deit_tiny_patch16_224', '--quiet',
                       '--num-calib', 1000000, '--out', tmp_path / 'o')
    assert rc == 2 and '--num-calib 1000000' in text and 'at most' in text, text
    assert 'Traceback' not in text and not (tmp_path / 'o').exists()
