"""Fitting a training run to a wall-clock budget (`train.max_minutes` with `train.fit_budget`).

The first steps are timed and the whole configured schedule (learning rate, warmup, EMA, a stage's own step
settings) is compressed into as many actual steps as fit the budget. Each actual step stands for a *nominal* step
of the configured schedule; stages read their schedules at `nominal(step)`. Steps drift from their first timing
(clocks settle under sustained load, a discriminator or a text tower switches on), so they are timed again at a few
points and what is left is re-fitted, joined to the schedule so far without a jump. A step's cost is the median
of the timed steps' durations, so a stall of a few seconds (another process, the VM) does not shrink the rest of
the run: with the mean of a 12-step window, one such stall at a re-plan once cut a 20-minute denoiser run to 14
minutes (565 ms/step timed against ~260 before and after). The plan is kept in DIR/plan.json, so a resumed run
follows the same schedule.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable

from ldmkit.checkpoint import read_json, write_json
from ldmkit.train.distributed import all_reduce_mean

PLAN_FILE = "plan.json"
CALIB_SKIP, CALIB_STEPS = 3, 12  # steps left untimed (allocation, caches), then timed for the budget plan
BUDGET_RESERVE = 0.06  # share of the budget kept free (later steps that cost more, the final checkpoint)
REPLAN_FRACTIONS = (0.25, 0.5, 0.75)  # where in the first plan the steps are timed again and the rest re-fitted
PERIODIC_WINDOW = 256  # a periodic re-plan takes the median of up to this many latest step durations


def fit_to_budget(total: int, done: int, step_seconds: float, seconds_left: float) -> int:
    """How many steps a run can take: the `done` ones plus as many as fit `seconds_left` at `step_seconds` each,
    never more than `total`."""
    if step_seconds <= 0:
        return total
    return max(done + 1, min(total, done + int(max(0.0, seconds_left) / step_seconds)))


class BudgetPlan:
    """The actual steps of one run and the nominal step each stands for; times steps when fitting is on.

    Without fitting it is the identity plan (`total` = configured steps, `nominal(step)` = step)."""

    def __init__(self, nominal_total: int, budget_minutes: float, fitting: bool, t0: float,
                 plan_file: Path | None, say: Callable[[str], None]):
        self.nominal_total, self.total = nominal_total, nominal_total
        self.budget_minutes, self.fitting, self.t0 = budget_minutes, fitting, t0
        self.plan_file, self.say = plan_file, say
        self.ratio = self.first_ratio = 1.0  # nominal steps per actual step: now, and in the first plan
        self.segments: list[list[float]] = []  # re-plans: [actual step, nominal step, ratio] from that step on
        self._calibrating_from: int | None = None  # the first fit's timing starts CALIB_SKIP steps after this
        self._replan_at: int | None = None  # a re-plan's timing starts CALIB_SKIP steps after this step
        self._periodic: set[int] = set()  # steps of the first plan at REPLAN_FRACTIONS
        self._periodic_due = False  # a periodic step has passed; re-fit once CALIB_STEPS steps are timed
        self._stamps: list[float] = []  # start times of the steps timed for the next fit (the first one's onwards)
        self._resumed = False

    # -- the plan
    def resume_from(self, path: Path) -> None:
        """Take the plan a resumed run wrote (no new timing)."""
        plan = read_json(path)
        self._set_first(plan["steps"])
        self.total = int(plan["steps"])  # a re-planned run may end a step past the nominal count
        self.first_ratio = plan.get("first_ratio", self.first_ratio)
        self.segments = plan.get("segments", [])
        self.ratio = self.segments[-1][2] if self.segments else self.first_ratio
        self._resumed = True

    def nominal(self, step: int) -> float:
        """step * ratio, or after a re-plan its segment's start plus the steps since times that segment's ratio."""
        for a, n, r in reversed(self.segments):
            if step >= a:
                return n + (step - a) * r
        return step * self.first_ratio

    def _set_first(self, steps: int) -> None:
        self.total = max(1, min(int(steps), self.nominal_total))
        self.ratio = self.first_ratio = self.nominal_total / self.total

    def _refit(self, step: int, step_s: float, left: float) -> None:
        """From `step` on: as many steps as fit `left` seconds at `step_s`, covering the rest of the nominal
        schedule (never more steps than it has)."""
        here = self.nominal(step)
        rest = max(self.nominal_total - here, 0.0)
        fit = int(max(0.0, left) / step_s) if step_s > 0 else math.ceil(rest)
        n = max(1, min(fit, math.ceil(rest)))
        self.ratio = rest / n if rest > 0 else 1.0
        self.segments.append([step, here, self.ratio])
        self.total = step + n
        self._write(step_s)
        self.say(f"time budget re-planned at step {step}: {step_s * 1000:.0f} ms/step, {n} more steps for the "
                 f"rest of the schedule ({self.total} in all)")

    def _write(self, step_s: float) -> None:
        if self.plan_file is not None:
            write_json(self.plan_file, {"steps": self.total, "nominal_steps": self.nominal_total,
                                        "step_seconds": round(step_s, 4), "first_ratio": self.first_ratio,
                                        "segments": self.segments, "budget_minutes": self.budget_minutes})

    # -- timing inside the step loop
    def start(self, step: int) -> None:
        self._calibrating_from = step if self.fitting and not self._resumed else None

    def replan(self, step: int) -> None:
        """Steps from `step` on cost differently: time a few and re-fit (a no-op without fitting, and on a resumed
        run that already re-planned past this step)."""
        if not self.fitting or (self.segments and step <= self.segments[-1][0]):
            return
        self._replan_at = step  # replaces a pending periodic re-timing: the steps before this one cost differently

    def before_step(self, step: int) -> bool:
        """Time and re-fit around `step`; True when the plan changed (the caller refreshes its progress bar)."""
        if not self.fitting:
            return False
        first = self._calibrating_from
        if first is not None:  # the first fit: CALIB_STEPS steps timed after CALIB_SKIP untimed ones
            if step >= first + CALIB_SKIP:
                self._stamp()
            if step < first + CALIB_SKIP + CALIB_STEPS:
                return False
            step_s = self._timed()
            self._set_first(fit_to_budget(self.nominal_total, step, step_s, self._left()))
            self._calibrating_from = None
            self._write(step_s)
            self._periodic = {step + int(f * (self.total - step)) for f in REPLAN_FRACTIONS}
            self._stamps = self._stamps[-1:]  # periodic re-plans time every step from here
            self.say(f"time budget: {step_s * 1000:.0f} ms/step, so {self.total} of {self.nominal_total} steps "
                     f"fit {self.budget_minutes} min; the schedule is compressed {self.ratio:.2f}x (plan.json)")
            return True
        if self._replan_at is not None:  # the steps cost differently from here: time fresh ones
            if step == self._replan_at + CALIB_SKIP:
                self._stamps = []
            if step >= self._replan_at + CALIB_SKIP:
                self._stamp()
            if step < self._replan_at + CALIB_SKIP + CALIB_STEPS:
                return False
            self._replan_at, self._periodic_due = None, False
        else:
            if not self._stamps:  # no timing under way (a resumed run)
                return False
            self._stamp()
            self._periodic_due |= step in self._periodic
            if not (self._periodic_due and len(self._stamps) > CALIB_STEPS):
                return False
            self._periodic_due = False
        self._refit(step, self._timed(), self._left())
        self._stamps = self._stamps[-1:]
        return True

    def _stamp(self) -> None:
        self._stamps.append(time.perf_counter())
        del self._stamps[:-PERIODIC_WINDOW - 1]

    def _timed(self) -> float:
        """Median duration of the stamped steps, averaged over ranks: robust to a stall of a few steps."""
        durations = [b - a for a, b in zip(self._stamps, self._stamps[1:])]
        return all_reduce_mean({"s": statistics.median(durations)})["s"]

    def _left(self) -> float:
        return self.budget_minutes * 60 * (1 - BUDGET_RESERVE) - (time.perf_counter() - self.t0)
