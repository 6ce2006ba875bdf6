"""Where a stage that reads a dataset finds it (`--data-root --allow-outside-root`), declared once.

`ExtractConfig` and `EvalConfig` inherit `DatasetOptions` (eval hands both on to the extraction it may
run); `datasets.open_dataset` takes them. Each stage declares `dataset` itself: its default and the
names it takes differ. This module stays light, so the CLI can read it to build its help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from regionspot.options import option


@dataclass
class DatasetOptions:
    data_root: Path | None = option(
        None, "Root of the named datasets (default: $REGIONSPOT_DATASETS, else datasets/)."
    )
    allow_outside_root: bool = option(
        False, "Read images whose file_name leaves the dataset's image folder (../, absolute paths); "
        "otherwise they are skipped and listed."
    )  # fmt: skip
