"""The ``keep_base`` modes: what an adapter that keeps the base classes shares with them, and how files record it.

``True``: a branch from the lowest adapted layer beside the untouched base (the base classes exactly the base's);
``"head"``: the adapted trunk is shared and only the head is doubled; ``"classes"``: the adapted trunk and box branch
are shared and only the class branch is doubled. The shared modes keep the base classes approximately (trained with
``distill_base``). No dependency of its own: the injection layer and the families both read it.
"""

from __future__ import annotations

SHARED_TRUNK = "head"  # only the head is doubled; the adapted trunk feeds both heads
SHARED_BOXES = "classes"  # only the class branch is doubled; adapted trunk and box branch shared
SHARED_MODES = (SHARED_TRUNK, SHARED_BOXES)


def check_keep_base_mode(value: object, prefix: str = "") -> None:
    """One-line error for a ``keep_base`` value that is no mode (``prefix``: how the caller names the setting)."""
    if not (isinstance(value, bool) or value in SHARED_MODES):
        raise ValueError(f"{prefix}keep_base must be true, false, '{SHARED_TRUNK}' (only the head doubled: the "
                         f"adapted trunk shared) or '{SHARED_BOXES}' (only the class branch doubled: trunk and box "
                         f"branch shared); train the shared modes with distill_base. Not {value!r}.")


def keep_base_record(mode: bool | str) -> dict[str, str]:
    """What an adapter's ``keep_base`` record holds, beside layer and class count, for ``mode``."""
    return {"trunk": "shared", **({"boxes": "shared"} if mode == SHARED_BOXES else {})} if mode in SHARED_MODES else {}


def keep_base_mode(record: dict | None) -> bool | str:
    """The ``keep_base`` mode that an adapter's ``keep_base`` record stands for."""
    if not record:
        return False
    if record.get("trunk") != "shared":
        return True
    return SHARED_BOXES if record.get("boxes") == "shared" else SHARED_TRUNK
