"""The ladder's per-dataset options (training.ladder) and the evaluator's detection cap (training.train)."""
from __future__ import annotations

from sim_model.datasets import REPO_ROOT, shared_data_dir
from training.curve import dataset_splits
from training.data import register_coco
from training.ladder import RUNGS, detection_cap_opts
from training.train import Trainer, build_config


def test_crowded_val_split_raises_the_detection_cap_on_both_sides():
    """dsb2018-nuclei val holds an image with 375 nuclei (its README): the network and COCOeval must keep them
    all; balloon's val split stays at the config's 100."""
    _, dsb_val = dataset_splits(shared_data_dir() / "dsb2018-nuclei")
    _, balloon_val = dataset_splits(shared_data_dir() / "balloon")
    opts = detection_cap_opts(dsb_val.json)
    assert opts == ["MODEL.FCOS.POST_NMS_TOPK_TEST", "375"]
    assert detection_cap_opts(balloon_val.json) == []

    cfg = build_config(str(REPO_ROOT / "configs/BoxInst_EffLite0_FPN_cpu.yaml"), opts)
    name = register_coco("ladder_dsb_val", str(dsb_val.json), str(dsb_val.images))
    evaluator = Trainer.build_evaluator(cfg, name, output_folder=None)
    assert evaluator._max_dets_per_image == [1, 10, 375]
    default = Trainer.build_evaluator(build_config(str(REPO_ROOT / "configs/BoxInst_EffLite0_FPN_cpu.yaml")), name)
    assert default._max_dets_per_image == [1, 10, 100]


def test_sim_misa_rung_takes_the_misa_recipes_deviations():
    """The ``sim_misa`` rung puts MISA on SIM's config with the same non-paper values as the MISA recipe
    (FSD weight, SEPA's sigma scale), so that the MISA rungs differ only by SIM."""
    config, opts = RUNGS["sim_misa"]
    sim_misa = build_config(str(REPO_ROOT / config), list(opts))
    misa = build_config(str(REPO_ROOT / RUNGS["misa"][0]))
    assert sim_misa.MODEL.SIM.ENABLED and not misa.MODEL.SIM.ENABLED
    assert sim_misa.MODEL.MISA == misa.MODEL.MISA
