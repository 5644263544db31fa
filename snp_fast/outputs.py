"""Where a command may write: the one rule every snp-fast subcommand follows for its outputs.

The rule, checked before any work (plan_dir for a model folder, plan_file for a single file):

1. The place must be writable: the nearest existing folder above the output is probed by creating (and
   removing) a temporary folder in it, so that `--out /proc/x` fails at once, not after the compute.
2. An existing output is refused unless overwrite=True (an empty folder counts as free).
3. Overwriting never destroys an input of the same command: an output file may not be an input file nor an
   existing file inside an input folder (`bench DIR --json DIR/model.safetensors`); an output folder may not
   contain an input (`prune --ratios out/r.json --out out --overwrite`).
4. Overwriting never deletes a file the command did not create: a folder is replaced only when all it holds
   are files of a model folder (MODEL_FILES, as written by snp_fast.save_pruned); anything else in it (a
   user's file, a sub-folder) is named and the command is refused.
5. The current directory, or a folder that contains it, is never an output folder: replacing it would
   leave the shell in a deleted folder (and `--out . --overwrite` would empty it).

The writing itself is atomic: a model folder is written beside its destination and swapped in by
snp_fast.io.save_pruned, a file through a temporary file and a rename (write_file), so a failure leaves
what was there before.
"""
import os
import tempfile
from typing import Iterable, Optional, Sequence, Tuple

__all__ = ['OutputError', 'MODEL_FILES', 'plan_dir', 'plan_file', 'write_file', 'write_atomic', 'current_umask', 'first_missing', 'check_parent',
           'dir_is_free', 'inside']

# What a model folder written by snp_fast holds (save_pruned's files, report.json, prune --plot's picture):
# the only files an --overwrite may replace.
MODEL_FILES = ('model.safetensors', 'recipe.json', 'report.json', 'attention.png')

Inputs = Sequence[Tuple[str, Optional[str]]]


class OutputError(ValueError):
    """An output that may not be written there; the message names the argument (flag) and the path."""


def first_missing(path: str) -> Optional[str]:
    """The outermost folder above `path` that does not exist yet (None: its parent exists): what creating
    `path`'s folders would make, and what a failure must remove again."""
    made = None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        made, parent = parent, os.path.dirname(parent)
    return made


def check_parent(path: str, flag: str) -> None:
    """Before any work: the nearest existing folder above `path` must be a folder one can create files in
    (probed with a temporary folder: permissions alone do not say it, e.g. for root in /proc)."""
    missing = first_missing(path)
    parent = os.path.dirname(missing if missing is not None else os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f'{flag} {path}: {parent} is a file, not a folder')
    try:
        probe = tempfile.mkdtemp(prefix='.snp_fast_probe_', dir=parent)
    except OSError as e:
        raise OutputError(f'{flag} {path}: cannot write in {parent} ({e.strerror or e})') from None
    try:
        os.rmdir(probe)
    except OSError:  # (gone already: what counts is that it could be made)
        pass


def dir_is_free(path: str) -> bool:
    """Whether `path` does not exist or is an empty folder."""
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def plan_dir(path: str, flag: str, *, overwrite: bool, inputs: Inputs = (),
             replaceable: Iterable[str] = MODEL_FILES) -> str:
    """Check an output folder before any work (the rule above); its absolute path.

    Args:
        path: the folder the command will write (replaced as a whole by save_pruned).
        flag: its name in messages, e.g. '--out'.
        overwrite: whether an existing non-empty folder may be replaced.
        inputs: (flag, path) of every input of the command (None: not given); none may lie inside `path`.
        replaceable: the file names `path` may hold for an overwrite to replace it.

    Raises:
        OutputError: the message names `flag` (or the input's flag) and the path.
    """
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f'{flag} {path}: exists and is not a directory')
    if inside(os.getcwd(), out):
        raise OutputError(f'{flag} {path}: is the current directory or contains it; the output folder is replaced '
                          f'as a whole, so name a folder of its own (e.g. {flag} ./model)')
    check_parent(out, flag)
    for iflag, ipath in inputs:
        if ipath is not None and inside(ipath, out):
            raise OutputError(f'{iflag} {ipath}: inside {flag} {path}, which the output replaces; '
                              'keep the inputs outside the output folder')
    if dir_is_free(out):
        return out
    if not overwrite:
        raise OutputError(f'{flag} {path}: exists and is not empty (pass --overwrite to replace it)')
    foreign = sorted(set(os.listdir(out)) - set(replaceable))
    if foreign:
        raise OutputError(f'{flag} {path}: holds {", ".join(foreign[:5])}{" ..." if len(foreign) > 5 else ""}, which '
                          f'the command did not write; --overwrite replaces only a model folder '
                          f'({", ".join(replaceable)}): move them or choose another folder')
    return out


def plan_file(path: str, flag: str, *, overwrite: bool, inputs: Inputs = ()) -> str:
    """Check an output file before any work (the rule above); its absolute path.

    An input given as a folder protects every file that exists in it (a new file beside them is allowed).

    Raises:
        OutputError: the message names `flag` and the path (and the input it would destroy).
    """
    out = os.path.abspath(path)
    if os.path.isdir(out):
        raise OutputError(f'{flag} {path}: is a directory')
    check_parent(out, flag)
    if os.path.lexists(out):
        for iflag, ipath in inputs:
            if ipath is not None and (os.path.isdir(ipath) and inside(out, ipath) or
                                      os.path.exists(ipath) and os.path.exists(out) and os.path.samefile(out, ipath)):
                raise OutputError(f'{flag} {path}: would replace ' +
                                  (f'a file of {iflag} {ipath}' if os.path.isdir(ipath) else f'the input {iflag}') +
                                  '; write it elsewhere')
        if not overwrite:
            raise OutputError(f'{flag} {path}: exists (pass --overwrite to replace it)')
    return out


def write_file(path: str, data: bytes) -> None:
    """Write `data` to a path checked by plan_file: through a temporary file beside it and a rename."""
    write_atomic(path, data)


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only set it)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it and a rename: never half-written."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.snp_fast_', dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

