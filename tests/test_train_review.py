"""A review of training's core loop: the schedule's ends, accumulation, resume (tiny, in-process checks)."""

from __future__ import annotations

import pytest

from tests.test_train import FittedRun


def test_a_fit_that_shrinks_below_the_warmup_after_the_first_still_decays_to_min_lr() -> None:
    # The first fit left warmup 50 of 211 steps; the machine then got 10x slower at step 20 and 44 steps fit. The
    # warmup was cut only at the first fit, so the run ended still warming up, at 90% of the peak rate.
    run = FittedRun(step=6, warmup=50)
    run.fit(step_s=1.0, remaining_s=216.0)
    assert run.total_steps == 211 and run.warmup == 50
    run.state.step = 20
    run.fit(step_s=10.0, remaining_s=260.0)
    rates = [run.rate(step) for step in range(20, run.total_steps)]
    assert run.total_steps == 44 and rates[-1] == pytest.approx(0.1)
    assert run.warmup == 22 and max(rates) == pytest.approx(1.0)  # cut to half the new length: it peaks, then decays
