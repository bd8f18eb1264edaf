"""The retrain's schedule rule (training.retrain.retrain_schedule)."""
from __future__ import annotations

import pytest

from training.retrain import DEFAULT_CONFIG, retrain_schedule
from training.train import build_config


def _cfg(*opts):
    return build_config(DEFAULT_CONFIG, ["RETRAIN.EPOCHS", "20.0", "RETRAIN.MIN_ITER", "100", "RETRAIN.MAX_ITER",
                                         "2000", "SOLVER.IMS_PER_BATCH", "8", *opts])


def test_iterations_follow_the_project_size_within_the_bounds():
    cfg = _cfg()
    assert retrain_schedule(cfg, 10) == (100, (75, 90))             # 25 iterations → the minimum
    assert retrain_schedule(cfg, 200) == (500, (375, 450))          # 20 epochs x 200 images / 8
    assert retrain_schedule(cfg, 5000) == (2000, (1500, 1800))      # capped
    assert retrain_schedule(cfg, 201)[0] == 503                     # rounded up


def test_a_continued_run_counts_from_its_start_and_max_iter_overrides():
    cfg = _cfg()
    assert retrain_schedule(cfg, 200, start_iter=1200) == (1700, (1575, 1650))
    assert retrain_schedule(cfg, 200, start_iter=1200, iterations=40) == (1240, (1230, 1236))
    assert retrain_schedule(cfg, 200, iterations=4) == (4, (3,))  # 0.9 x 4 rounds to the last step: no drop


def test_bad_bounds_raise():
    with pytest.raises(ValueError):
        retrain_schedule(_cfg("RETRAIN.MIN_ITER", "3000"), 10)
    with pytest.raises(ValueError):
        retrain_schedule(_cfg(), -1)
