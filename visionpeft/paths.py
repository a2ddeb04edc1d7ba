"""Files given as a path or as a bare name in a known folder (base weights, training configs, dataset YAMLs).

One rule for all of them, so a name means the same thing wherever it is accepted: a path with a folder part is used
as given; a bare name is tried in the current directory, then in the known folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from . import settings


def find_file(source: str | Path, folder: Path, what: str, hint: str | Callable[[], str],
              suffixes: Sequence[str] = (), known: Sequence[str] | None = None) -> Path:
    """The resolved file ``source`` names: a path, or a bare name found in ``folder``, there with each of
    ``suffixes`` appended unless its suffix is one of ``known`` (default: ``suffixes``): ``crops`` -> ``crops.yaml``.

    Otherwise FileNotFoundError: ``<what> '<source>' not found (looked in: ...). <hint>``; ``hint`` may be a
    function (a listing of ``folder``, computed only on failure).
    """
    p = Path(source).expanduser()
    candidates = [p]
    if not p.is_absolute() and p.parent == Path("."):
        known = suffixes if known is None else known
        names = [p.name] if not suffixes or p.suffix in known else [f"{p.name}{s}" for s in suffixes]
        candidates += [folder / n for n in names]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise FileNotFoundError(f"{what} '{source}' not found (looked in: {looked}). {hint() if callable(hint) else hint}")


def resolve_weights(source: str | Path) -> Path:
    """A weights file given as a path, or as a bare name found in the assets' ``weights/`` folder."""
    return find_file(source, settings.weights_dir(), "Base weights",
                     f"Pass an existing path, or set {settings.ASSETS_ENV} to the folder whose weights/ holds it.")
