"""Where a command may write: the one rule every snp-fast subcommand follows for its outputs.

Today: the checks on an output's place made before any work (its parent must be a folder one can
write in), and where an output lies relative to the command's inputs.
"""
import os
from typing import Optional

__all__ = ['OutputError', 'first_missing', 'check_parent', 'dir_is_free', 'inside']


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
    """Before any work: the nearest existing folder above `path` must be a writable folder."""
    missing = first_missing(path)
    parent = os.path.dirname(missing if missing is not None else os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f'{flag} {path}: {parent} is a file, not a folder')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f'{flag} {path}: {parent} is not writable')


def dir_is_free(path: str) -> bool:
    """Whether `path` does not exist or is an empty folder."""
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
