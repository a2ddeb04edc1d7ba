"""Exported files appear together or not at all: they are built in a hidden folder beside their destination and
moved in when all are written. Shared by the ONNX pipeline and the edge formats (a leaf module, so neither imports
the other for it).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A temporary folder inside ``folder`` to build a set of files in (the caller moves them out when all are
    written); removed afterwards, with ``folder`` itself if it was made for it, so a failure leaves no half set."""
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=".visionpeft-export-"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if the export left nothing in it


def replace_dir(src: Path, dst: Path) -> Path:
    """Move folder ``src`` onto ``dst``; an existing ``dst`` is swapped out first and removed only afterwards."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        dst.rename(old / dst.name)
    try:
        src.rename(dst)
    except BaseException:
        if old is not None:
            (old / dst.name).rename(dst)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dst
