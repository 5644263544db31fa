"""The structure rules (tests/structure_rules.py) on small synthetic packages: each rule finds what it should
and nothing else. Not marked xfail, unlike test_structure.py, which applies them to snp_fast."""
import textwrap

import pytest

import structure_rules


def make_package(tmp_path, files, name='pkg'):
    """Write {relative path: source} as a package under tmp_path; returns the package folder."""
    root = tmp_path / name
    for rel, src in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    for d in [root, *[p for p in root.rglob('*') if p.is_dir()]]:
        (d / '__init__.py').touch()
    return str(root)


def test_clean_package_passes(tmp_path):
    pkg = make_package(tmp_path, {
        '__init__.py': '__version__ = "1"\nfrom .a import f\n',
        'a.py': 'from .b import g\nfrom . import _builder\n\ndef f():\n    return g() + _builder.h()\n',
        'b.py': 'import os\n\ndef g():\n    from .sub import c\n    return c.k()\n\ndef _private():\n    return 1\n',
        '_builder.py': 'def h():\n    return 1\n',  # a private MODULE is fine (timm's layout)
        'sub/c.py': 'from ..b import g\n\ndef k():\n    return 2\n',  # b -> sub.c only inside a function, c -> b
    })
    found = structure_rules.check(pkg)
    assert found['private'] == [] and found['importlib'] == [] and found['long'] == []
    assert found['cycles'] == [['pkg.b', 'pkg.sub.c']]  # the import inside a function counts


def test_private_name_imports_and_attributes_are_found(tmp_path):
    pkg = make_package(tmp_path, {
        'a.py': 'def _x():\n    pass\n_Y = 1\n',
        'b.py': 'from .a import _x\nfrom . import __version__\n',                       # 1
        'c.py': 'from . import a\n\ndef f():\n    return a._Y + a.__name__.__len__()\n',  # 2 (dunder fine)
        'd.py': 'import pkg.a\nimport pkg.a as alias\nv = pkg.a._Y\nw = alias._x\n',   # 3, 4
        'e.py': 'def f():\n    from pkg.a import _Y as y\n    return y\n',               # 5, inside a function
        'f.py': '_mine = 1\nfrom .f import _mine as again\n',                           # its own: fine
    })
    found = structure_rules.check(pkg)['private']
    assert len(found) == 5, found
    assert any('b.py:1: from pkg.a import _x' in v for v in found)
    assert any('c.py:4: pkg.a._Y' in v for v in found)
    assert any('d.py:3: pkg.a._Y' in v for v in found) and any('d.py:4: pkg.a._x' in v for v in found)
    assert any('e.py:2: from pkg.a import _Y' in v for v in found)


def test_importlib_of_own_modules_is_found(tmp_path):
    pkg = make_package(tmp_path, {
        'a.py': 'x = 1\n',
        'b.py': 'import importlib\nm = importlib.import_module("pkg.a")\n',              # 1 (and an edge)
        'c.py': 'from importlib import import_module\nm = import_module(__package__ + ".a")\n',  # 2: computed
        'd.py': 'import importlib\nm = importlib.import_module("json")\nn = importlib.import_module("pkg._C")\n',
        'e.py': 'import importlib\nm = importlib.import_module(".a", __package__)\n',   # 3: relative
    })
    (tmp_path / 'pkg' / '_C.cpython-311-x86_64-linux-gnu.so').write_bytes(b'')  # a compiled extension: allowed
    found = structure_rules.check(pkg)['importlib']
    assert len(found) == 3, found
    assert [v.split(':')[0].rsplit('/', 1)[-1] for v in found] == ['b.py', 'c.py', 'e.py']
    assert structure_rules.import_graph(pkg)['pkg.b'] == {'pkg.a'}


def test_cycles_at_module_level_and_through_packages(tmp_path):
    pkg = make_package(tmp_path, {
        '__init__.py': 'from .x import run\n',
        'x.py': 'from . import __version__\n\ndef run():\n    pass\n',         # x -> pkg (its __init__) -> x
        'p.py': 'import pkg.q\n',
        'q.py': 'from .r import z\n',
        'r.py': 'from pkg import p\nz = 1\n',                                   # p -> q -> r -> p
        'ok.py': 'from .models import m\n',                                     # ok -> models.m, not models
        'models/m.py': 'import pkg.ok\n',                                       # a cycle: ok <-> models.m
        'models/__init__.py': 'from . import m\n',
    })
    cycles = structure_rules.check(pkg)['cycles']
    assert cycles == [['pkg', 'pkg.x'], ['pkg.models.m', 'pkg.ok'], ['pkg.p', 'pkg.q', 'pkg.r']], cycles


def test_long_modules_are_found(tmp_path):
    pkg = make_package(tmp_path, {'short.py': 'x = 1\n' * 500, 'long.py': 'x = 1\n' * 501})
    long = structure_rules.check(pkg)['long']
    assert [(p.rsplit('/', 1)[-1], n) for p, n in long] == [('long.py', 501)]
    assert structure_rules.check(pkg, max_lines=1000)['long'] == []


@pytest.mark.parametrize('graph, cycles', [
    ({'a': {'b'}, 'b': {'c'}, 'c': set()}, []),
    ({'a': {'b'}, 'b': {'a'}, 'c': {'a'}}, [['a', 'b']]),
    ({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'e'}, 'e': {'d'}}, [['a', 'b', 'c'], ['d', 'e']]),
])
def test_find_cycles(graph, cycles):
    assert structure_rules.find_cycles(graph) == cycles
