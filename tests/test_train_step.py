"""The fast training step (dino_cluster/train/step.py) against the paper-style reference step
(benchmarks/train_step.py), the `performance` options, and the sync-free non-finite skip."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dino_cluster.dino.model import build_student_teacher, set_attention
from dino_cluster.spec import SpecError, load_spec
from dino_cluster.train.step import TrainStep, prepare_models

REPO = Path(__file__).resolve().parents[1]
OUT_DIM, N_LOCAL, BATCH = 256, 4, 4
KW = dict(epoch=1.0, teacher_temp=0.04, momentum=0.99)


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_train_step", REPO / "benchmarks/train_step.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def tiny_nets(seed: int = 0):
    torch.manual_seed(seed)
    return build_student_teacher(
        "vit_small_patch16_224",
        patch_size=8,
        img_size=32,
        depth=2,
        embed_dim=32,
        num_heads=2,
        out_dim=OUT_DIM,
        hidden_dim=64,
        bottleneck_dim=32,
        drop_path_rate=0.0,  # no randomness: both steps see the same network
    )


def make_crops(seed: int = 1, device: str = "cpu", nan: str | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(BATCH, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(N_LOCAL)]
    if nan == "student":  # a local crop: only the student sees it, the teacher stays finite
        crops[-1][0, 0, 0, 0] = float("nan")
    elif nan == "teacher":
        crops[0][0, 0, 0, 0] = float("nan")
    return [c.to(device) for c in crops]


def both_steps(impl: str, clip: float = 0.05, lr: float = 1e-3):
    student, teacher = tiny_nets()
    dev = torch.device("cpu")
    ref = bench.make_reference(student, teacher, 2 + N_LOCAL, OUT_DIM, dev)
    ours = bench.make_ours(student, teacher, 2 + N_LOCAL, OUT_DIM, dev, optimizer=impl)
    set_attention(ours.step.model, "eager")  # same kernels: differences are the step's own
    set_attention(ours.step.teacher, "eager")
    for v in (ref, ours):
        v.step.clip_grad = clip  # small enough that per-parameter clipping acts
        v.set_lr(lr, 0.04)
    return ref, ours


def assert_close_modules(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    """Every element within `atol`, except that Adam turns float noise in a gradient that is
    ~0 into up to a whole step (lr * g / (|g| + eps)): a rare element may then differ by a
    fraction of a step (< 5 % of lr = 1e-3; weight decay alone moves an element ~1e-6)."""
    assert_close_states(a.state_dict(), b.state_dict(), atol)


def assert_close_states(sa: dict, sb: dict, atol: float) -> None:
    assert sa.keys() == sb.keys()
    far = total = 0
    for k in sa:
        d = (sa[k].float() - sb[k].float()).abs()
        if k.endswith("attn.qkv.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a constant added to
            # every logit): its Adam updates are float noise, different in any two kernels.
            n = d.numel() // 3
            d = torch.cat([d[:n], d[2 * n :]])
        assert d.max() < 5e-5, (k, d.max().item())
        far += int((d > atol).sum())
        total += d.numel()
    assert far <= max(2, total // 5000), f"{far} of {total} elements differ by more than {atol}"


def snapshot(step: TrainStep) -> dict[str, torch.Tensor]:
    out = {f"s.{k}": v.clone() for k, v in step.model.state_dict().items()}
    out |= {f"t.{k}": v.clone() for k, v in step.teacher.state_dict().items()}
    out["center"] = step.dino_loss.center.clone()
    for i, state in enumerate(step.optimizer.state.values()):
        out |= {f"o{i}.{k}": v.clone() for k, v in state.items()}
    return out


def assert_unchanged(before: dict[str, torch.Tensor], step: TrainStep) -> None:
    after = snapshot(step)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


# ----------------------------------------------------------------------------------------------
# Same loss and same weights as the reference-style step


@pytest.mark.parametrize("impl", ["foreach", "fused", "single"])
def test_fast_step_matches_reference_step(impl: str) -> None:
    ref, ours = both_steps(impl)
    assert ours.step.sync_free == (impl == "fused")
    for i in range(3):  # step 2+ depends on the teacher EMA, the center and Adam's moments
        crops = make_crops(seed=10 + i)
        ref_loss = ref.step(crops, **KW)
        our_loss = ours.step(crops, **KW)
        torch.testing.assert_close(our_loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.step.dino_loss.center, ref.step.dino_loss.center)
        assert_close_modules(ours.step.model, ref.step.student, atol=2e-6)
        assert_close_modules(ours.step.teacher, ref.step.teacher, atol=2e-6)
    assert ours.step.check().skipped == 0


def test_attention_eager_and_sdpa_give_the_same_outputs_and_gradients() -> None:
    student, _ = tiny_nets()
    assert set_attention(student, "eager") == 2  # one attention block per layer
    crops = make_crops()
    out_eager = student(crops)
    out_eager.square().mean().backward()
    g_eager = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad(set_to_none=True)
    set_attention(student, "sdpa")
    out_sdpa = student(crops)
    out_sdpa.square().mean().backward()
    g_sdpa = [p.grad for p in student.parameters() if p.grad is not None]
    torch.testing.assert_close(out_sdpa, out_eager, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_sdpa, g_eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-3)
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        set_attention(student, "flash")


def test_channels_last_step_gives_the_same_weights() -> None:
    results = []
    for channels_last in (False, True):
        student, teacher = tiny_nets()
        prepare_models(student, teacher, channels_last=channels_last)
        conv = student.backbone.patch_embed.proj.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        from dino_cluster.dino.loss import DINOLoss
        from dino_cluster.dino.optim import build_optimizer, param_groups

        opt = build_optimizer(param_groups(student), lr=1e-3)
        step = TrainStep(
            student, teacher, DINOLoss(OUT_DIM, 2 + N_LOCAL), opt, clip_grad=3.0,
            channels_last=channels_last,
        )  # fmt: skip
        losses = [step(make_crops(seed=s), **KW) for s in (1, 2)]
        results.append((losses, student.state_dict(), teacher.state_dict()))
    (l0, s0, t0), (l1, s1, t1) = results
    torch.testing.assert_close(torch.stack(l1), torch.stack(l0), atol=1e-5, rtol=1e-5)
    assert_close_states(s1, s0, atol=2e-6)
    assert_close_states(t1, t0, atol=2e-6)


def test_compiled_backbones_trace_both_resolutions_and_keep_state_dict_keys() -> None:
    """torch.compile with the aot_eager backend (the same dynamo + autograd graphs, no code
    generation: inductor takes minutes on 2 CPU cores; the GPU test below uses it)."""
    student, teacher = tiny_nets()
    keys = list(student.state_dict())
    ref_out = student(make_crops()).detach()
    prepare_models(student, teacher, compile=True, compile_backend="aot_eager")
    assert list(student.state_dict()) == keys  # checkpoints and the EMA see plain modules
    out = student(make_crops())
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref_out, atol=1e-5, rtol=1e-4)
    assert student.backbone.patch_embed.proj.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# Non-finite steps: skipped on the device, counted, agreed


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_sync_free_skip_leaves_everything_unchanged(where: str) -> None:
    _, ours = both_steps("fused")
    step = ours.step
    assert step.sync_free
    step(make_crops(seed=1), **KW)  # optimizer state exists
    before = snapshot(step)
    loss = step(make_crops(seed=2, nan=where), **KW)
    assert not torch.isfinite(loss)
    assert_unchanged(before, step)  # weights, teacher, center, Adam moments and step count
    check = step.check()
    assert (check.skipped, check.longest, check.stop) == (1, 1, False)
    step(make_crops(seed=3), **KW)
    assert not torch.equal(before["s.backbone.cls_token"], step.model.backbone.cls_token)
    assert step.check().longest == 0  # the run ended at the previous check's step


def test_sync_free_and_per_step_paths_make_the_same_decisions() -> None:
    """fused AdamW both times: the sync-free path (device-side skip) and the per-step host
    check give the same weights through good, bad, bad, good steps."""
    _, a = both_steps("fused")
    _, b = both_steps("fused")
    b.step.sync_free = False
    for seed, nan in ((1, None), (2, "student"), (3, "teacher"), (4, None)):
        for v in (a, b):
            v.step(make_crops(seed=seed, nan=nan), **KW)
    assert_close_modules(a.step.model, b.step.model, atol=1e-7)
    assert_close_modules(a.step.teacher, b.step.teacher, atol=1e-7)
    torch.testing.assert_close(a.step.dino_loss.center, b.step.dino_loss.center)
    ca, cb = a.step.check(), b.step.check()
    assert (ca.skipped, ca.longest) == (cb.skipped, cb.longest) == (2, 2)


def test_sync_free_skip_with_grad_scaler_skips_the_update() -> None:
    """fp16 path: the loss is multiplied by NaN so the scaler's own check skips the fused
    update; the scaler backs its scale off, as for any overflow."""
    _, ours = both_steps("fused")
    s = ours.step
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    step = TrainStep(s.model, s.teacher, s.dino_loss, s.optimizer, scaler, clip_grad=0.05)
    assert step.sync_free
    step(make_crops(seed=1), **KW)
    before, scale = snapshot(step), scaler.get_scale()
    step(make_crops(seed=2, nan="student"), **KW)
    assert_unchanged(before, step)
    assert scaler.get_scale() == scale / 2
    assert step.check().skipped == 1


def test_consecutive_runs_are_tracked_across_checks() -> None:
    _, ours = both_steps("fused")
    step = ours.step
    pattern = [None, "student", None, "student", "student", "teacher"]
    for i, nan in enumerate(pattern[:4]):
        step(make_crops(seed=i, nan=nan), **KW)
    c = step.check()
    assert (c.skipped, c.longest) == (2, 1)  # two runs of one, the second still open
    for i, nan in enumerate(pattern[4:]):
        step(make_crops(seed=9 + i, nan=nan), **KW)
    c = step.check()
    assert (c.skipped, c.longest) == (4, 3)  # the open run went on across the check


def test_sync_free_needs_a_fused_optimizer() -> None:
    _, ours = both_steps("foreach")
    s = ours.step
    with pytest.raises(ValueError, match="fused AdamW"):
        TrainStep(s.model, s.teacher, s.dino_loss, s.optimizer, sync_free=True)


# ----------------------------------------------------------------------------------------------
# Two gloo ranks through train(): a non-finite loss on one rank and a stop on one rank


def _rank_main(rank: int, world: int, port: int, spec_yaml: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    from dino_cluster.dino import loss as loss_mod
    from dino_cluster.train.distributed import shutdown
    from dino_cluster.train.loop import train
    from dino_cluster.train.signals import StopRequest

    stop = StopRequest()
    real_forward = loss_mod.DINOLoss.forward
    calls = {"n": 0}

    def forward(self, s, t, temp):  # rank 1 only: NaN at its 3rd step, a stop at its 5th
        calls["n"] += 1
        out = real_forward(self, s, t, temp)
        if rank == 1 and calls["n"] == 5:
            stop.request("test")
        return out * float("nan") if rank == 1 and calls["n"] == 3 else out

    loss_mod.DINOLoss.forward = forward
    result = train(load_spec(spec_yaml), stop=stop, install_signal_handlers=False)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "digest": result.digest,
                "step": result.step,
                "status": result.status,
                "skipped": result.skipped_steps,
            }
        )  # fmt: skip
    )
    shutdown()


def test_two_ranks_sync_free_skip_and_stop_agree(tmp_path: Path, fmnist_shards: Path) -> None:
    from dino_cluster.checkpointing import CheckpointManager
    from dino_cluster.launch.procs import free_port
    from dino_cluster.spec import write_resolved

    spec = load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [
            f"run.dir={tmp_path / 'runs'}", f"data.url={fmnist_shards}",
            "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.out_dim=256",
            "model.hidden_dim=64", "model.bottleneck_dim=32", "method.crops.n_local=2",
            "data.num_workers=0", "data.shuffle_buffer=64", "metrics.log_every_steps=2",
            "launcher.procs_per_node=2", "optim.max_steps=12", "optim.global_batch=16",
            "checkpoint.every_steps=100",
            "performance.fused_optimizer=fused",  # the sync-free path, on CPU
            "performance.ddp_static_graph=true", "performance.ddp_bucket_mb=1",
        ],
    )  # fmt: skip
    spec_path = write_resolved(spec, tmp_path / "spec")
    mp.start_processes(
        _rank_main, args=(2, free_port(), str(spec_path), str(tmp_path)), nprocs=2, join=True,
        start_method="spawn",
    )  # fmt: skip
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # The stop reached rank 1 during step 5; the ranks agree at the next check (step 6).
    assert r0["status"] == r1["status"] == "stopped"
    assert r0["step"] == r1["step"] == 6
    assert r0["skipped"] == r1["skipped"] == 1  # rank 1's NaN skipped the step everywhere
    assert r0["digest"] == r1["digest"]
    latest = CheckpointManager(spec.checkpoint_url, is_writer=False).load()
    assert latest is not None and latest[0] == 6


def test_sync_free_train_raises_on_a_nonfinite_run_at_the_next_check(
    tmp_path: Path, fmnist_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dino_cluster.dino import loss as loss_mod
    from dino_cluster.train.loop import NonFiniteLossError, train

    real_forward = loss_mod.DINOLoss.forward
    calls = {"n": 0}

    def flaky(self, s, t, temp):  # non-finite from the 2nd step on
        calls["n"] += 1
        out = real_forward(self, s, t, temp)
        return out * float("nan") if calls["n"] >= 2 else out

    monkeypatch.setattr(loss_mod.DINOLoss, "forward", flaky)
    spec = load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [
            f"run.dir={tmp_path / 'runs'}", f"data.url={fmnist_shards}", "model.depth=1",
            "model.embed_dim=32", "model.num_heads=2", "model.out_dim=256",
            "model.hidden_dim=64", "model.bottleneck_dim=32", "method.crops.n_local=2",
            "data.num_workers=0", "data.shuffle_buffer=64", "optim.max_steps=20",
            "optim.global_batch=16", "metrics.log_every_steps=4",
            "method.max_nonfinite_steps=3", "performance.fused_optimizer=fused",
        ],
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses") as err:
        train(spec, install_signal_handlers=False)
    # Steps 2-4 are the 3rd in a row at step 4, a check step: detected there, not later.
    assert "seen at step 4, 3 skipped" in str(err.value)
    rows = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 3.0


# ----------------------------------------------------------------------------------------------
# The spec section


def test_performance_spec_defaults_and_errors(tmp_path: Path) -> None:
    base = REPO / "jobs" / "quickstart-vit.yaml"
    perf = load_spec(base).performance
    assert (perf.compile, perf.attention, perf.channels_last, perf.fused_optimizer) == (
        False, "sdpa", False, "auto",
    )  # fmt: skip
    assert perf.pin_memory and not perf.ddp_static_graph and perf.ddp_bucket_mb == 25
    with pytest.raises(SpecError) as err:
        load_spec(base, ["performance.atention=eager"])
    assert "performance.atention: unknown key" in str(err.value)
    with pytest.raises(SpecError) as err:
        load_spec(base, ["performance.attention=flash"])
    assert "'sdpa' or 'eager'" in str(err.value) and "flash" in str(err.value)
    with pytest.raises(SpecError) as err:
        load_spec(base, ["performance.fused_optimizer=apex"])
    assert "'auto', 'fused', 'foreach' or 'single'" in str(err.value)
    with pytest.raises(SpecError, match="performance.ddp_bucket_mb"):
        load_spec(base, ["performance.ddp_bucket_mb=0"])
    with pytest.raises(SpecError, match="performance.compile"):
        load_spec(base, ["performance.compile=maybe"])


# ----------------------------------------------------------------------------------------------
# GPU only (benchmarks/gpu_check.sh runs these)


def _cuda_step(amp: torch.dtype, scaler: bool):
    from dino_cluster.dino.loss import DINOLoss
    from dino_cluster.dino.optim import build_optimizer, param_groups

    student, teacher = tiny_nets()
    student.cuda(), teacher.cuda()
    opt = build_optimizer(param_groups(student), lr=1e-3)  # auto: fused on CUDA
    sc = torch.amp.GradScaler("cuda") if scaler else None
    loss = DINOLoss(OUT_DIM, 2 + N_LOCAL).cuda()
    return TrainStep(student, teacher, loss, opt, sc, amp_dtype=amp, clip_grad=3.0)


@pytest.mark.gpu
def test_cuda_step_makes_no_host_sync() -> None:
    step = _cuda_step(torch.bfloat16, scaler=False)
    assert step.sync_free
    crops = make_crops(device="cuda")
    for _ in range(2):  # lazy optimizer state, cuBLAS handles
        step(crops, **KW)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(crops, **KW)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.check().skipped == 0


@pytest.mark.gpu
@pytest.mark.parametrize("amp,scaler", [(torch.bfloat16, False), (torch.float16, True)])
def test_cuda_non_finite_step_is_skipped(amp: torch.dtype, scaler: bool) -> None:
    step = _cuda_step(amp, scaler)
    step(make_crops(device="cuda"), **KW)
    before = snapshot(step)
    step(make_crops(seed=2, nan="student", device="cuda"), **KW)
    assert_unchanged(before, step)
    assert step.check().skipped == 1


@pytest.mark.gpu
def test_cuda_inductor_compile_matches_eager() -> None:
    student, teacher = tiny_nets()
    student.cuda(), teacher.cuda()
    crops = make_crops(device="cuda")
    ref = student(crops).detach()
    prepare_models(student, teacher, compile=True)
    out = student(crops)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, atol=1e-4, rtol=1e-3)
