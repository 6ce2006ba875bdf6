"""Progress of one extraction process: the bar (images/s, regions/s, time left) and where the time went."""

from __future__ import annotations

import logging
import time

from rich.console import Console

from regionspot.progress import progress_bar

log = logging.getLogger("regionspot.extract")


class ExtractProgress:
    def __init__(self, images: int, regions: int, show: bool):
        self.images, self.regions, self.show = images, regions, show
        self.done_regions = 0
        self.started = time.perf_counter()
        self._progress = progress_bar("extract", "img", show=show, rate_fields=("regions",))
        self._task = self._progress.add_task("extract", total=images, regions=0)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def advance(self, images: int, regions: int) -> None:
        self.done_regions += regions
        self._progress.update(self._task, advance=images, regions=self.done_regions)

    def report(self, seconds: dict[str, float | int], rank: int | None = None) -> str:
        """Log (and return) where the time went: seconds per phase (floats) and counts (ints); `rank`
        names the process in a run of several."""
        wall = time.perf_counter() - self.started
        parts = ", ".join(f"{k} {v:.1f}s" if isinstance(v, float) else f"{k} {v}" for k, v in seconds.items())
        who = "" if rank is None else f"rank {rank}: "
        line = (f"{who}{self.images} images, {self.done_regions} regions in {wall:.1f}s "
                f"({self.images / max(wall, 1e-9):.2f} img/s); time split: {parts}")
        if self.show:
            Console(stderr=True).print(line)
        log.info(line)
        return line
