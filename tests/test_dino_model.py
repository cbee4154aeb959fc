"""Backbones, DINO head, multi-crop wrapper and the student/teacher pair."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_cluster.dino.keys import from_reference_state_dict, reference_state_dict
from dino_cluster.dino.model import (
    DINOHead,
    MultiCropWrapper,
    build_backbone,
    build_student_teacher,
)

TINY_VIT = dict(depth=2, embed_dim=16, num_heads=2)


@pytest.mark.parametrize("patch_size", [8, 4])
def test_vit_backbone_accepts_global_and_local_sizes(patch_size):
    bb = build_backbone("vit_tiny_patch16_224", patch_size=patch_size, img_size=32)
    assert bb.num_features == 192


def test_vit_backbone_has_no_classifier_and_drop_path():
    bb = build_backbone(
        "vit_tiny_patch16_224", patch_size=8, img_size=32, drop_path_rate=0.3, **TINY_VIT
    )
    assert isinstance(bb.head, nn.Identity)
    assert bb.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_resnet50_backbone_and_patch_size_error():
    bb = build_backbone("resnet50", img_size=32)
    assert bb.num_features == 2048
    assert bb(torch.randn(2, 3, 32, 32)).shape == (2, 2048)
    with pytest.raises(ValueError, match="patch_size"):
        build_backbone("resnet50", patch_size=16)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("no_such_model_xyz")


def test_head_shapes_and_layers():
    head = DINOHead(in_dim=12, out_dim=50, hidden_dim=20, bottleneck_dim=6, nlayers=3)
    assert head(torch.randn(4, 12)).shape == (4, 50)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 20), (20, 20), (20, 6)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)
    for m in linears:
        assert torch.all(m.bias == 0)
    # trunc-normal std 0.02 (truncated at +-2 absolute, as the reference: effectively normal)
    big = DINOHead(in_dim=64, out_dim=10, hidden_dim=256, bottleneck_dim=8)
    assert big.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    bn = DINOHead(in_dim=12, out_dim=50, hidden_dim=20, bottleneck_dim=6, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.mlp) == 2
    one = DINOHead(in_dim=12, out_dim=50, bottleneck_dim=6, nlayers=1)
    assert [type(m) for m in one.mlp] == [nn.Linear]
    with pytest.raises(ValueError):
        DINOHead(in_dim=12, nlayers=0)


def test_normalised_last_layer_has_unit_rows_and_frozen_gain():
    torch.manual_seed(0)
    head = DINOHead(in_dim=8, out_dim=30, hidden_dim=16, bottleneck_dim=5, norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.shape == (30, 1) and not g.requires_grad and torch.all(g == 1)
    assert v.requires_grad
    # a training step changes v but every effective row stays of norm 1
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(4, 8)).pow(2).sum().backward()
    v_before = v.detach().clone()
    opt.step()
    assert not torch.equal(v_before, v.detach())
    row_norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(30))
    # bottleneck features are L2-normalised, so |logit| <= 1 when rows have norm 1
    assert head(torch.randn(16, 8) * 100).abs().max() <= 1 + 1e-5

    free = DINOHead(in_dim=8, out_dim=30, hidden_dim=16, bottleneck_dim=5, norm_last_layer=False)
    g_free = free.last_layer.parametrizations.weight.original0
    assert g_free.requires_grad and torch.all(g_free == 1)


def test_reference_state_dict_round_trip_and_old_api_equivalence():
    head = DINOHead(in_dim=8, out_dim=12, hidden_dim=16, bottleneck_dim=5)
    wrapper = MultiCropWrapper(nn.Identity(), head)
    ref = reference_state_dict(wrapper.state_dict())
    assert "head.last_layer.weight_g" in ref and "head.last_layer.weight_v" in ref
    assert not any("parametrizations" in k for k in ref)
    back = from_reference_state_dict(ref)
    assert back.keys() == wrapper.state_dict().keys()
    wrapper.load_state_dict(back)
    # the reference-named tensors load into a layer built with the legacy weight_norm API
    with pytest.warns(FutureWarning):
        legacy = nn.utils.weight_norm(nn.Linear(5, 12, bias=False))
    legacy.load_state_dict(
        {"weight_g": ref["head.last_layer.weight_g"], "weight_v": ref["head.last_layer.weight_v"]}
    )
    x = torch.randn(3, 5)
    torch.testing.assert_close(legacy(x), head.last_layer(x))


class CountingBackbone(nn.Module):
    """Records the batch shape of every forward call."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.proj(x.mean(dim=(2, 3)))


def test_multicrop_wrapper_one_backbone_forward_per_resolution():
    backbone = CountingBackbone()
    head = DINOHead(in_dim=6, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    model = MultiCropWrapper(backbone, head)
    batch = 3
    crops = [torch.randn(batch, 3, 32, 32) for _ in range(2)]
    crops += [torch.randn(batch, 3, 16, 16) for _ in range(8)]
    out = model(crops)
    assert out.shape == (10 * batch, 10)
    assert backbone.calls == [(2 * batch, 3, 32, 32), (8 * batch, 3, 16, 16)]
    # output rows are in crop order: equal to running each crop alone
    expected = torch.cat([head(backbone(c)) for c in crops])
    torch.testing.assert_close(out, expected)
    # non-consecutive resolutions are separate groups; a single tensor is accepted
    backbone.calls.clear()
    model([crops[0], crops[2], crops[1]])
    assert len(backbone.calls) == 3
    assert model(crops[0]).shape == (batch, 10)
    with pytest.raises(ValueError):
        model([])


def test_student_teacher_pair():
    torch.manual_seed(0)
    student, teacher = build_student_teacher(
        "vit_tiny_patch16_224",
        patch_size=8,
        img_size=16,
        drop_path_rate=0.2,
        out_dim=40,
        hidden_dim=16,
        bottleneck_dim=8,
        nlayers=3,
        use_bn=False,
        norm_last_layer=False,
        **TINY_VIT,
    )
    # stochastic depth grows linearly over blocks; the teacher has none
    assert student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert isinstance(teacher.backbone.blocks[-1].drop_path1, nn.Identity)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in student.parameters())
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8)]
    assert student(crops).shape == (6, 40)
    student.eval()
    torch.testing.assert_close(student(crops[:2]), teacher(crops[:2]))
