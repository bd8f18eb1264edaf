"""Momentum teacher: an exponential-moving-average copy of the network (SIM §3.4).

The teacher produces the mask features Z′ and the masks from which SIM's pseudo masks are built; it is
never trained by gradients. Config key: ``MODEL.SIM.TEACHER.MOMENTUM`` (paper 0.9999).

Besides :class:`MomentumTeacher` itself: :func:`teacher_pass` (the teacher's pass of a training step,
reusing the student's frozen backbone trunk; the student's own detached outputs without a teacher) and
:func:`drop_mismatched_teacher_keys` (loading a checkpoint whose teacher has other shapes).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from sim_model.modeling.network import CondInstNet, NetOutputs

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class MomentumTeacher(nn.Module):
    """EMA copy of a model: ``θ_teacher ← m·θ_teacher + (1 − m)·θ_student`` after each step.

    The copy lives in ``self.model``; it is always in eval mode, its parameters do not require grad,
    and it is part of this module's ``state_dict`` (keys ``model.*`` plus ``num_updates``), so a
    detectron2 checkpoint of a module that holds the teacher restores it.

    Floating-point parameters and buffers (BatchNorm statistics included) follow the EMA; integer
    buffers (e.g. ``num_batches_tracked``) are copied from the student.

    Args:
        model: the student to copy (a DDP wrapper is unwrapped). Build the teacher before assigning
            it as an attribute of the student, otherwise the copy would contain itself.
        momentum: m in [0, 1] (``MODEL.SIM.TEACHER.MOMENTUM``, paper 0.9999).

    Raises:
        ValueError: momentum outside [0, 1].
    """

    def __init__(self, model: nn.Module, momentum: float):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.model = copy.deepcopy(_unwrap(model))
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> "MomentumTeacher":
        """The teacher stays in eval mode whatever the caller asks (BatchNorm / dropout frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """One EMA step towards ``student`` (SIM §3.4), matched by ``state_dict`` key.

        Args:
            student: the trained model (DDP wrappers unwrapped). Keys of the student absent from the
                teacher (e.g. the teacher itself, if attached to the student) are ignored.
            momentum: overrides ``self.momentum`` for this step.

        Raises:
            KeyError: if the teacher has a key the student lacks, or a shape differs.
        """
        m = self.momentum if momentum is None else float(momentum)
        s_state = _unwrap(student).state_dict()
        ema_t, ema_s = [], []
        for name, t in self.model.state_dict().items():
            if name not in s_state:
                raise KeyError(f"student has no '{name}' (the teacher is a copy of a different model)")
            s = s_state[name].detach()
            if s.shape != t.shape:
                raise KeyError(f"'{name}': teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
            if t.dtype.is_floating_point:
                ema_t.append(t)
                ema_s.append(s.to(t.dtype))
            else:
                t.copy_(s)
        if ema_t:
            # t += (1 - m) * (s - t)  ==  m * t + (1 - m) * s, one fused kernel per dtype/device group
            torch._foreach_lerp_(ema_t, ema_s, 1.0 - m)
        self.num_updates += 1

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        """Run the teacher model without gradients."""
        return self.model(*args, **kwargs)


@torch.no_grad()
def teacher_pass(teacher: MomentumTeacher | None, images: torch.Tensor, student_out: NetOutputs,
                 trunk=None) -> NetOutputs:
    """Z′ and the masks for pseudo labels: the teacher's pass, or the student's (detached) without teacher.

    Args:
        teacher: the momentum teacher (None: ``MODEL.SIM.TEACHER.ENABLED`` off).
        images: (N, 3, Hp, Wp) float normalised batch that the student saw.
        student_out: the student's pass on it.
        trunk: the student's frozen-backbone output (EfficientNet-Lite with ``FREEZE_AT`` > 0, recorded
            by its ``record_trunk``). The frozen stages are never trained, so the teacher's EMA copy of
            them equals the student's, and the teacher starts its pass after them.

    Returns:
        :class:`~sim_model.modeling.network.NetOutputs` without class logits (the teacher skips them).
    """
    if teacher is None:
        return student_out.detach()
    bottom_up = getattr(teacher.model.backbone, "bottom_up", None)
    if trunk is not None and bottom_up is not None:
        bottom_up.trunk_input = trunk
    try:
        return teacher.model(images, with_cls=False)
    finally:
        if bottom_up is not None:
            bottom_up.trunk_input = None


def teacher_net(teacher: MomentumTeacher | None, student: CondInstNet) -> CondInstNet:
    """The network whose outputs :func:`teacher_pass` returned: the teacher copy, else the student."""
    return teacher.model if teacher is not None else student


def drop_mismatched_teacher_keys(state_dict: dict, teacher_state: dict, prefix: str) -> list[str]:
    """Remove the checkpoint's teacher tensors whose shape differs from this model's teacher (in place).

    A checkpoint trained with another number of classes then still loads (detectron2 skips the
    student's mismatched tensors the same way), with a warning per tensor.

    Args:
        state_dict: the state dict being loaded (keys ``<prefix>teacher.…``).
        teacher_state: this model's teacher state dict with the same key prefix.
        prefix: the module prefix of the load.

    Returns:
        The dropped keys.
    """
    dropped = []
    for k in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        if k in teacher_state and tuple(teacher_state[k].shape) != tuple(state_dict[k].shape):
            log.warning("Skip loading %s: shape %s in the checkpoint, %s in the model", k,
                        tuple(state_dict[k].shape), tuple(teacher_state[k].shape))
            del state_dict[k]
            dropped.append(k)
    return dropped


def student_pass(student: CondInstNet, images: torch.Tensor, record_trunk: bool) -> tuple[NetOutputs, object]:
    """The student's pass of a training step, keeping its frozen backbone trunk for :func:`teacher_pass`.

    Args:
        student: the trained network.
        images: (N, 3, Hp, Wp) float normalised batch.
        record_trunk: keep the trunk (only when a teacher pass follows and the backbone has frozen stages:
            EfficientNet-Lite's ``num_frozen_blocks`` > 0; other backbones never record).

    Returns:
        (outputs, trunk) where trunk is None unless recorded.
    """
    bottom_up = getattr(student.backbone, "bottom_up", None)
    record = record_trunk and getattr(bottom_up, "num_frozen_blocks", 0) > 0
    if not record:
        return student(images), None
    bottom_up.record_trunk = True
    try:
        out = student(images)
    finally:
        bottom_up.record_trunk = False
    trunk, bottom_up.last_trunk = bottom_up.last_trunk, None
    return out, trunk
