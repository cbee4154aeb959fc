"""DINO loss, center EMA and diagnostics against independent loop implementations."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dino_cluster.dino.loss import DINOLoss
from dino_cluster.dino.model import build_student_teacher
from dino_cluster.dino.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    param_groups,
)


def naive_dino_loss(student_out, teacher_out, center, n_crops, t_temp, s_temp=0.1):
    """The loss written as the paper describes it: a loop over (teacher, student) view pairs."""
    s_views = (student_out.double() / s_temp).chunk(n_crops)
    t_views = F.softmax((teacher_out.double() - center.double()) / t_temp, dim=-1).chunk(2)
    total, n_terms = 0.0, 0
    for i, q in enumerate(t_views):
        for v in range(n_crops):
            if v == i:
                continue  # same view seen by both networks: skipped
            total = total + torch.sum(-q * F.log_softmax(s_views[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms, n_terms


def make_outputs(n_crops, batch, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n_crops * batch, dim, generator=g) * 3
    teacher = torch.randn(2 * batch, dim, generator=g) * 3
    return student, teacher


@pytest.mark.parametrize("n_crops", [2, 3, 10])
def test_loss_matches_pair_loop(n_crops):
    student, teacher = make_outputs(n_crops, batch=4, dim=7)
    loss_fn = DINOLoss(out_dim=7, n_crops=n_crops)
    loss_fn.center.copy_(torch.linspace(-1, 1, 7)[None])  # a non-zero center must be used
    center_before = loss_fn.center.clone()
    expected, n_terms = naive_dino_loss(student, teacher, center_before, n_crops, t_temp=0.04)
    assert n_terms == 2 * n_crops - 2
    got = loss_fn(student, teacher, teacher_temp=0.04)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_eighteen_term_average_for_two_plus_eight_crops():
    # Build a case where every pair's cross-entropy is a different known number, so a wrong
    # pair set or a sum instead of a mean gives a different answer.
    dim, n_crops = 4, 10  # batch of 1
    teacher = torch.tensor([[50.0, 0, 0, 0], [0, 50.0, 0, 0]])  # ~one-hot on dims 0 and 1
    student = torch.zeros(n_crops, dim)
    for v in range(n_crops):
        student[v, 0] = 0.1 * v  # log P_s[v, d] differs per view
        student[v, 1] = -0.05 * v
    loss_fn = DINOLoss(out_dim=dim, n_crops=n_crops)
    got = loss_fn(student, teacher, teacher_temp=1.0)
    log_ps = F.log_softmax(student.double() / 0.1, dim=-1)
    pt = F.softmax(teacher.double(), dim=-1)
    terms = [-(pt[i] * log_ps[v]).sum() for i in range(2) for v in range(n_crops) if v != i]
    assert len(terms) == 18
    expected = sum(terms) / 18
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # including the same-view pairs would give a different value
    with_same = (sum(terms) - (pt[0] * log_ps[0]).sum() - (pt[1] * log_ps[1]).sum()) / 20
    assert not torch.isclose(got.double(), with_same, rtol=1e-4)


def test_same_view_pairs_are_skipped_two_crops():
    student, teacher = make_outputs(2, batch=3, dim=5, seed=1)
    loss_fn = DINOLoss(out_dim=5, n_crops=2)
    got = loss_fn(student, teacher, teacher_temp=0.07)
    s = F.log_softmax(student.double() / 0.1, dim=-1).chunk(2)
    t = F.softmax(teacher.double() / 0.07, dim=-1).chunk(2)
    expected = 0.5 * (-(t[0] * s[1]).sum(-1).mean() - (t[1] * s[0]).sum(-1).mean())
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_gradient_matches_pair_loop_and_teacher_gets_none():
    student, teacher = make_outputs(4, batch=2, dim=6, seed=2)
    s1 = student.clone().requires_grad_(True)
    t1 = teacher.clone().requires_grad_(True)
    DINOLoss(out_dim=6, n_crops=4)(s1, t1, teacher_temp=0.05).backward()
    s2 = student.double().requires_grad_(True)
    naive_dino_loss(s2, teacher, torch.zeros(1, 6), 4, t_temp=0.05)[0].backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-5, atol=1e-7)
    assert t1.grad is None  # teacher output is detached


def test_loss_is_float32_under_bf16_autocast():
    student, teacher = make_outputs(3, batch=2, dim=8, seed=3)
    plain = DINOLoss(out_dim=8, n_crops=3)(student, teacher, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = DINOLoss(out_dim=8, n_crops=3)(student, teacher, 0.04)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


def test_center_update_formula_single_process():
    _, teacher1 = make_outputs(2, batch=3, dim=5, seed=4)
    student2, teacher2 = make_outputs(2, batch=3, dim=5, seed=5)
    loss_fn = DINOLoss(out_dim=5, n_crops=2, center_momentum=0.9)
    loss_fn.update_center(teacher1)
    c1 = 0.9 * torch.zeros(1, 5) + 0.1 * teacher1.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, c1)
    # forward uses the current center for the loss, then updates it
    expected_loss, _ = naive_dino_loss(student2, teacher2, c1, 2, t_temp=0.04)
    loss = loss_fn(student2, teacher2, 0.04)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    c2 = 0.9 * c1 + 0.1 * teacher2.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, c2)
    assert loss_fn.center.shape == (1, 5)
    assert "center" in loss_fn.state_dict()


def test_non_finite_teacher_batch_leaves_center_unchanged():
    loss_fn = DINOLoss(out_dim=4, n_crops=2)
    loss_fn.update_center(torch.ones(4, 4))
    before = loss_fn.center.clone()
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    loss_fn.update_center(bad)
    assert torch.equal(loss_fn.center, before)
    bad[1, 2] = float("inf")
    loss_fn.update_center(bad)
    assert torch.equal(loss_fn.center, before)
    loss_fn.update_center(torch.full((4, 4), 3.0))  # finite batches update again
    torch.testing.assert_close(loss_fn.center, 0.9 * before + 0.1 * 3.0)


def test_diagnostics_entropy_and_kl():
    student, teacher = make_outputs(4, batch=3, dim=6, seed=6)
    loss_fn = DINOLoss(out_dim=6, n_crops=4)
    loss_fn.center.fill_(0.3)
    center = loss_fn.center.clone()
    pt = F.softmax((teacher.double() - center.double()) / 0.05, dim=-1)
    entropy = -(pt * pt.log()).sum(-1).mean()
    log_ps = F.log_softmax(student.double() / 0.1, dim=-1).chunk(4)
    pts = pt.chunk(2)
    kls = [
        (pts[i] * (pts[i].log() - log_ps[v])).sum(-1).mean()
        for i in range(2)
        for v in range(4)
        if v != i
    ]
    kl = sum(kls) / len(kls)
    torch.testing.assert_close(loss_fn.teacher_entropy(teacher, 0.05).double(), entropy)
    torch.testing.assert_close(
        loss_fn.kl_teacher_student(student, teacher, 0.05).double(), kl, rtol=1e-5, atol=1e-6
    )
    loss_fn(student, teacher, 0.05)  # stashes the same values, computed before the update
    torch.testing.assert_close(loss_fn.last_teacher_entropy.double(), entropy)
    torch.testing.assert_close(loss_fn.last_kl.double(), kl, rtol=1e-5, atol=1e-6)
    # uniform collapse signal: entropy of identical rows with huge temperature ~ log(D)
    flat = loss_fn.teacher_entropy(torch.zeros(4, 6), 1e6)
    assert math.isclose(flat.item(), math.log(6), rel_tol=1e-5)


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match="n_crops"):
        DINOLoss(out_dim=4, n_crops=1)
    loss_fn = DINOLoss(out_dim=4, n_crops=3)
    with pytest.raises(ValueError, match="student_out"):
        loss_fn(torch.zeros(5, 4), torch.zeros(2, 4), 0.04)
    with pytest.raises(ValueError, match="teacher_out"):
        loss_fn(torch.zeros(9, 4), torch.zeros(3, 4), 0.04)


# ----------------------------------------------------------------------------------------------
# Two processes with gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # different data on each rank
        # 1) update_center alone: each rank sees its own teacher rows
        teacher_rows = torch.randn(6, 5) + rank
        loss_fn = DINOLoss(out_dim=5, n_crops=3)
        loss_fn.update_center(teacher_rows)
        gathered = [torch.zeros(6, 5) for _ in range(2)]
        dist.all_gather(gathered, teacher_rows)

        # 2) a few DDP training steps of a tiny model
        torch.manual_seed(0)  # same initial weights on both ranks
        student, teacher = build_student_teacher(
            "vit_tiny_patch16_224",
            patch_size=8,
            img_size=16,
            drop_path_rate=0.1,
            out_dim=32,
            hidden_dim=16,
            bottleneck_dim=8,
            depth=1,
            embed_dim=16,
            num_heads=2,
        )
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        dino_loss = DINOLoss(out_dim=32, n_crops=4)
        opt = build_optimizer(param_groups(student), lr=1e-3)
        torch.manual_seed(200 + rank)
        for step in range(3):
            crops = [torch.randn(2, 3, 16, 16) for _ in range(2)]
            crops += [torch.randn(2, 3, 8, 8) for _ in range(2)]
            t_out = teacher(crops[:2])
            loss = dino_loss(ddp(crops), t_out, 0.04)
            opt.zero_grad()
            loss.backward()
            clip_gradients(student, 3.0)
            cancel_last_layer_gradients(ddp, epoch=step, freeze_last_layer=1)
            opt.step()
            ema_update(teacher, ddp, 0.99)
        torch.save(
            {
                "center": loss_fn.center,
                "all_rows": torch.cat(gathered),
                "train_center": dino_loss.center,
                "teacher": teacher.state_dict(),
                "student": student.state_dict(),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_identical_center_teacher_student(tmp_path):
    mp.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # center equals the global mean formula: 0.9 * 0 + 0.1 * mean over 2B * world rows
    expected = 0.1 * r0["all_rows"].mean(0, keepdim=True)
    torch.testing.assert_close(r0["center"], expected)
    assert torch.equal(r0["center"], r1["center"])
    assert torch.equal(r0["train_center"], r1["train_center"])
    assert not torch.equal(r0["train_center"], torch.zeros_like(r0["train_center"]))
    for part in ("teacher", "student"):
        assert r0[part].keys() == r1[part].keys()
        for key in r0[part]:
            assert torch.equal(r0[part][key], r1[part][key]), f"{part}.{key} differs"
