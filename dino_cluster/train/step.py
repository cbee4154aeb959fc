"""One DINO optimisation step, free of host-device synchronisation on the fused path.

A step: teacher on the 2 global crops, student on all crops (one backbone forward per
resolution), DINO loss, backward, clip, last-layer freeze, AdamW, EMA teacher. Every rank must
agree to skip a step whose loss is non-finite (on any rank) and to stop on a signal that
reached only some ranks; the question is only *when the host learns* about it.

- Sync-free path (fused AdamW, the default on CUDA): the "any rank non-finite" flag is an
  all-reduce on the device; the update is cancelled on the device: the fused AdamW kernel
  takes it as `found_inf` (parameters, moments and step count untouched), the center is
  restored with `torch.where`, and the EMA momentum becomes 1.0 (teacher unchanged). With an
  fp16 GradScaler the loss is multiplied by NaN instead, so that every gradient is NaN on every
  rank and the scaler's own check skips the fused update (it also halves its scale, as it does
  for any overflow). Counters of skipped steps live on the device; the host reads them, and
  agrees on a stop request, only in `check()`, which the loop calls at its logging cadence.
- Per-step path (foreach or single-tensor AdamW, the default on CPU): their kernels have no
  `found_inf` input, and cancelling their update on the device would mean snapshotting and
  restoring parameters and moments every step. They read the flags back every step (one
  host sync, as the reference's `loss.item()`) and skip on the host.

Both paths make the same decisions; tests/test_train_step.py checks that they give the same
weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from dino_cluster.dino.loss import DINOLoss
from dino_cluster.dino.model import set_attention
from dino_cluster.dino.optim import (
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    is_fused,
    unwrap,
)
from dino_cluster.train.distributed import all_reduce_max

if TYPE_CHECKING:
    from dino_cluster.spec import OptimSpec, PerformanceSpec

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after `method.max_nonfinite_steps` consecutive non-finite losses."""


@dataclass(frozen=True)
class StepCheck:
    skipped: int  # non-finite steps skipped since this TrainStep was built
    longest: int  # longest consecutive non-finite run that reached a step since the last check
    stop: bool  # every rank agreed to stop after the current step


def prepare_models(
    student: nn.Module,
    teacher: nn.Module,
    *,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: bool = False,
    compile_backend: str = "inductor",
) -> None:
    """Apply the `performance` options that change how the networks run, not what they compute.

    Call before building the optimizer (channels_last re-lays parameters out in place).
    `compile` compiles the backbones in place (`nn.Module.compile`), so state-dict keys,
    checkpoints and the EMA see the plain modules; `dynamic=False` gives one static graph per
    crop resolution, which is what a multi-crop step runs. `compile_backend` is for tests
    ("aot_eager" traces the same graphs without generating code).
    """
    for net in (student, teacher):
        set_attention(net, attention)
        if channels_last:
            # Only 4-D tensors change layout: in a ViT, the patch-embedding convolution.
            net.to(memory_format=torch.channels_last)
        if compile:
            backbone = getattr(net, "backbone", net)
            backbone.compile(dynamic=False, backend=compile_backend)


