"""Fonts for Ultralytics without the network: ``check_font`` (every ``check_det_dataset`` call, and plot labels) asks
GitHub for ``Arial.ttf`` unless a file of that name sits in Ultralytics' ``USER_CONFIG_DIR``. Training, export and
validation all need it, so it lives beside the other leaf helpers, not in the training package.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write_bytes

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # the names Ultralytics looks up


def local_font() -> Path:
    """DejaVu Sans, which matplotlib (an Ultralytics dependency) ships with every install."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def ensure_fonts(config_dir: str | Path | None = None) -> list[Path]:
    """Put a local font where Ultralytics looks for ``Arial.ttf``/``Arial.Unicode.ttf``, unless one is there.

    ``config_dir`` defaults to Ultralytics' ``USER_CONFIG_DIR`` (which ``YOLO_CONFIG_DIR`` moves). DejaVu Sans
    covers Latin, Greek and Cyrillic labels; CJK class names draw as boxes instead of triggering a download.
    """
    if config_dir is None:
        from ultralytics.utils import USER_CONFIG_DIR as config_dir
    written = []
    for name in FONT_NAMES:
        dst = Path(config_dir) / name
        if not dst.exists():
            try:
                written.append(atomic_write_bytes(dst, local_font().read_bytes()))
            except OSError as e:  # a read-only config dir: plots fall back to PIL's default font
                from ultralytics.utils import LOGGER

                LOGGER.warning(f"visionpeft: could not place a local font at '{dst}' ({e}); Ultralytics may try to "
                               "download Arial.ttf.")
    return written
