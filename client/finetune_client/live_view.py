"""The live view ``ftj run`` and ``ftj wait`` draw while a job trains: pure rendering, then redrawing in place.

    support-bot  Running  attempt 0, 0 restarts
    [##########..........]  120/400  30.0%  ETA 1m40s
    loss      2.3141  ▇▆▅▅▄▃▃▂▂▁
    eval loss 2.4012  ▅▄▃▂
    tokens/s  812
    event     Normal Started: attempt 0: 1 pod(s) created

On a terminal the block is redrawn in place; otherwise a line is printed when the step or phase changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from finetune_client.job_view import Job

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """The whole series as at most ``width`` bars scaled between its minimum and maximum; a longer series is
    averaged over ``width`` equal spans of its points, so the bars show the whole curve, not its end."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) > width:
        spans = [finite[len(finite) * i // width:len(finite) * (i + 1) // width] for i in range(width)]
        finite = [sum(span) / len(span) for span in spans]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = high - low
    return "".join(SPARK[0 if span == 0 else round((v - low) / span * (len(SPARK) - 1))] for v in finite)


def progress_bar(percent: float, width: int = 30) -> str:
    filled = max(0, min(width, int(width * percent / 100)))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


Points = list[tuple[int, float]]


@dataclass
class Series:
    """Loss and eval loss by step: seeded from the run's history.jsonl when it can be read, then one point per
    change seen in the job's status. A step lower than the last one (a gang restart resumed from an earlier
    checkpoint) drops the points after it, as history.jsonl does."""

    loss_points: Points = field(default_factory=list)
    eval_points: Points = field(default_factory=list)
    _last: tuple[int, float | None, float | None] | None = None

    @property
    def loss(self) -> list[float]:
        return [value for _, value in self.loss_points]

    @property
    def eval_loss(self) -> list[float]:
        return [value for _, value in self.eval_points]

    def seed(self, history: Sequence[dict[str, Any]]) -> None:
        """Take the curve from history.jsonl's entries; points seen in the status after its last step stay."""
        for points, key in ((self.loss_points, "loss"), (self.eval_points, "evalLoss")):
            stored = [(int(e["step"]), float(e[key])) for e in history
                      if isinstance(e.get("step"), int) and isinstance(e.get(key), int | float)]
            last = stored[-1][0] if stored else -1
            points[:] = stored + [(step, value) for step, value in points if step > last]

    def observe(self, job: Job) -> None:
        point = (job.step, job.loss, job.eval_loss)
        if point == self._last:
            return
        previous = self._last
        self._last = point
        for points in (self.loss_points, self.eval_points):
            while points and points[-1][0] > job.step:
                points.pop()
        if job.loss is not None and (previous is None or previous[1] != job.loss):
            _add(self.loss_points, job.step, job.loss)
        if job.eval_loss is not None and (previous is None or previous[2] != job.eval_loss):
            _add(self.eval_points, job.step, job.eval_loss)


def _add(points: Points, step: int, value: float) -> None:
    """A point, unless the curve already ends with this value (the status repeats a logged loss until the next log
    event) or has a point at that step."""
    if not points or (points[-1][0] < step and points[-1][1] != value):
        points.append((step, value))


def render(job: Job, series: Series, event: dict[str, Any] | None = None, width: int = 30) -> list[str]:
    """The view's lines for the job as it is now."""
    total = job.total_steps
    steps = f"{job.step}/{total}" if total else f"{job.step}/?"
    lines = [
        f"{job.name}  {job.phase}  attempt {job.attempt}, {job.restarts} restart{'s' if job.restarts != 1 else ''}",
        f"{progress_bar(job.percent, width)}  {steps}  {job.percent:5.1f}%  ETA {format_duration(job.eta_seconds)}",
        f"loss      {_number(job.loss)}  {sparkline(series.loss)}",
        f"eval loss {_number(job.eval_loss)}  {sparkline(series.eval_loss)}",
        f"tokens/s  {_number(job.tokens_per_second, 0)}",
    ]
    if event is not None:
        lines.append(f"event     {event.get('type')} {event.get('reason')}: {event.get('message')}")
    if job.message and job.finished:
        lines.append(f"message   {job.message}")
    return lines


def one_line(job: Job) -> str:
    """The view as one line, for logs and pipes."""
    return (f"{job.name} {job.phase} step {job.step}/{job.total_steps or '?'} ({job.percent:.1f}%) loss "
            f"{_number(job.loss)} eval {_number(job.eval_loss)} tok/s {_number(job.tokens_per_second, 0)} ETA "
            f"{format_duration(job.eta_seconds)} restarts {job.restarts}")


class LiveView:
    """Draws ``render``'s lines to ``out``: redrawn in place on a terminal, a line per change otherwise."""

    def __init__(self, out: TextIO, interactive: bool) -> None:
        self.out = out
        self.interactive = interactive
        self.series = Series()
        self._drawn = 0
        self._last_line = ""

    def update(self, job: Job, event: dict[str, Any] | None = None) -> None:
        self.series.observe(job)
        if self.interactive:
            lines = render(job, self.series, event)
            # Back to the top of the previous block, then each line cleared and rewritten.
            prefix = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.out.write(prefix + "".join(f"\x1b[2K{line}\n" for line in lines))
            if len(lines) < self._drawn:
                self.out.write("\x1b[2K\n" * (self._drawn - len(lines)) + f"\x1b[{self._drawn - len(lines)}F")
            self._drawn = len(lines)
        else:
            line = one_line(job)
            if line != self._last_line:
                self.out.write(line + "\n")
                self._last_line = line
        self.out.flush()
