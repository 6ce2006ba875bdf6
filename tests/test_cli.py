"""The command line as one options vocabulary: every option is a config field (help, choices, bound and
default declared once), --help shows what a value may be, typer refuses a bad value with exit code 2
before any stage code runs, the configs refuse the same values in Python, -h and --version work."""

from __future__ import annotations

import dataclasses
import re
from typing import get_args

import pytest
import typer
from typer.testing import CliRunner

from regionspot import __version__
from regionspot.cli import app
from regionspot.errors import RegionSpotError
from regionspot.evaluate.config import EvalConfig
from regionspot.extract.config import ExtractConfig
from regionspot.predict.config import PredictConfig
from regionspot.quickstart import QuickstartConfig
from regionspot.train.config import TrainConfig, resolve_config


def _commands(group, path=()) -> list[list[str]]:
    """Every command and group of the CLI, found by walking it (a new command is covered as it comes)."""
    found = [list(path)]
    for name, command in getattr(group, "commands", {}).items():
        found += _commands(command, (*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "regionspot")
def test_help_of_every_command_labels_values_plainly(command):
    long, short = _invoke([*command, "--help"]), _invoke([*command, "-h"])
    assert long.exit_code == 0 and short.exit_code == 0 and short.output == long.output
    assert "Usage:" in long.output
    for label in ("<bool>", "<list[", "<str>..."):
        assert label not in long.output
    assert not re.search(r"\{[A-Za-z_.]+\}", long.output)  # no {images} / {DIR} in the usage line


@pytest.mark.parametrize("command", [["shards", "verify"], ["train"], ["predict"]], ids=" ".join)
def test_help_paragraphs_wrap_to_the_terminal_not_to_the_source(command):
    """On a wide terminal a docstring paragraph is one line, however the source broke it."""
    doc = typer.main.get_command(app)
    for name in command:
        doc = doc.commands[name]
    output = CliRunner().invoke(app, [*command, "-h"], env={"COLUMNS": "500"}).output
    lines = [line.strip() for line in output.splitlines()]
    for paragraph in doc.callback.__doc__.split("\n\n"):
        assert " ".join(paragraph.split()) in lines


def test_version():
    result = _invoke(["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"regionspot {__version__}"


def test_help_lists_choices_and_real_defaults():
    extract = _invoke(["extract", "--help"]).output
    for label in ("<wds|zarr>", "<bb|bl|bl336|tiny>", "<vit_b|vit_l|vit_h|tiny>", "<1|3>", "[default: 1000]"):
        assert label in extract
    evaluate = _invoke(["eval", "--help"]).output
    assert "<regionspot|clip-crop|clip-mask>" in evaluate and "<lvis|fast>" in evaluate
    assert "IMAGE..." in _invoke(["predict", "--help"]).output
    train = _invoke(["train", "--help"]).output
    for default in ("[default: 2.5e-05]", "[default: 450000]", "[default: 16]", "[default: 1000]"):
        assert default in train


@pytest.fixture
def no_stage(monkeypatch):
    """Fail loudly if a command reaches its stage."""

    def refuse(*args, **kwargs):
        raise AssertionError("stage code ran before the options were checked")

    for target in ("regionspot.extract.runner.run_extract", "regionspot.evaluate.runner.run_eval",
                   "regionspot.predict.runner.run_predict", "regionspot.train.config.resolve_config",
                   "regionspot.quickstart.run_quickstart"):  # fmt: skip
        monkeypatch.setattr(target, refuse)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["extract", "--storage", "tar"], "--storage"),
        (["extract", "--batch-size", "0"], "--batch-size"),
        (["extract", "--sam-tokens", "2"], "--sam-tokens"),
        (["extract", "--sam", "vit_x"], "--sam"),
        (["eval", "--method", "clip"], "--method"),
        (["eval", "--evaluator", "slow"], "--evaluator"),
        (["eval", "--workers", "-1"], "--workers"),
        (["eval", "--device", "gpu"], "--device"),
        (["predict", "a.jpg", "--device", "cuda:x"], "--device"),
        (["predict", "a.jpg", "--backbones", "huge"], "--backbones"),
        (["train", "--shards", "s", "--steps", "0"], "--steps"),
        (["quickstart", "--steps", "0"], "--steps"),
    ],
)
def test_a_bad_value_exits_2_before_any_work(no_stage, args, flag):
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}'" in result.output


