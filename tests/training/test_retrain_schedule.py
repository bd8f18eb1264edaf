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


def test_a_continued_retrain_takes_the_schedule_colour_steps_and_mask_weight_from_the_recipe(tmp_path):
    """A version written under older defaults (its config.yaml is a full dump) must not pin them forever."""
    from training.retrain import follow_recipe

    old = build_config(DEFAULT_CONFIG, ["RETRAIN.MAX_ITER", "3000", "TEST.REFINE.ITERATIONS", "2",
                                        "TEST.REFINE.SHORT_SIDE", "96",
                                        "MODEL.MASK_SUPERVISION.WEIGHT", "0.25",
                                        "MODEL.MASK_SUPERVISION.BCE_WEIGHT", "1.0",
                                        "TEST.VOTE.MAP_WEIGHT", "0.5", "SOLVER.BASE_LR", "0.123"])
    dumped = tmp_path / "config.yaml"
    dumped.write_text(old.dump())
    cfg = build_config(str(dumped))
    cfg.defrost()
    follow_recipe(cfg, build_config(DEFAULT_CONFIG, ["RETRAIN.MIN_ITER", "150"]))
    recipe = build_config(DEFAULT_CONFIG)
    assert cfg.RETRAIN.MAX_ITER == recipe.RETRAIN.MAX_ITER != 3000 and cfg.RETRAIN.MIN_ITER == 150
    assert cfg.TEST.REFINE.ITERATIONS == recipe.TEST.REFINE.ITERATIONS != 2
    assert cfg.TEST.REFINE.SHORT_SIDE == recipe.TEST.REFINE.SHORT_SIDE != 96
    assert cfg.MODEL.MASK_SUPERVISION.WEIGHT == recipe.MODEL.MASK_SUPERVISION.WEIGHT != 0.25
    assert cfg.MODEL.MASK_SUPERVISION.BCE_WEIGHT == recipe.MODEL.MASK_SUPERVISION.BCE_WEIGHT != 1.0
    assert cfg.TEST.VOTE.MAP_WEIGHT == recipe.TEST.VOTE.MAP_WEIGHT != 0.5
    assert cfg.SOLVER.BASE_LR == 0.123  # what the network was trained with stays the version's
