"""Per-iteration schedules: learning rate, weight decay, teacher momentum, teacher temperature.

Each schedule is a numpy array with one value per optimisation step, so a run resumed at step
k simply reads element k. The step-based functions are the primitives; the epoch-based ones
are thin wrappers (epochs * iters_per_epoch steps).

Reference conventions kept on purpose:
- the linear warm-up is `linspace(start, base, warmup_iters)`, which reaches `base` at the
  last warm-up step;
- the cosine part is `final + (base - final) * (1 + cos(pi * t / T)) / 2` for t = 0 .. T-1,
  so it approaches but never quite reaches `final`;
- the teacher temperature warms up per *epoch* (constant within an epoch) in the reference;
  `per_iteration=True` makes it a smooth per-step ramp instead.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule_steps(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from `start_warmup_value` to `base_value`, then cosine to `final_value`."""
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters must be in [0, total_iters], got {warmup_iters}")
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    t = np.arange(total_iters - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * t / len(t)))
    return np.concatenate((warmup, cosine))


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """`cosine_schedule_steps` with totals given in epochs; length epochs * iters_per_epoch."""
    _check_epochs(epochs, iters_per_epoch, warmup_epochs)
    return cosine_schedule_steps(
        base_value,
        final_value,
        total_iters=epochs * iters_per_epoch,
        warmup_iters=warmup_epochs * iters_per_epoch,
        start_warmup_value=start_warmup_value,
    )


def teacher_temp_schedule_steps(
    warmup_temp: float, final_temp: float, warmup_iters: int, total_iters: int
) -> np.ndarray:
    """Linear ramp from `warmup_temp` to `final_temp` over `warmup_iters` steps, then constant."""
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters must be in [0, total_iters], got {warmup_iters}")
    if warmup_temp <= 0 or final_temp <= 0:
        raise ValueError("teacher temperatures must be > 0")
    ramp = np.linspace(warmup_temp, final_temp, warmup_iters)
    return np.concatenate((ramp, np.full(total_iters - warmup_iters, float(final_temp))))


def teacher_temp_schedule(
    warmup_temp: float,
    final_temp: float,
    warmup_epochs: int,
    epochs: int,
    iters_per_epoch: int,
    *,
    per_iteration: bool = False,
) -> np.ndarray:
    """Teacher temperature per iteration (length epochs * iters_per_epoch).

    By default as the reference: the ramp `linspace(warmup_temp, final_temp, warmup_epochs)` is
    per epoch and held constant within each epoch. `per_iteration=True` ramps every step.
    """
    _check_epochs(epochs, iters_per_epoch, warmup_epochs)
    if per_iteration:
        return teacher_temp_schedule_steps(
            warmup_temp, final_temp, warmup_epochs * iters_per_epoch, epochs * iters_per_epoch
        )
    per_epoch = teacher_temp_schedule_steps(warmup_temp, final_temp, warmup_epochs, epochs)
    return np.repeat(per_epoch, iters_per_epoch)


def _check_epochs(epochs: int, iters_per_epoch: int, warmup_epochs: int) -> None:
    if epochs < 1 or iters_per_epoch < 1:
        raise ValueError(
            f"epochs and iters_per_epoch must be >= 1, got {epochs} and {iters_per_epoch}"
        )
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs], got {warmup_epochs}")
