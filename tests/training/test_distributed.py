"""Multi-process training through detectron2's launch on the CPU (gloo): two processes stay in sync and
compute what one process computes with the same total batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sim_model.datasets import REPO_ROOT
from tests.support import COCO_TRAIN_IMAGES, COCO_TRAIN_JSON

pytestmark = pytest.mark.skipif(not COCO_TRAIN_JSON.exists(), reason="coco-mini data not available")
OPTS = ["MODEL.SIM.ENABLED", "False", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SEED", "3",
        "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_image(which: int = 0):
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    from training.train import build_config

    cfg = build_config("configs/SIM_close_EffLite0_FPN_cpu.yaml", OPTS, train_json=str(COCO_TRAIN_JSON),
                       train_images=str(COCO_TRAIN_IMAGES))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    # two different images with the same boxes: the same positives, so per-process means weigh alike
    img = read_image(str(sorted(COCO_TRAIN_IMAGES.iterdir())[which]), format="RGB")[:192, :256].copy()
    inst = Instances(img.shape[:2])
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 30.0, 120.0, 150.0], [140.0, 40.0, 250.0, 110.0]]))
    inst.gt_classes = torch.tensor([0, 3])
    return model, {"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "instances": inst}


def _step(model, batch, lr: float = 0.01) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One SGD step: (loss, the gradient it applied, the parameters after it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = sum(model(batch).values())
    loss.backward()
    grad = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad
    return float(loss), grad, torch.cat([p.detach().flatten() for p in params])


def _worker(out_dir: str) -> None:
    """One rank: its half of the batch (image ``rank``), DDP through detectron2's create_ddp_model."""
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.utils import comm

    torch.set_num_threads(1)
    model, sample = _model_and_image(comm.get_rank())
    ddp = create_ddp_model(model, broadcast_buffers=False)
    loss, grad, params = _step(ddp, [sample])
    torch.save({"loss": loss, "grad": grad, "params": params}, Path(out_dir) / f"rank{comm.get_rank()}.pt")


def test_two_gloo_processes_stay_in_sync_and_match_one_process(tmp_path):
    from detectron2.engine import launch

    launch(_worker, 2, num_machines=1, machine_rank=0, dist_url=f"tcp://127.0.0.1:{_free_port()}",
           args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.set_num_threads(1)
    model, a = _model_and_image(0)
    _, b = _model_and_image(1)
    loss, grad, params = _step(model, [a, b])  # one process, the same total batch
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"], rel=1e-3)  # the ranks saw different images
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # yet they are in sync after the step
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(loss, rel=1e-4)
    assert torch.allclose(ranks[0]["grad"], grad, rtol=1e-3, atol=1e-6)
    assert torch.allclose(ranks[0]["params"], params, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0


def test_the_training_command_runs_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "training.train", "--config", "configs/SIM_close_EffLite0_FPN_cpu.yaml",
           "--num-gpus", "2", "--threads", "1", "--dist-url", f"tcp://127.0.0.1:{_free_port()}",
           "--train-json", str(COCO_TRAIN_JSON), "--train-images", str(COCO_TRAIN_IMAGES), *OPTS,
           "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()",
           "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model_final.pth").is_file()
    assert "world size: 2" in (proc.stdout + proc.stderr).lower()
