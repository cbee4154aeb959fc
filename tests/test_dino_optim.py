"""Parameter groups, AdamW, clipping, last-layer freeze and the EMA teacher update."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dino_cluster.dino.model import DINOHead, MultiCropWrapper
from dino_cluster.dino.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    param_groups,
)


def small_model(norm_last_layer: bool = True) -> MultiCropWrapper:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.LayerNorm(6), nn.BatchNorm1d(6))
    return MultiCropWrapper(
        backbone, DINOHead(6, out_dim=9, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    )


def test_param_groups_no_decay_on_bias_and_norms():
    model = small_model()
    groups = param_groups(model)
    assert [g["name"] for g in groups] == ["regularized", "not_regularized"]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    names = {id(p): n for n, p in model.named_parameters()}
    reg = {names[id(p)] for p in groups[0]["params"]}
    not_reg = {names[id(p)] for p in groups[1]["params"]}
    assert all(n.endswith(".weight") or "original1" in n for n in reg)
    assert "backbone.1.weight" in reg and "head.mlp.0.weight" in reg
    assert "head.last_layer.parametrizations.weight.original1" in reg
    assert {"backbone.1.bias", "backbone.2.weight", "backbone.2.bias", "backbone.3.weight"} <= (
        not_reg
    )
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in groups[1]["params"])
    # the frozen weight-norm gain is left out entirely
    g_name = "head.last_layer.parametrizations.weight.original0"
    assert g_name not in reg | not_reg
    assert len(reg) + len(not_reg) == sum(p.requires_grad for p in model.parameters())


def test_build_optimizer_keeps_groups_and_uses_foreach_on_cpu():
    model = small_model()
    opt = build_optimizer(param_groups(model), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["name"] == "regularized"
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    # the loop sets weight decay per iteration on the regularized group only
    opt.param_groups[0]["weight_decay"] = 0.04
    model(torch.randn(4, 3, 2, 2)).sum().backward()
    opt.step()
    with pytest.raises(ValueError):
        build_optimizer([{"params": []}], lr=1e-3)


def set_grads(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g) * (0.1 + 0.3 * i)
            grads[name] = p.grad.clone()
    return grads


def test_per_param_clipping_matches_formula():
    model = small_model()
    before = set_grads(model)
    norms = clip_gradients(model, clip=3.0)
    expected_norms = torch.stack([g.norm() for g in before.values()])
    torch.testing.assert_close(norms, expected_norms)
    assert (expected_norms > 3.0).any() and (expected_norms < 3.0).any()
    for name, p in model.named_parameters():
        if name not in before:
            continue
        n = before[name].norm()
        coef = 3.0 / (n + 1e-6)
        expected = before[name] * coef if coef < 1 else before[name]
        torch.testing.assert_close(p.grad, expected)
        assert p.grad.norm() <= 3.0 + 1e-4


def test_global_clipping_matches_formula():
    model = small_model()
    before = set_grads(model)
    total = clip_gradients(model, clip=3.0, mode="global")
    expected_total = torch.cat([g.flatten() for g in before.values()]).norm()
    torch.testing.assert_close(total, expected_total)
    assert expected_total > 3.0
    scale = 3.0 / (expected_total + 1e-6)
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p.grad, before[name] * scale)
    with pytest.raises(ValueError):
        clip_gradients(model, clip=3.0, mode="nope")


def test_cancel_last_layer_gradients():
    model = small_model()
    set_grads(model)
    cancel_last_layer_gradients(model, epoch=0, freeze_last_layer=1)
    for name, p in model.named_parameters():
        if "last_layer" in name:
            assert p.grad is None
        elif p.requires_grad:
            assert p.grad is not None
    set_grads(model)
    cancel_last_layer_gradients(model, epoch=1, freeze_last_layer=1)
    assert model.head.last_layer.parametrizations.weight.original1.grad is not None


def test_ema_update_parameters_only():
    torch.manual_seed(0)
    student, teacher = small_model(), small_model()
    teacher.train()
    teacher(torch.randn(8, 3, 2, 2))  # give the teacher's BatchNorm its own running stats
    student(torch.randn(8, 3, 2, 2) + 5)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_params = dict(student.named_parameters())
    ema_update(teacher, student, momentum=0.9)
    buffers = {n for n, _ in teacher.named_buffers()}
    assert "backbone.3.running_mean" in buffers
    for name, value in teacher.state_dict().items():
        if name in buffers:
            assert torch.equal(value, t_before[name]), f"buffer {name} changed"
        else:
            expected = 0.9 * t_before[name] + 0.1 * s_params[name].detach()
            torch.testing.assert_close(value, expected)
    with pytest.raises(ValueError):
        ema_update(teacher, nn.Linear(2, 2), momentum=0.9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ema_update_unwraps_ddp_and_compiled_student():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(1)
        student, teacher = small_model(), small_model()
        t0 = [p.clone() for p in teacher.parameters()]
        ddp = nn.parallel.DistributedDataParallel(student)
        ema_update(teacher, ddp, momentum=0.5)
        for p_t, before, p_s in zip(teacher.parameters(), t0, student.parameters(), strict=True):
            torch.testing.assert_close(p_t, 0.5 * before + 0.5 * p_s.detach())
    finally:
        dist.destroy_process_group()
    wrapped = type("Compiled", (nn.Module,), {})()
    wrapped._orig_mod = student  # what torch.compile's OptimizedModule exposes
    ema_update(teacher, wrapped, momentum=0.0)
    for p_t, p_s in zip(teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(p_t, p_s)
