"""Structure rules of the snp_fast package (issue 16), checked on the source by its AST; no module is imported.

    check(package_dir) -> {'private': [...], 'importlib': [...], 'cycles': [...], 'long': [...]}

- private:   a module uses another package module's `_private` name: `from X import _name`, or `mod._name` on a
             name bound by an import to a package module. Dunder names (`__version__`) are fine, and so is
             importing a private MODULE (`from . import _builder`: timm's layout for shared machinery).
- importlib: `importlib.import_module` / `__import__` of a package module with Python source, or of a name the
             AST cannot read (a computed string) — an import that no reader of the imports sees. A compiled
             extension (e.g. snp_fast._C, no .py source, loaded lazily so that the package imports without it)
             is not a module of the graph and is allowed.
- cycles:    cycles of the module import graph, counting imports at module level and inside functions.
             `import a.b.c` / `from a.b import c` give an edge to the module named (a.b.c), not to its parent
             packages, which Python runs first anyway; `from pkg import name` where name is not a module gives an
             edge to pkg (its __init__).
- long:      modules over `max_lines` lines.
"""
import ast
import os
from typing import Dict, List, Optional, Set, Tuple

__all__ = ['modules_of', 'check', 'import_graph', 'find_cycles']

MAX_LINES = 500


def modules_of(package_dir: str) -> Dict[str, str]:
    """{dotted module name: path} of every .py file under package_dir (its basename is the top-level name)."""
    package_dir = os.path.abspath(package_dir)
    top = os.path.basename(package_dir)
    out = {}
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != '__pycache__' and os.path.exists(os.path.join(root, d, '__init__.py')))
        rel = os.path.relpath(root, package_dir)
        parts = [top] + ([] if rel == '.' else rel.split(os.sep))
        for f in sorted(files):
            if f.endswith('.py'):
                name = parts if f == '__init__.py' else parts + [f[:-3]]
                out['.'.join(name)] = os.path.join(root, f)
    return out


def _is_package(path: str) -> bool:
    return os.path.basename(path) == '__init__.py'


def _absolute(module: str, path: str, level: int, target: Optional[str]) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module` (at `path`)."""
    if level == 0:
        return target or ''
    base = module.split('.') if _is_package(path) else module.split('.')[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return '.'.join(base + ([target] if target else []))


def _private(name: str) -> bool:
    return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


class _FileFacts:
    """What one module imports: edges to package modules, names bound to package modules, private uses."""

    def __init__(self, module: str, path: str, modules: Dict[str, str]):
        self.module, self.path, self.modules = module, path, modules
        with open(path, encoding='utf-8') as f:
            self.source = f.read()
        self.tree = ast.parse(self.source, filename=path)
        self.edges: Set[str] = set()
        self.bound: Dict[str, str] = {}  # local name -> package module it refers to
        self.private: List[str] = []
        self.dynamic: List[str] = []
        self._imports()
        self._attributes()
        self._import_calls()

    def _where(self, node: ast.AST) -> str:
        return f'{os.path.relpath(self.path)}:{node.lineno}'

    def _ours(self, name: str) -> bool:
        return name in self.modules

    def _imports(self) -> None:
        top = self.module.split('.')[0]
        for node in ast.walk(self.tree):  # module level and inside functions alike
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split('.')[0] != top:
                        continue
                    if self._ours(a.name):
                        self.edges.add(a.name)
                    # `import a.b.c` binds `a` (a chain a.b.c resolves through it); `import a.b.c as x` binds x
                    if a.asname:
                        self.bound[a.asname] = a.name
                    else:
                        self.bound[a.name.split('.')[0]] = top
            elif isinstance(node, ast.ImportFrom):
                src = _absolute(self.module, self.path, node.level, node.module)
                if src.split('.')[0] != top:
                    continue
                for a in node.names:
                    full = f'{src}.{a.name}'
                    if self._ours(full):  # a submodule
                        self.edges.add(full)
                        self.bound[a.asname or a.name] = full
                        continue
                    if self._ours(src):
                        self.edges.add(src)
                    if _private(a.name) and src != self.module and not self._is_private_module(full):
                        self.private.append(f'{self._where(node)}: from {src} import {a.name}')

    def _is_private_module(self, full: str) -> bool:
        """A private module without Python source beside the package's files (a compiled extension: _C.*.so)."""
        parent = self.modules.get(full.rsplit('.', 1)[0])
        if parent is None or not _is_package(parent):
            return False
        leaf = full.rsplit('.', 1)[1]
        folder = os.path.dirname(parent)
        return any(f.startswith(leaf + '.') and f.endswith(('.so', '.pyd')) for f in os.listdir(folder))

    def _resolve(self, node: ast.AST) -> Optional[str]:
        """The package module an expression names (a bound name, or an attribute chain through it), else None."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value)
            if base is not None and self._ours(f'{base}.{node.attr}'):
                return f'{base}.{node.attr}'
        return None

    def _attributes(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                mod = self._resolve(node.value)
                full = f'{mod}.{node.attr}'
                if mod is not None and mod != self.module and not self._ours(full) \
                        and not self._is_private_module(full):
                    self.private.append(f'{self._where(node)}: {mod}.{node.attr}')

    def _import_calls(self) -> None:
        top = self.module.split('.')[0]
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name not in ('import_module', '__import__'):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                target = arg.value
                if target.startswith('.'):
                    level = len(target) - len(target.lstrip('.'))
                    target = _absolute(self.module, self.path, level, target.lstrip('.') or None)
                if target.split('.')[0] == top and self._ours(target):
                    self.dynamic.append(f'{self._where(node)}: {name}({arg.value!r})')
                    self.edges.add(target)
            else:  # a computed name: no reader of the imports can tell what it loads
                self.dynamic.append(f'{self._where(node)}: {name}({ast.unparse(arg)})')


def _facts(package_dir: str) -> Dict[str, _FileFacts]:
    modules = modules_of(package_dir)
    return {m: _FileFacts(m, p, modules) for m, p in modules.items()}


def import_graph(package_dir: str) -> Dict[str, Set[str]]:
    """{module: package modules it imports} (self-imports left out)."""
    return {m: ff.edges - {m} for m, ff in _facts(package_dir).items()}


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth = the longest import chain: small
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def check(package_dir: str, max_lines: int = MAX_LINES) -> Dict[str, List]:
    facts = _facts(package_dir)
    long: List[Tuple[str, int]] = []
    for _, ff in sorted(facts.items()):
        n = len(ff.source.splitlines())
        if n > max_lines:
            long.append((os.path.relpath(ff.path), n))
    return {
        'private': sorted(v for ff in facts.values() for v in ff.private),
        'importlib': sorted(v for ff in facts.values() for v in ff.dynamic),
        'cycles': find_cycles({m: ff.edges - {m} for m, ff in facts.items()}),
        'long': long,
    }
