"""The gate benchmark's simulation of the retrain's variant choice (training.gate_benchmark.simulate)."""
from __future__ import annotations

import numpy as np
import pytest

from training.gate_benchmark import main, simulate


def test_a_consistently_better_variant_is_picked_and_a_noisy_one_is_not():
    vote = np.linspace(0.5, 0.9, 200)
    swing = np.tile([1.0, -1.0], 100)
    better = vote + 0.03 + 0.002 * swing  # +0.03 on every box
    rows = simulate({"map": vote - 0.1, "vote": vote, "refine+vote": better}, [10, 50], [0.0, 2.0], draws=200)
    for z in (0.0, 2.0):
        assert rows[z]["default_share_k10"] == 0.0 and rows[z]["gain_k50"] == pytest.approx(0.03, abs=0.003)
    # a variant slightly worse than the vote on average and ±0.2 per box: z = 0 follows the noise on 10 masks
    # and loses on the other boxes; z = 2 keeps the vote on (nearly) every draw
    noisy = vote - 0.01 + 0.2 * swing
    rows = simulate({"vote": vote, "refine": noisy}, [10], [0.0, 2.0], draws=400)
    assert rows[2.0]["default_share_k10"] > 0.9 > 0.7 > rows[0.0]["default_share_k10"]
    assert rows[0.0]["gain_k10"] < -0.003 < -0.001 < rows[2.0]["gain_k10"]


def test_more_held_out_masks_than_boxes_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError):
        simulate({"vote": [0.5, 0.6]}, [2], [2.0], draws=1)
    assert main(["--data", str(tmp_path), "--run", str(tmp_path), "--no-write"]) == 2
    assert "error" in capsys.readouterr().err
