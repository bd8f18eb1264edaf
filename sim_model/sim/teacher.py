"""Momentum teacher: an exponential-moving-average copy of the network (SIM §3.4).

The teacher produces the mask features Z′ and the masks from which SIM's pseudo masks are built; it is
never trained by gradients. Config key: ``MODEL.SIM.TEACHER.MOMENTUM`` (paper 0.9999).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


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
