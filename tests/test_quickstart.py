"""`regionspot quickstart` end to end at a reduced size: the trained head beats the shuffled-label control."""

import json

import pytest

from regionspot.quickstart import QuickstartConfig, run_quickstart


@pytest.mark.slow
def test_quickstart_beats_the_shuffled_label_control(toy_root, tmp_path):
    cfg = QuickstartConfig(out=tmp_path / "qs", data_root=toy_root, steps=500, val_images=100)
    metrics = run_quickstart(cfg)
    model, control = metrics["model"]["AP"], metrics["control"]["AP"]
    assert model >= control + 0.05 and model >= 1.5 * control, (model, control)
    assert json.loads((tmp_path / "qs" / "metrics.json").read_text())["AP"] == model
    assert json.loads((tmp_path / "qs" / "control_metrics.json").read_text())["AP"] == control
