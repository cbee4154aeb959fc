"""Backbones, DINO head, multi-crop wrapper and the student/teacher pair."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from dino_cluster.dino.keys import from_reference_state_dict, reference_state_dict
from dino_cluster.dino.model import (
    DINOHead,
    MultiCropWrapper,
    build_backbone,
    build_student_teacher,
    interpolate_pos_embed_reference,
    pos_embed_interpolation_of,
    reference_token_init,
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


# ----------------------------------------------------------------------------------------------
# Reference-exact ViT: position-embedding interpolation and cls/pos init


def _reference_formula(pos_embed: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """The reference DINO interpolate_pos_encoding, written out directly (one class token)."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    side = math.sqrt(n)
    grid = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(
        grid, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic"
    )
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _bicubic_matrix(n_in: int, n_out: int, scale_factor: float) -> np.ndarray:
    """Rows of cubic-convolution weights (a = -0.75, half-pixel centres, border clamped):
    PyTorch's bicubic when the scale factor, not the sizes, places the samples."""
    a = -0.75

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale_factor - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k, weight in zip(
            range(-1, 3), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=True
        ):
            w[i, min(max(x0 + k, 0), n_in - 1)] += weight
    return w


@pytest.mark.parametrize("grid", [(6, 6), (4, 7), (2, 2), (15, 15)])
def test_reference_interpolation_matches_the_formula(grid):
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    got = interpolate_pos_embed_reference(pos, grid, (14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(got, _reference_formula(pos, *grid))
    assert torch.equal(got[:, 0], pos[:, 0])  # the class token's embedding is kept
    # independently of F.interpolate: separable cubic convolution at the scale factors
    rows = _bicubic_matrix(14, grid[0], (grid[0] + 0.1) / 14)
    cols = _bicubic_matrix(14, grid[1], (grid[1] + 0.1) / 14)
    patches = pos[0, 1:].reshape(14, 14, 8).double().numpy()
    manual = np.einsum("ri,ijd,cj->rcd", rows, patches, cols).reshape(-1, 8)
    np.testing.assert_allclose(got[0, 1:].double().numpy(), manual, atol=1e-5)


def test_reference_interpolation_differs_from_timm_and_keeps_the_nominal_grid():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 16) * 0.02
    assert interpolate_pos_embed_reference(pos, (14, 14), (14, 14), 1) is pos
    ref = interpolate_pos_embed_reference(pos, (6, 6), (14, 14), 1)
    timm_way = resample_abs_pos_embed(pos, new_size=(6, 6), old_size=(14, 14), num_prefix_tokens=1)
    rel = ((ref - timm_way)[:, 1:].norm() / ref[:, 1:].norm()).item()
    assert rel > 0.3  # the 96-px local crops of ViT-S/16: antialiasing changes them a lot
    # upsampling (no antialiasing either way) still differs: the +0.1 moves the samples
    up = interpolate_pos_embed_reference(pos, (16, 16), (14, 14), 1)
    timm_up = resample_abs_pos_embed(pos, new_size=(16, 16), old_size=(14, 14))
    assert not torch.allclose(up, timm_up, atol=1e-6)
    with pytest.raises(ValueError, match="patch entries"):
        interpolate_pos_embed_reference(pos, (6, 6), (10, 10), 1)


def _pooled(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().flatten() for v in values]).double()


