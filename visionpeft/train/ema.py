"""The EMA's time constant for short fine-tunes.

Ultralytics' ``ModelEMA`` ramps its decay as ``0.9999 * (1 - exp(-updates / 2000))``, sized for hundreds of epochs
on COCO. A fine-tune on a few hundred images makes far fewer optimizer steps (crop_weed at 256 px, 6 epochs, batch
16, ``nbs`` 64: about 86), so its decay never passes ~0.04 and the "EMA" it validates and saves is the last step's
weights. ``ema_tau: auto`` scales the time constant to the run instead: a third of its optimizer steps, so the final
average is over roughly the last sixth of the run (decay 0.95 at the end).
"""

from __future__ import annotations

import math

ULTRALYTICS_TAU = 2000.0  # ultralytics.utils.torch_utils.ModelEMA's default
AUTO = "auto"


class EmaDecay:
    """``ModelEMA.decay`` with another time constant (a class, not a lambda, so the trainer stays picklable)."""

    def __init__(self, tau: float, decay: float = 0.9999) -> None:
        self.tau, self.decay = float(tau), decay

    def __call__(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.tau))


def check_ema_tau(value: object) -> None:
    """One-line error unless ``value`` is ``None`` (Ultralytics' EMA), ``"auto"`` or a positive number."""
    if value is None or value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"ema_tau must be 'auto' (a third of the run's optimizer steps), a positive number of "
                         f"optimizer steps, or null (Ultralytics' {ULTRALYTICS_TAU:g}), not {value!r}.")


def run_updates(epochs: int, batches: int, accumulate: int) -> int:
    """The optimizer steps of a run after warm-up: ``epochs`` x ``batches`` per epoch / ``accumulate``."""
    return max(1, math.ceil(epochs * batches / max(accumulate, 1)))


def ema_tau(setting: float | str, updates: int) -> float:
    """The time constant for ``setting`` (``"auto"``: a third of ``updates``, the run's optimizer steps)."""
    check_ema_tau(setting)
    return max(updates / 3.0, 1.0) if setting == AUTO else float(setting)


def set_ema_timescale(trainer) -> str | None:
    """Give ``trainer.ema`` the time constant of ``trainer.ema_tau`` (its EMA weights and update count stay, so a
    resumed run continues the same average); returns the line to log, ``None`` when there is no EMA or setting."""
    setting = getattr(trainer, "ema_tau", None)
    if setting is None or getattr(trainer, "ema", None) is None:
        return None
    updates = run_updates(trainer.epochs, len(trainer.train_loader), trainer.accumulate)
    tau = ema_tau(setting, updates)
    trainer.ema.decay = EmaDecay(tau)
    end = trainer.ema.decay(updates)
    return (f"EMA time constant {tau:.0f} optimizer steps for ~{updates} in this run (decay {end:.3f} at the end; "
            f"Ultralytics' {ULTRALYTICS_TAU:g} would give {EmaDecay(ULTRALYTICS_TAU)(updates):.3f})")
