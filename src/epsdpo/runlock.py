"""One writer per run directory (or output file), and a clean slate when overwriting is asked for.

**The lock.** :func:`run_dir_lock` holds ``OUTPUT_DIR/.epsdpo.lock`` for the whole run (:func:`output_file_lock`:
``.NAME.lock`` beside an output file such as ``epsdpo generate``'s ``pairs.jsonl``). The file is held with an
exclusive ``flock``, which the kernel drops when the process ends however it ends, and it names its holder: process
id, host, start time and command. A second writer is refused with those details. The lock is released, and its file
removed, when the block ends: normally, by an exception, by Ctrl-C, or by SIGTERM (turned into ``SystemExit`` while
the lock is held). A lock file left behind (by SIGKILL or a crash) whose process no longer runs on this host is taken
over with a warning; one written on another host is refused, since its process cannot be checked from here, unless
``EPSDPO_BREAK_LOCK=1`` is set. In one process the lock is re-entrant (``epsdpo train`` evaluates its own run), and
only the main process of a distributed launch (``RANK`` 0) takes it.

**Whose directory.** :func:`claim_run_dir` refuses a directory that holds files but no run of the kind expected (so a
typo in ``output_dir`` cannot mix a run into someone's folder), and with ``overwrite=True`` moves everything an
earlier run left there into ``OUTPUT_DIR/.replaced-<time>/`` before the new run writes, so nothing of it can be
resumed, rotated or appended to. Nothing is deleted: remove that folder once it is not needed. Log files (``*.log``)
are left where they are either way: the launcher of the new run may be writing into one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from epsdpo.errors import UserError

__all__ = [
    "BREAK_LOCK_ENV",
    "LOCK_NAME",
    "OutputDirError",
    "RunDirInUseError",
    "check_writable_dir",
    "claim_run_dir",
    "output_file_lock",
    "run_dir_lock",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".epsdpo.lock"
REPLACED_PREFIX = ".replaced-"
#: set to 1 to take over a lock written on another host (after making sure its run is gone)
BREAK_LOCK_ENV = "EPSDPO_BREAK_LOCK"

#: lock files this process holds -> how many nested holders
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


class RunDirInUseError(UserError):
    """Another process writes into this run directory (or output file) now."""


class OutputDirError(UserError):
    """The output directory cannot be used: a file, not writable, or holding something that is not a run."""


# ---- writable directories ---------------------------------------------------------------------------------------
def check_writable_dir(directory: Path, option: str = "output_dir") -> None:
    """Create ``directory`` (and parents) if needed and prove that a file can be written there; an
    :class:`OutputDirError` names ``option`` (the key the user set) otherwise."""
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"{option}={str(directory)!r} is a file, not a directory; give a directory path.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".epsdpo-write-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError) as err:
        blocking = next((p for p in (directory, *directory.parents) if p.is_file()), directory)
        raise OutputDirError(
            f"{option}={str(directory)!r} cannot be created: {blocking} is a file; give a directory path."
        ) from err
    except OSError as err:
        raise OutputDirError(
            f"{option}={str(directory)!r} is not writable ({err.strerror or err}); choose a directory you can write "
            "to, or fix its permissions."
        ) from err


# ---- the lock --------------------------------------------------------------------------------------------------
def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
    }


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that is taking the lock right now"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}, command: "
        f"{holder.get('command')}"
    )


def _read_holder(fd: int) -> dict[str, Any]:
    data = os.pread(fd, 1 << 16, 0)
    try:
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": None, "host": None, "started": None, "command": f"(unreadable lock file: {data[:80]!r})"}
    return holder if isinstance(holder, dict) else {}


def _pid_running(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _acquire(path: Path, what: str) -> int:
    """The descriptor of ``path``, flock-ed and holding this process's details; raises if someone else holds it."""
    force = os.environ.get(BREAK_LOCK_ENV, "") not in ("", "0")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUseError(
                f"{what} is in use by another run: {_describe(holder)}. Wait for it to finish, or choose another "
                f"output. (Lock file: {path})"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its holder removed it between our open and our flock: take the lock afresh
            os.close(fd)
            continue
        holder = _read_holder(fd)
        if holder:
            here = socket.gethostname()
            if holder.get("host") != here and not force:
                os.close(fd)
                raise RunDirInUseError(
                    f"{what} is locked by a run on another host: {_describe(holder)}. Its process cannot be checked "
                    f"from {here}; if that run is over, set {BREAK_LOCK_ENV}=1 to take the lock over (or remove "
                    f"{path})."
                )
            if holder.get("host") != here:
                why = f"{BREAK_LOCK_ENV} is set"
            elif _pid_running(holder.get("pid")):
                why = "that process id now belongs to another process, which does not hold the lock"
            else:
                why = "that process is no longer running"
            logger.warning("%s: taking over a stale lock left by %s (%s)", what, _describe(holder), why)
        data = json.dumps(_holder()).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return fd


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While the block runs, SIGTERM (if nobody handles it) raises ``SystemExit(143)``, so ``finally`` blocks run."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def hold_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (see the module docstring) for the block; ``what`` names the locked thing."""
    key = os.path.realpath(path)
    with _HELD_GUARD:
        nested = key in _HELD
        if nested:
            _HELD[key] += 1
    if nested or not _is_main_process():
        try:
            yield
        finally:
            if nested:
                with _HELD_GUARD:
                    _HELD[key] -= 1
        return
    fd = _acquire(path, what)
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        with _sigterm_as_exit():
            yield
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding it: a waiter that opened the old file sees it gone and retries
        os.close(fd)


def run_dir_lock(directory: str | Path, option: str = "output_dir") -> contextlib.AbstractContextManager[None]:
    """Hold ``DIRECTORY/.epsdpo.lock`` for the block (the directory is created, and checked to be writable)."""
    directory = Path(directory)
    check_writable_dir(directory, option)
    return hold_lock(directory / LOCK_NAME, str(directory))


def output_file_lock(output: str | Path, option: str = "output") -> contextlib.AbstractContextManager[None]:
    """Hold ``.NAME.lock`` beside the output file ``output`` for the block (its directory is created if needed)."""
    output = Path(output)
    if output.is_dir():
        raise OutputDirError(f"{option}={str(output)!r} is a directory; give the path of a file to write.")
    check_writable_dir(output.parent, f"the directory of {option}")
    return hold_lock(output.with_name(f".{output.name}.lock"), str(output))


# ---- whose directory --------------------------------------------------------------------------------------------
def _contents(directory: Path) -> list[Path]:
    """What a directory holds but the lock, earlier ``.replaced-*`` folders and log files: a ``*.log`` file may be
    the one the launcher of this very run writes into (``epsdpo train … > OUTPUT_DIR/train.log``), so it neither
    makes a directory foreign nor is moved aside."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.name != LOCK_NAME and not p.name.startswith(REPLACED_PREFIX) and not (p.is_file() and p.suffix == ".log")
    )


def _move_aside(directory: Path, entries: list[Path], what: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = directory / f"{REPLACED_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"{REPLACED_PREFIX}{stamp}-{n}"
    target.mkdir()
    for entry in entries:
        entry.rename(target / entry.name)
    names = ", ".join(p.name for p in entries[:6]) + (", …" if len(entries) > 6 else "")
    logger.warning(
        "overwrite_output_dir=true: moved the earlier %s in %s (%s) to %s; nothing of it is resumed or appended to. "
        "Delete that folder when you no longer need it.",
        what,
        directory,
        names,
        target,
    )
    return target


def claim_run_dir(
    directory: str | Path,
    *,
    overwrite: bool,
    is_run: Callable[[Path], bool],
    what: str = "run",
    resuming: bool = False,
    main: bool = True,
) -> Path | None:
    """Make ``directory`` ready for a new run (call it while holding the lock, before the run writes).

    - ``overwrite``: everything there but the lock is moved into ``.replaced-<time>/`` (on the ``main`` process);
      returns that folder (None when there was nothing). Refused together with ``resuming`` (they contradict).
    - otherwise a directory holding files for which ``is_run(directory)`` is false is refused; an earlier run is
      left for the caller (resume, or refuse a finished run).

    Every process may call it (the checks read only); only ``main`` moves anything.
    """
    directory = Path(directory)
    if overwrite and resuming:
        raise OutputDirError(
            f"overwrite_output_dir=true asks to replace the run in {directory}, and resume_from_checkpoint to continue "
            "it; set only one of them."
        )
    entries = _contents(directory)
    if not entries:
        return None
    if overwrite:
        return _move_aside(directory, entries, what) if main else None
    if not is_run(directory):
        names = ", ".join(p.name for p in entries[:5]) + (", …" if len(entries) > 5 else "")
        raise OutputDirError(
            f"{directory} holds files ({names}) but no {what}; choose a new or empty directory, or set "
            f"overwrite_output_dir=true to move its contents into {directory}/{REPLACED_PREFIX}<time>/ first."
        )
    return None