def test_the_configs_refuse_the_same_values_in_python(tmp_path):
    bad = ExtractConfig(storage="tar", batch_size=0, sam_tokens=2, gpus=-1, clip_size=0)
    with pytest.raises(RegionSpotError) as info:
        bad.check()
    message = str(info.value)
    for part in ("--storage 'tar': choose one of wds, zarr", "--batch-size 0: must be at least 1",
                 "--sam-tokens 2: choose one of 1, 3", "--gpus -1: must be at least 0", "--clip-size 0"):  # fmt: skip
        assert part in message
    with pytest.raises(RegionSpotError, match="--sam-tokens True"):  # True == 1, but it is no token count
        ExtractConfig(sam_tokens=True).check()
    with pytest.raises(RegionSpotError, match="--max-dets 2.5: must be an integer"):
        EvalConfig(method="clip-crop", max_dets=2.5).check()


def test_recipe_values_are_named_as_recipe_values(tmp_path):
    """A recipe-only value is no flag: messages call it `recipe value NAME`."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("shuffle_buffer: 0\nsteps: 1.5\ndropout: 1.0\n")
    with pytest.raises(RegionSpotError) as info:
        resolve_config(recipe, shards=[tmp_path])
    message = str(info.value)
    assert "recipe value shuffle_buffer 0: must be at least 1" in message
    assert "recipe value dropout 1.0: must be in [0, 1)" in message
    assert "--steps 1.5: must be an integer" in message
    assert "--shuffle-buffer" not in message and "--dropout" not in message


def test_train_flags_given_override_the_recipe_and_defaults_do_not(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("regionspot.train.trainer.run_train", lambda cfg: seen.append(cfg) or tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 7\nsave_every: 3\nlr: 1.0e-4\n")
    result = _invoke(["train", "--shards", str(tmp_path), "--recipe", str(recipe), "--seed", "5", "--lr", "2e-4"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert (cfg.steps, cfg.save_every, cfg.seed, cfg.lr, cfg.batch_size) == (7, 3, 5, 2e-4, 16)


@pytest.mark.parametrize(
    "command, config, cli_only",
    [("extract", ExtractConfig, set()), ("eval", EvalConfig, set()), ("predict", PredictConfig, {"progress"}),
     ("train", TrainConfig, {"recipe"}), ("quickstart", QuickstartConfig, set())],
)  # fmt: skip
def test_command_options_are_config_fields(command, config, cli_only):
    """Each option is the config field of that name, with its default and help: nothing to drift."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        if param.name in cli_only or param.name == "help":
            continue
        field = fields[param.name]
        assert param.help == field.metadata["help"], param.name
        if field.default is not dataclasses.MISSING and param.name != "proposals":  # extract: 'gt' means None
            assert param.default == field.default, param.name


def test_backbone_choices_are_the_presets():
    from regionspot.models.options import Preset, SamModel
    from regionspot.models.presets import PRESETS, SAM_MODELS

    assert get_args(Preset) == tuple(PRESETS) and get_args(SamModel) == tuple(SAM_MODELS)


def test_extract_ends_with_a_plain_summary_and_the_next_command(toy_root, tmp_path):
    out = tmp_path / "toy"
    result = _invoke(["extract", "--dataset", "toy", "--data-root", str(toy_root), "--backbones", "tiny",
                      "--limit", "4", "--shard-size", "2", "--gpus", "0", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "4 images" in result.output and "rank 0" not in result.output  # one process: no rank to name
    assert f"next: regionspot shards info {out}" in result.output and f"train --shards {out}" in result.output


def test_shards_verify_on_a_folder_of_sets_verifies_each(toy_shards, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, path in toy_shards.items():
        (folder / name).symlink_to(path)
    result = _invoke(["shards", "verify", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"{folder} is a folder of 2 shard sets (toy, toy_val)" in result.output
    assert "toy: ok: 3 shards, 48 images" in result.output and "toy_val: ok: 3 shards, 48 images" in result.output
    (folder / "unfinished").mkdir()
    (folder / "unfinished" / "identity.json").write_text("{}")
    result = _invoke(["shards", "verify", str(folder)])
    assert result.exit_code == 1 and "folder of 3 shard sets" in result.output
    assert "unfinished: fault:" in result.output and "toy: ok" in result.output
