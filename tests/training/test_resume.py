"""A checkpoint restores iteration, optimizer, scheduler, teacher, prototypes and memory bank."""
import os

import pytest
import torch

from sim_model.datasets import REPO_ROOT, coco_mini_dir
from training.train import Trainer, build_config

REPO = str(REPO_ROOT)

pytestmark = pytest.mark.skipif(not coco_mini_dir().is_dir(), reason="coco-mini data not available")


def _cfg(out_dir, max_iter):
    return build_config(os.path.join(REPO, "configs", "SIM_EffLite0_FPN_cpu.yaml"), [
        "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out_dir), "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "224", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "1",
        "SOLVER.WARMUP_ITERS", "1",
        # the SIM gate opens at iteration 2: the resumed step must already be past it
        "MODEL.SIM.WARMUP_ITERS", "2", "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", "10",
        # loose thresholds so that an untrained network still yields pseudo masks for the bank
        "MODEL.SIM.THRESH_HIGH", "0.3", "MODEL.SIM.THRESH_LOW", "0.1", "MODEL.SIM.PROTOTYPES.INPUT_THRESH", "0.0",
        "MODEL.SIM.COPY_PASTE.ENABLED", "True", "SEED", "3"])


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_restores_training_state(tmp_path):
    cfg = _cfg(tmp_path, 3)
    t1 = Trainer(cfg)
    t1.resume_or_load(resume=False)
    t1.train()  # iterations 0, 1, 2 (the SIM gate opens at 2)
    m1 = t1.model
    assert int(m1.iteration) == 3
    assert m1.teacher is not None and int(m1.teacher.num_updates) == 2
    assert len(m1.memory_bank) > 0, "the bank should hold the gated step's images"
    s1 = _state(m1)
    opt1 = t1.optimizer.state_dict()
    sched_epoch = t1.scheduler.last_epoch
    assert (tmp_path / "model_final.pth").is_file()

    cfg2 = _cfg(tmp_path, 4)
    t2 = Trainer(cfg2)
    assert t2.model.teacher is None  # created by loading the checkpoint
    t2.resume_or_load(resume=True)
    m2 = t2.model
    assert t2.start_iter == 3
    assert int(m2.iteration) == 3
    s2 = _state(m2)
    teacher_keys = [k for k in s1 if k.startswith("teacher.")]
    assert teacher_keys and all(k in s2 for k in teacher_keys)
    for k in teacher_keys + ["prototypes.prototypes", "prototypes.initialized", "iteration"]:
        assert torch.equal(s1[k], s2[k]), k
    assert not torch.equal(s2["teacher.model.fcos.head.cls_logits.weight"],
                           s2["net.fcos.head.cls_logits.weight"])  # the teacher is not the student
    assert bool(m2.prototypes.initialized.any())
    opt2 = t2.optimizer.state_dict()
    assert opt1["state"].keys() == opt2["state"].keys() and len(opt2["state"]) > 0
    for i in opt1["state"]:
        assert torch.equal(opt1["state"][i]["momentum_buffer"], opt2["state"][i]["momentum_buffer"])
    assert t2.scheduler.last_epoch == sched_epoch
    assert len(m2.memory_bank) == len(m1.memory_bank)
    assert torch.equal(m2.memory_bank[0].scores, m1.memory_bank[0].scores)

    t2.train()  # iteration 3 only: the gate must stay open
    hist = t2.storage.history("loss_pseudo")
    assert hist.latest() > 0
    assert int(m2.teacher.num_updates) == 3
