"""SIM §3.4: the momentum teacher is an EMA of the student, frozen, in eval mode, checkpointed."""
import pytest
import torch
from torch import nn

from sim_model.sim.teacher import MomentumTeacher


def _student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))


def test_ema_hand_value():
    student = _student()
    teacher = MomentumTeacher(student, momentum=0.9)
    w0 = student[0].weight.detach().clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.fill_(2.0)
        student[1].num_batches_tracked.fill_(7)
    teacher.update(student)
    # 0.9 * w0 + 0.1 * (w0 + 1) = w0 + 0.1
    torch.testing.assert_close(teacher.model[0].weight, w0 + 0.1)
    torch.testing.assert_close(teacher.model[1].running_mean, torch.full((4,), 0.2))  # 0.9 * 0 + 0.1 * 2
    assert int(teacher.model[1].num_batches_tracked) == 7  # integer buffers are copied
    teacher.update(student)
    torch.testing.assert_close(teacher.model[0].weight, w0 + 0.19)  # 0.9 * 0.1 + 0.1 * 1
    assert int(teacher.num_updates) == 2
    teacher.update(student, momentum=0.0)
    torch.testing.assert_close(teacher.model[0].weight, student[0].weight.detach())


def test_teacher_is_frozen_and_in_eval_mode():
    student = _student()
    teacher = MomentumTeacher(student, momentum=0.9999)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    teacher.train()
    assert not teacher.model.training and not teacher.model[2].training
    x = torch.randn(5, 3)
    out = teacher(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, teacher(x))  # dropout off: deterministic
    # the copy is independent of the student
    with torch.no_grad():
        student[0].weight.zero_()
    assert teacher.model[0].weight.abs().sum() > 0


def test_teacher_state_dict_roundtrip_and_ddp_unwrap():
    student = _student()
    teacher = MomentumTeacher(student, momentum=0.5)
    with torch.no_grad():
        student[3].bias.add_(4.0)
    teacher.update(nn.DataParallel(student))  # wrappers are unwrapped
    restored = MomentumTeacher(_student(), momentum=0.5)
    restored.load_state_dict(teacher.state_dict())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k
    assert int(restored.num_updates) == 1


def test_teacher_mismatch_and_bad_momentum():
    with pytest.raises(ValueError):
        MomentumTeacher(_student(), momentum=1.5)
    teacher = MomentumTeacher(_student(), momentum=0.9)
    with pytest.raises(KeyError):
        teacher.update(nn.Sequential(nn.Linear(3, 4)))
