"""One live training run per run folder: a lock file in the folder, held from set-up to the end of training.

Two runs in one folder (``exist_ok=True``, or a resume while the run still trains) would interleave
``results.csv`` and overwrite each other's checkpoints. The lock is created atomically (``O_EXCL``) and names its
holder (pid and host); a lock whose process is dead (a run killed with ``kill -9``) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

LOCK_NAME = ".visionpeft.lock"
_HELD: set[str] = set()  # lock files this process holds: a lock naming our own pid but not held is a stale one


class RunFolderLockedError(RuntimeError):
    """Another live training run holds the run folder."""


def _holder(path: Path) -> dict | None:
    """The lock's content; ``None`` if it vanished; ``{}`` if it is still being written (or unreadable)."""
    for _ in range(20):  # its creator writes the content right after creating it
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            text = ""
        try:
            info = json.loads(text)
            if isinstance(info, dict):
                return info
        except json.JSONDecodeError:
            pass
        time.sleep(0.05)
    return {}


def _alive(info: dict, path: Path) -> bool:
    """Whether the lock's holder still runs (a holder on another host, or an unreadable lock, counts as alive)."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int):
        return not (info == {} and time.time() - path.stat().st_mtime > 60)  # an empty lock left by a crash
    if pid == os.getpid():
        return str(path) in _HELD  # our pid, not held by us: left by an earlier process (a restarted container)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _take_over(path: Path, stale: dict) -> None:
    """Remove a stale lock, unless another process replaced it in the meantime (then put theirs back)."""
    grave = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, grave)  # atomic: of several processes taking over, one moves the stale lock
    except FileNotFoundError:
        return
    if _holder(grave) != stale:  # we moved a fresh lock that replaced the stale one after we read it
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
    grave.unlink(missing_ok=True)


def describe(info: dict) -> str:
    if not info:
        return "an unknown process"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"


def acquire(run_dir: str | Path) -> Path:
    """Lock ``run_dir`` (created if needed) for this process; returns the lock file.

    Raises :class:`RunFolderLockedError` if a live run holds it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and _alive(holder, path):
                raise RunFolderLockedError(
                    f"Run folder '{run_dir}' is in use by another training run ({describe(holder)}): wait for it "
                    f"to finish, or pick another name=... (if no run trains there, delete '{path}').") from None
            if holder is not None:
                _take_over(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        _HELD.add(str(path))
        return path
    raise RunFolderLockedError(f"Could not lock run folder '{run_dir}': its lock '{path}' keeps changing; "
                               "another run is starting there. Pick another name=... or retry.")


def release(path: str | Path | None) -> None:
    """Remove a lock this process holds (a no-op for ``None``, or a lock taken over by another process)."""
    if path is None or str(path) not in _HELD:
        return
    _HELD.discard(str(path))
    holder = _holder(Path(path))
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)


def lock_run_folder(args: Any) -> Path:
    """Lock the run folder of Ultralytics trainer ``args`` (settled ones, before ``BaseTrainer.__init__`` makes the
    folder) and pin ``args.save_dir`` to it; returns the lock file.

    A new numbered folder (``exist_ok=False``) that another run took a moment earlier is skipped for the next one;
    a folder asked for by name (``exist_ok``, ``save_dir``, ``resume``) raises :class:`RunFolderLockedError`.
    """
    from ultralytics.cfg import get_save_dir

    for _ in range(100):
        save_dir = get_save_dir(args)  # as BaseTrainer.__init__ computes it: numbered unless exist_ok
        try:
            lock = acquire(save_dir)
        except RunFolderLockedError:
            if args.exist_ok or getattr(args, "save_dir", None) or args.resume:
                raise
            continue  # get_save_dir now numbers past that folder
        args.save_dir = str(save_dir)  # else BaseTrainer.__init__ would number past the folder just made
        return lock
    raise RunFolderLockedError(f"No free run folder next to '{save_dir}': pick another name=...")