def test_reference_init_of_cls_token_and_pos_embed_is_truncated_normal_002():
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_patch16_224", patch_size=8, img_size=32, **TINY_VIT)
    cls_draws, pos_draws = [], []
    for _ in range(200):  # 200 x 16 cls values, 200 x 17 x 16 pos values
        reference_token_init(bb)
        cls_draws.append(bb.cls_token.clone())
        pos_draws.append(bb.pos_embed.clone())
    for x in (_pooled(cls_draws), _pooled(pos_draws)):
        assert x.abs().max() <= 2.0  # the reference's cut (absolute, ~100 sigma)
        assert abs(x.mean().item()) < 0.002
        assert x.std().item() == pytest.approx(0.02, rel=0.05)
        # a normal's mass within 1 and 2 standard deviations: truncated at +-2, not +-2 sigma
        assert (x.abs() < 0.02).double().mean().item() == pytest.approx(0.6827, abs=0.03)
        assert (x.abs() < 0.04).double().mean().item() == pytest.approx(0.9545, abs=0.015)
        assert (x.abs() > 0.05).any()  # a normal has tails beyond 2 sigma
    # what build_backbone gives by default, and timm's behaviour as the option
    default = build_backbone("vit_small_patch16_224", patch_size=16, img_size=32, depth=1)
    assert default.cls_token.std().item() == pytest.approx(0.02, rel=0.25)
    assert pos_embed_interpolation_of(default) == "reference"
    timm_bb = build_backbone(
        "vit_small_patch16_224", patch_size=16, img_size=32, depth=1, pos_embed_interpolation="timm"
    )
    assert timm_bb.cls_token.std().item() < 1e-5
    assert pos_embed_interpolation_of(timm_bb) == "timm"
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        build_backbone("vit_tiny_patch16_224", pos_embed_interpolation="bilinear")


def test_vit_backbone_uses_the_reference_interpolation_for_other_crop_sizes():
    torch.manual_seed(0)
    ref = build_backbone("vit_tiny_patch16_224", patch_size=8, img_size=32, **TINY_VIT).eval()
    timm_bb = build_backbone(
        "vit_tiny_patch16_224",
        patch_size=8,
        img_size=32,
        pos_embed_interpolation="timm",
        **TINY_VIT,
    ).eval()
    timm_bb.load_state_dict(ref.state_dict())
    pos, cls = ref.pos_embed.detach(), ref.cls_token.detach()
    # zero patch tokens: what _pos_embed returns is the class token + the embedding it used
    for grid in ((2, 2), (3, 5)):
        zeros = torch.zeros(2, *grid, 16)
        expected = _reference_formula(pos, *grid) + torch.cat(
            [cls, torch.zeros(1, grid[0] * grid[1], 16)], dim=1
        )
        torch.testing.assert_close(ref._pos_embed(zeros), expected.expand(2, -1, -1))
        timm_pos = resample_abs_pos_embed(pos, new_size=grid, old_size=(4, 4))
        timm_expected = timm_pos + torch.cat([cls, torch.zeros(1, grid[0] * grid[1], 16)], dim=1)
        torch.testing.assert_close(timm_bb._pos_embed(zeros), timm_expected.expand(2, -1, -1))
    # at the nominal size the reference path is timm's, token for token
    x32 = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ref(x32), timm_bb(x32), rtol=0, atol=0)
    x16 = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(ref(x16), timm_bb(x16))
    # the override survives a deepcopy (bound to the copy) and reaches forward_intermediates
    clone = copy.deepcopy(ref)
    assert clone._pos_embed.__self__ is clone
    torch.testing.assert_close(clone(x16), ref(x16))
    inter = ref.get_intermediate_layers(x16, 1, return_prefix_tokens=True, norm=True)
    torch.testing.assert_close(inter[-1][1][:, 0], ref(x16))


def test_student_and_teacher_run_global_and_local_crops_with_the_reference_vit():
    torch.manual_seed(0)
    # the quickstart's shape, fewer blocks: 32-px global and 16-px local crops, patch 8
    student, teacher = build_student_teacher(
        "vit_tiny_patch16_224",
        patch_size=8,
        img_size=32,
        drop_path_rate=0.0,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        embed_dim=128,
        num_heads=4,
        depth=1,
    )
    for net in (student, teacher):
        assert pos_embed_interpolation_of(net.backbone) == "reference"
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [
        torch.randn(2, 3, 16, 16) for _ in range(4)
    ]
    out = student(crops)
    assert out.shape == (12, 64) and torch.isfinite(out).all()
    assert teacher(crops[:2]).shape == (4, 64)
    assert student.backbone.cls_token.std().item() > 1e-3  # not timm's 1e-6
    _, timm_teacher = build_student_teacher(
        "vit_tiny_patch16_224",
        patch_size=8,
        img_size=32,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        pos_embed_interpolation="timm",
        **TINY_VIT,
    )
    assert pos_embed_interpolation_of(timm_teacher.backbone) == "timm"
