"""The ladder's rungs (training.ladder) and the detection cap of a crowded val split (training.train)."""
from __future__ import annotations

from sim_model.datasets import REPO_ROOT, shared_data_dir
from training.curve import dataset_splits
from training.ladder import RUNGS
from training.train import Trainer, build_config


def test_crowded_val_split_raises_the_detection_cap_on_both_sides():
    """dsb2018-nuclei val holds an image with 375 nuclei (its README): given as the val split of a training,
    the network and COCOeval keep them all; balloon's val split stays at the config's 100, and an explicit
    option wins."""
    _, dsb_val = dataset_splits(shared_data_dir() / "dsb2018-nuclei")
    _, balloon_val = dataset_splits(shared_data_dir() / "balloon")
    config = str(REPO_ROOT / "configs/BoxInst_EffLite0_FPN_cpu.yaml")
    cfg = build_config(config, val_json=str(dsb_val.json), val_images=str(dsb_val.images))
    assert cfg.MODEL.FCOS.POST_NMS_TOPK_TEST == 375
    evaluator = Trainer.build_evaluator(cfg, cfg.DATASETS.TEST[0], output_folder=None)
    assert evaluator._max_dets_per_image == [1, 10, 375]
    balloon = build_config(config, val_json=str(balloon_val.json), val_images=str(balloon_val.images))
    assert balloon.MODEL.FCOS.POST_NMS_TOPK_TEST == 100
    assert Trainer.build_evaluator(balloon, balloon.DATASETS.TEST[0])._max_dets_per_image == [1, 10, 100]
    explicit = build_config(config, ["MODEL.FCOS.POST_NMS_TOPK_TEST", "50"], val_json=str(dsb_val.json),
                            val_images=str(dsb_val.images))
    assert explicit.MODEL.FCOS.POST_NMS_TOPK_TEST == 50


def test_sim_misa_rung_takes_the_misa_recipes_deviations():
    """The ``sim_misa`` rung puts MISA on SIM's config with the same non-paper values as the MISA recipe
    (FSD weight, SEPA's sigma scale), so that the MISA rungs differ only by SIM."""
    config, opts = RUNGS["sim_misa"]
    sim_misa = build_config(str(REPO_ROOT / config), list(opts))
    misa = build_config(str(REPO_ROOT / RUNGS["misa"][0]))
    assert sim_misa.MODEL.SIM.ENABLED and not misa.MODEL.SIM.ENABLED
    assert sim_misa.MODEL.MISA == misa.MODEL.MISA
