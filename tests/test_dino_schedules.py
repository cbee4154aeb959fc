"""Per-iteration schedules against values computed from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dino_cluster.dino.schedules import (
    cosine_schedule,
    cosine_schedule_steps,
    teacher_temp_schedule,
    teacher_temp_schedule_steps,
)
from dino_cluster.spec import OptimSpec


def cosine_value(base, final, t, length):
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / length))


def test_lr_schedule_warmup_and_cosine_values():
    # 10 epochs x 5 iterations, 2 warm-up epochs: 10 warm-up steps, 40 cosine steps
    peak = OptimSpec(base_lr=5e-4, global_batch=1024).peak_lr  # linear scaling: x 1024/256
    assert peak == pytest.approx(0.002)
    lr = cosine_schedule(peak, 1e-6, epochs=10, iters_per_epoch=5, warmup_epochs=2)
    assert lr.shape == (50,)
    assert lr[0] == 0.0  # warm-up starts at 0
    assert lr[4] == pytest.approx(peak * 4 / 9)  # linspace(0, peak, 10)
    assert lr[9] == pytest.approx(peak)  # warm-up endpoint reaches the peak
    assert lr[10] == pytest.approx(peak)  # cosine starts at the peak
    assert lr[30] == pytest.approx((peak + 1e-6) / 2)  # cosine midpoint (t = 20 of 40)
    assert lr[49] == pytest.approx(cosine_value(peak, 1e-6, 39, 40))  # final step
    assert lr[49] > 1e-6 and lr[49] < 1.1e-5
    assert np.all(np.diff(lr[10:]) <= 0)


def test_weight_decay_and_momentum_schedules():
    wd = cosine_schedule(0.04, 0.4, epochs=4, iters_per_epoch=25)
    assert wd[0] == pytest.approx(0.04)
    assert wd[50] == pytest.approx(0.22)  # midpoint of 0.04 -> 0.4
    assert wd[99] == pytest.approx(cosine_value(0.04, 0.4, 99, 100))
    assert np.all(np.diff(wd) >= 0)
    mom = cosine_schedule(0.996, 1.0, epochs=4, iters_per_epoch=25)
    assert mom[0] == pytest.approx(0.996)
    assert mom[50] == pytest.approx(0.998)
    assert mom[-1] == pytest.approx(cosine_value(0.996, 1.0, 99, 100))
    assert mom.max() < 1.0


def test_epoch_schedule_is_a_wrapper_of_the_step_schedule():
    by_epoch = cosine_schedule(
        1.0, 0.1, epochs=7, iters_per_epoch=3, warmup_epochs=2, start_warmup_value=0.5
    )
    by_step = cosine_schedule_steps(
        1.0, 0.1, total_iters=21, warmup_iters=6, start_warmup_value=0.5
    )
    np.testing.assert_array_equal(by_epoch, by_step)
    assert by_step[0] == 0.5
    steps_only = cosine_schedule_steps(2.0, 0.0, total_iters=7, warmup_iters=3)
    np.testing.assert_allclose(steps_only[:3], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(steps_only[3:], [cosine_value(2.0, 0.0, t, 4) for t in range(4)])


def test_teacher_temperature_warmup_per_epoch_as_reference():
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, epochs=100, iters_per_epoch=4)
    assert temps.shape == (400,)
    per_epoch = temps.reshape(100, 4)
    assert np.all(per_epoch == per_epoch[:, :1])  # constant within an epoch
    for epoch in (0, 1, 15, 29):
        assert per_epoch[epoch, 0] == pytest.approx(0.04 + 0.03 * epoch / 29)
    assert per_epoch[29, 0] == pytest.approx(0.07)
    assert np.all(per_epoch[30:] == 0.07)
    no_warmup = teacher_temp_schedule(0.04, 0.04, warmup_epochs=0, epochs=3, iters_per_epoch=2)
    np.testing.assert_array_equal(no_warmup, np.full(6, 0.04))


def test_teacher_temperature_per_iteration_and_steps():
    temps = teacher_temp_schedule(
        0.04, 0.07, warmup_epochs=2, epochs=5, iters_per_epoch=3, per_iteration=True
    )
    np.testing.assert_allclose(temps[:6], 0.04 + 0.03 * np.arange(6) / 5)
    np.testing.assert_array_equal(temps[6:], np.full(9, 0.07))
    steps = teacher_temp_schedule_steps(0.04, 0.07, warmup_iters=6, total_iters=15)
    np.testing.assert_array_equal(steps, temps)


@pytest.mark.parametrize(
    "call",
    [
        lambda: cosine_schedule(1, 0, epochs=0, iters_per_epoch=5),
        lambda: cosine_schedule(1, 0, epochs=2, iters_per_epoch=5, warmup_epochs=3),
        lambda: cosine_schedule_steps(1, 0, total_iters=5, warmup_iters=-1),
        lambda: teacher_temp_schedule(0.0, 0.07, 1, 2, 2),
    ],
)
def test_schedule_argument_errors(call):
    with pytest.raises(ValueError):
        call()
