"""The helpers every stage shares: --device read in one place, and the one progress bar."""

import io

import pytest
import torch
from rich.console import Console

from regionspot.devices import check_device_name, resolve_device
from regionspot.errors import RegionSpotError
from regionspot.progress import progress_bar


def test_device_names():
    assert resolve_device("cpu") == resolve_device("cpu", local_rank=3) == torch.device("cpu")
    assert resolve_device(None).type == resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert check_device_name("cuda:12") == "cuda:12"
    for bad in ("gpu", "cuda:x", "CPU", "", "cuda:"):
        with pytest.raises(RegionSpotError, match="not a device; use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message a machine without CUDA gives")
def test_cuda_on_a_machine_without_it():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(RegionSpotError, match="no CUDA device here; use --device cpu"):
            resolve_device(name)
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")  # extract's workers fall back


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_process_takes_its_gpu():
    count = torch.cuda.device_count()
    assert resolve_device("auto", local_rank=count + 1) == torch.device("cuda", 1 % count)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(RegionSpotError, match=f"{count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_every_bar_shows_rate_and_time_left():
    now = [0.0]
    bar = progress_bar("extract", "img", rate_fields=("regions",))
    bar.get_time = lambda: now[0]  # a clock the test moves
    task = bar.add_task("extract", total=100, regions=0)
    for t in (1.0, 2.0):
        now[0] = t
        bar.update(task, advance=10, regions=40 * t)
    console = Console(file=io.StringIO(), width=200)
    console.print(bar.make_tasks_table(bar.tasks))
    shown = console.file.getvalue()
    for part in ("extract", "20/100", "10.0 img/s", "40 regions/s", "0:00:08"):
        assert part in shown, shown
    assert progress_bar("train", "step", show=False).disable and not bar.disable