class TrainStep:
    """Callable: `step(crops, epoch=, teacher_temp=, momentum=)` -> the loss (a device tensor).

    `model` is the student, possibly DDP-wrapped; the optimizer's learning rate and weight
    decay are set by the caller before each call. `sync_free=None` picks the sync-free path
    exactly when the optimizer is fused.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        dino_loss: DINOLoss,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        *,
        amp_dtype: torch.dtype | None = None,
        clip_grad: float = 0.0,
        clip_mode: Literal["per_param", "global"] = "per_param",
        freeze_last_layer: int = 0,
        channels_last: bool = False,
        sync_free: bool | None = None,
    ) -> None:
        fused = is_fused(optimizer)
        if sync_free is None:
            sync_free = fused
        if sync_free and not fused:
            raise ValueError(
                "the sync-free step needs a fused AdamW (only its kernel can skip a step on the "
                "device); use fused_optimizer: fused or auto on CUDA"
            )
        self.model, self.teacher, self.dino_loss = model, teacher, dino_loss
        self.optimizer = optimizer
        self.device = dino_loss.center.device
        self.scaler = scaler or torch.amp.GradScaler(self.device.type, enabled=False)
        self.amp_dtype = amp_dtype
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.freeze_last_layer = freeze_last_layer
        self.channels_last = channels_last
        self.sync_free = sync_free
        # [skipped total, current consecutive run, longest run since the last check]
        self._counts = torch.zeros(3, dtype=torch.int64, device=self.device)
        self._host = [0, 0, 0]  # the same, for the per-step path
        self._stop = False

    @classmethod
    def from_spec(
        cls,
        optim: OptimSpec,
        performance: PerformanceSpec,
        model: nn.Module,
        teacher: nn.Module,
        dino_loss: DINOLoss,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        *,
        amp_dtype: torch.dtype | None,
    ) -> TrainStep:
        """The step the `optim` (clipping, last-layer freeze) and `performance` sections ask for."""
        return cls(
            model,
            teacher,
            dino_loss,
            optimizer,
            scaler,
            amp_dtype=amp_dtype,
            clip_grad=optim.clip_grad,
            clip_mode=optim.clip_mode,
            freeze_last_layer=optim.freeze_last_layer,
            channels_last=performance.channels_last,
        )

    # ------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_loss(self, crops: Sequence[Tensor], teacher_temp: float) -> Tensor:
        """Teacher on the global crops, student on all, DINO loss (also updates the center)."""
        if self.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.model(crops)
            return self.dino_loss(student_out, teacher_out, teacher_temp)

    def _clip_and_freeze(self, epoch: float) -> None:
        student = unwrap(self.model)
        if self.clip_grad > 0:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            clip_gradients(student, self.clip_grad, mode=self.clip_mode)
        cancel_last_layer_gradients(student, epoch, self.freeze_last_layer)

    def __call__(
        self,
        crops: Sequence[Tensor],
        *,
        epoch: float,
        teacher_temp: float,
        momentum: float,
        stop_requested: bool = False,
    ) -> Tensor:
        center_before = self.dino_loss.center.clone()
        loss = self.forward_loss(crops, teacher_temp)
        if self.sync_free:
            self._update_on_device(loss, center_before, epoch, momentum)
        else:
            self._update_with_sync(loss, center_before, epoch, momentum, stop_requested)
        return loss.detach()

    def _update_on_device(
        self, loss: Tensor, center_before: Tensor, epoch: float, momentum: float
    ) -> None:
        # In-place all-reduce of a 1-element tensor: queued on the device, never read back.
        bad = all_reduce_max((~torch.isfinite(loss.detach())).float().reshape(1))[0]
        ok = bad == 0
        center = self.dino_loss.center
        center.copy_(torch.where(ok, center, center_before))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            # x * NaN is NaN even where x == 0: every gradient of a skipped step is NaN on this
            # rank, hence (DDP averages) on every rank, and the scaler skips the fused update.
            poison = torch.where(ok, 1.0, float("nan"))
            self.scaler.scale(loss * poison).backward()
        else:
            loss.backward()
        self._clip_and_freeze(epoch)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            # The fused AdamW kernel returns early when found_inf is 1 and takes back its step
            # count increment: parameters, moments and step unchanged, no host sync.
            self.optimizer.found_inf = bad  # type: ignore[attr-defined]
            self.optimizer.step()
        # momentum 1.0 leaves the teacher exactly as it is (t * 1 + s * 0).
        ema_update(self.teacher, self.model, torch.where(ok, momentum, 1.0))
        skipped, run, longest = self._counts.unbind()
        not_ok = (~ok).long()
        skipped.add_(not_ok)
        run.add_(1).mul_(not_ok)
        torch.maximum(longest, run, out=longest)

    def _update_with_sync(
        self,
        loss: Tensor,
        center_before: Tensor,
        epoch: float,
        momentum: float,
        stop_requested: bool,
    ) -> None:
        # One host sync per step, and one tiny all-reduce: every rank must agree to skip a
        # non-finite step and to stop on a signal that reached only some ranks.
        flags = torch.stack(
            [
                (~torch.isfinite(loss.detach())).float(),
                torch.tensor(float(stop_requested), device=self.device),
            ]
        )
        bad, stop_now = all_reduce_max(flags).tolist()
        self._stop = stop_now > 0  # decided together: a later signal waits a step
        self.optimizer.zero_grad(set_to_none=True)
        if bad > 0:
            self.dino_loss.center.copy_(center_before)
            # Backward still runs (its gradients are dropped) so that every rank takes part in
            # DDP's gradient all-reduce on every step, static graph or not.
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
            self._host[0] += 1
            self._host[1] += 1
            self._host[2] = max(self._host[2], self._host[1])
            log.warning("non-finite loss: step skipped (%d in a row)", self._host[1])
            return
        self._host[1] = 0
        self.scaler.scale(loss).backward()
        self._clip_and_freeze(epoch)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.model, float(momentum))

    # ------------------------------------------------------------------------------------------

    def check(self, stop_requested: bool = False) -> StepCheck:
        """What the host needs to know, agreed across ranks; one host sync on the sync-free
        path (call it at logging cadence), free on the per-step path (call it every step).

        Every rank must call it at the same steps: it is a collective on the sync-free path.
        """
        if not self.sync_free:
            out = StepCheck(skipped=self._host[0], longest=self._host[2], stop=self._stop)
            self._host[2] = 0
            return out
        flag = torch.tensor([float(stop_requested)], device=self.device)
        all_reduce_max(flag)
        skipped, _, longest, stop = torch.cat([self._counts, flag.long()]).tolist()
        if longest:
            log.warning(
                "non-finite losses: %d steps skipped so far, up to %d in a row since the last "
                "check",
                skipped,
                longest,
            )
        # An open run goes on in the current-run counter, so the next check still sees it whole.
        self._counts[2].zero_()
        return StepCheck(skipped=int(skipped), longest=int(longest), stop=stop > 0)
