"""Errors meant for the person running a command: the ``epsdpo`` CLI prints them as one message, no traceback.

:class:`UserError` is the base of every such error (a bad config, bad data, a run directory in use, a full disk, …);
its message says what happened and what to do. :func:`disk_full_guard` turns the many shapes a full disk takes
(``OSError`` ENOSPC, safetensors' and torch's own wrappers) into one :class:`DiskFullError` naming the directory.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DiskFullError", "UserError", "disk_full_guard", "is_disk_full"]

#: below this much free space a write failure that carries no error number (torch's) is taken for a full disk
_NEARLY_FULL_BYTES = 64 * 2**20


class UserError(Exception):
    """A failure the user can act on; the message says what happened and what to do (no traceback needed)."""


class DiskFullError(UserError, OSError):
    """A write failed because the file system holding ``directory`` has no space left."""

    def __init__(self, message: str, directory: Path) -> None:
        super().__init__(message)
        self.directory = directory
        self.errno = errno.ENOSPC

    def __str__(self) -> str:
        return str(self.args[0])


def _free_bytes(directory: Path) -> int | None:
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(err: BaseException, directory: Path) -> bool:
    """Whether ``err``, raised while writing into ``directory``, means that its disk is full.

    ``OSError`` carries ENOSPC (or EDQUOT, a quota); safetensors says ``No space left on device (os error 28)`` in
    its message; torch's archive writer says only ``unexpected pos``, so there the free space decides."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    if isinstance(err, RuntimeError) and "inline_container" in text:
        free = _free_bytes(directory)
        return free is not None and free < _NEARLY_FULL_BYTES
    return False


@contextlib.contextmanager
def disk_full_guard(directory: Path, what: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block that writes ``what`` into ``directory``; a full disk becomes a :class:`DiskFullError` that says
    so and names the directory, after ``cleanup()`` (e.g. removing a half-written ``.partial`` directory) ran.
    Other errors pass through unchanged (``cleanup`` runs for them too)."""
    try:
        yield
    except BaseException as err:
        if cleanup is not None:
            cleanup()
        if not isinstance(err, Exception) or not is_disk_full(err, directory):
            raise
        free = _free_bytes(directory)
        left = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
        raise DiskFullError(
            f"disk full: writing {what} into {directory} failed, no space left on its file system{left}. Free some "
            "space (or choose a directory on another disk) and run again; nothing half-written was kept.",
            directory,
        ) from err
