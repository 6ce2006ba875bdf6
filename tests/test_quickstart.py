"""`regionspot quickstart` end to end at a reduced size: the trained head beats the shuffled-label control;
a second run into the same --out reuses what is there; the predict line it prints runs; the README names
exactly its options."""

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from regionspot.cli import app
from regionspot.quickstart import QuickstartConfig, run_quickstart

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_quickstart_beats_the_shuffled_label_control(toy_root, tmp_path):
    cfg = QuickstartConfig(out=tmp_path / "qs", data_root=toy_root, steps=500, val_images=100)
    metrics = run_quickstart(cfg)
    model, control = metrics["model"]["AP"], metrics["control"]["AP"]
    assert model >= control + 0.05 and model >= 1.5 * control, (model, control)
    assert json.loads((tmp_path / "qs" / "metrics.json").read_text())["AP"] == model
    assert json.loads((tmp_path / "qs" / "control_metrics.json").read_text())["AP"] == control


@pytest.mark.slow
def test_quickstart_twice_into_one_out_reuses_it_and_its_predict_line_runs(toy_root, tmp_path, capsys):
    out = tmp_path / "qs"
    cfg = QuickstartConfig(out=out, data_root=toy_root, steps=4, train_images=32, val_images=16)
    run_quickstart(cfg)
    capsys.readouterr()
    head = out / "model" / "checkpoints" / "step-0000004" / "head.safetensors"
    shard = out / "shards" / "toy" / "shard-000000.tar"
    stamps = {p: p.stat().st_mtime_ns for p in (head, shard)}

    second = run_quickstart(cfg)  # the same settings: the shards and both trained heads are reused
    printed = capsys.readouterr()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert printed.err.count("holds this run, finished: reusing it") == 2
    assert json.loads((out / "metrics.json").read_text())["AP"] == second["model"]["AP"]
    lines = printed.out.splitlines()
    assert any(line.startswith(f"checkpoint: {out / 'model' / 'checkpoints' / 'last'} (step-0000004)") for line in lines)
    assert any(line.startswith("metrics:") and str(out / "metrics.json") in line for line in lines)
    assert any(line.startswith("shards:") and str(out / "shards" / "toy") in line for line in lines)
    command = shlex.split(lines[-1])
    assert command[:2] == ["regionspot", "predict"] and command[command.index("--backbones") + 1] == "tiny"
    assert command[command.index("--checkpoint") + 1] == str(out / "model" / "checkpoints" / "last")
    result = CliRunner().invoke(app, command[1:])  # the exact line printed
    assert result.exit_code == 0, (result.output, result.exception)
    boxes = command[command.index("--boxes") + 1].split(";")
    (record,) = (out / "predict").glob("*.regionspot.json")
    assert len(json.loads(record.read_text())["regions"]) == len(boxes)

    run_quickstart(dataclasses.replace(cfg, steps=5))  # other settings: the runs start over, not the shards
    assert "a run of other settings: training again" in capsys.readouterr().err
    assert not head.exists() and (out / "model" / "checkpoints" / "step-0000005").is_dir()
    assert shard.stat().st_mtime_ns == stamps[shard]


def test_the_readme_names_exactly_the_quickstart_options():
    """The README's list of quickstart options is the command's: nothing missing, nothing stale."""
    text = README.read_text()
    (sentence,) = re.findall(r"[^\n]*`regionspot quickstart --help`[^.]*\.", text)
    named = set(re.findall(r"`(--[a-z-]+)`", sentence))
    command = typer.main.get_command(app).commands["quickstart"]
    options = {opt for p in command.params for opt in p.opts if opt.startswith("--") and opt != "--help"}
    assert named == options, (named, options)
