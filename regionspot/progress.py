"""The one progress bar every stage shows: label, bar, done/total, rate and time left, on stderr.

On a console that is not a terminal (a log file, a pipe) rich draws nothing while the bar runs and
prints its final state once when it stops, unless the bar is transient. Anything in the package may
import this module (it imports only rich).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """The count's rate over the last seconds (the one the time left is computed from), and the
    average rate of each named task field since the start (e.g. regions, counted beside images)."""

    def __init__(self, unit: str, fields: tuple[str, ...] = ()):
        super().__init__()
        self.unit, self.fields = unit, fields

    def render(self, task) -> Text:
        parts = [] if task.speed is None else [f"{task.speed:.1f} {self.unit}/s"]
        elapsed = task.elapsed or 0.0
        if elapsed > 0:
            parts += [f"{task.fields.get(name, 0) / elapsed:.0f} {name}/s" for name in self.fields]
        return Text("  ".join(parts), style="cyan")


def progress_bar(
    label: str,
    unit: str,
    *,
    show: bool = True,
    transient: bool = False,
    rate_fields: tuple[str, ...] = (),
    info: bool = False,
) -> Progress:
    """A rich `Progress` on stderr: `label`, the bar, done/total, [info], rate, time left.

    Args:
        label: what the bar is doing (extract, train, scoring, predict, verifying shards).
        unit: what it counts, for the rate (img, step, shard).
        show: False turns the bar off (ranks other than 0, --no-progress).
        transient: the bar disappears when it stops.
        rate_fields: task fields holding running totals, shown per second too (`regions`).
        info: show the task field "info", a free text the caller updates (the loss, the lr).
    Returns:
        the Progress; use it as a context manager (or start/stop) and add one task to it.
    """
    columns: list[ProgressColumn] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns += [RateColumn(unit, rate_fields), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), disable=not show, transient=transient)
