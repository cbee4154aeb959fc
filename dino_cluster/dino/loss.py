"""The DINO loss: cross-entropy between a centred, sharpened teacher and the student.

For a batch of B images with 2 global and n_crops - 2 local crops:

    P_s[v] = softmax(student_out[v] / student_temp)                  v = 0 .. n_crops-1
    P_t[i] = softmax((teacher_out[i] - center) / teacher_temp)       i = 0, 1 (global only)
    loss   = mean over pairs (i, v), v != i, of  mean_b  -sum_d P_t[i,b,d] log P_s[v,b,d]

i.e. 2 * n_crops - 2 terms (18 for 2 + 8 crops). Instead of a Python loop over pairs we
contract each teacher view with the sum of all student views' log-probs and subtract the
same-view (diagonal) term. Everything is computed in float32 even under autocast.

The center is an EMA (momentum 0.9) of the teacher output mean, all-reduced across ranks so
that every rank holds the same center.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class DINOLoss(nn.Module):
    center: Tensor

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if n_crops < 2:
            raise ValueError(f"n_crops must be >= 2 (2 global crops at least), got {n_crops}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.n_crops = n_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Diagnostics of the last forward, as detached 0-d device tensors (no host sync):
        # mean teacher entropy and mean KL(P_t || P_s) over the same pairs as the loss.
        self.last_teacher_entropy: Tensor | None = None
        self.last_kl: Tensor | None = None

    # ------------------------------------------------------------------------------------------

    def _check(self, student_out: Tensor, teacher_out: Tensor) -> int:
        if teacher_out.ndim != 2 or teacher_out.shape[0] % 2 != 0:
            raise ValueError(f"teacher_out must be (2*B, D), got {tuple(teacher_out.shape)}")
        batch = teacher_out.shape[0] // 2
        expected = (self.n_crops * batch, self.out_dim)
        if tuple(student_out.shape) != expected or teacher_out.shape[1] != self.out_dim:
            raise ValueError(
                f"student_out must be {expected} for teacher_out {tuple(teacher_out.shape)},"
                f" got {tuple(student_out.shape)}"
            )
        return batch

    def _teacher_log_probs(self, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        return F.log_softmax((teacher_out.detach().float() - self.center) / teacher_temp, dim=-1)

    def _pair_mean_cross_entropy(self, log_ps: Tensor, pt: Tensor, batch: int) -> Tensor:
        # sum over pairs v != i of -<P_t[i], log P_s[v]> equals -<P_t[i], S - log P_s[i]> with
        # S the sum of all student views' log-probs: one reduction, no loop, no matmul (so no
        # TF32 rounding on GPUs that enable it), exact float32.
        log_ps = log_ps.view(self.n_crops, batch, self.out_dim)
        pt = pt.view(2, batch, self.out_dim)
        others = log_ps.sum(dim=0, keepdim=True) - log_ps[:2]  # (2, B, D)
        n_terms = 2 * self.n_crops - 2
        return -(pt * others).sum() / (batch * n_terms)

    def forward(self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        batch = self._check(student_out, teacher_out)
        with torch.autocast(student_out.device.type, enabled=False):
            log_ps = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
            log_pt = self._teacher_log_probs(teacher_out, teacher_temp)
            pt = log_pt.exp()
            loss = self._pair_mean_cross_entropy(log_ps, pt, batch)
            with torch.no_grad():
                # Mean teacher entropy; every teacher view enters n_crops - 1 pairs, so the
                # pair-averaged KL is simply loss - entropy.
                entropy = -(pt * log_pt).sum(dim=-1).mean()
                self.last_teacher_entropy = entropy
                self.last_kl = loss.detach() - entropy
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of teacher_out over all rows of all ranks."""
        batch_sum = teacher_out.detach().float().sum(dim=0, keepdim=True)
        count = teacher_out.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        batch_center = batch_sum / count
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        # A non-finite teacher batch (the loop skips such steps) must not poison the center
        # for the rest of the run; decided on device, identically on every rank, no host sync.
        self.center.copy_(torch.where(torch.isfinite(batch_center).all(), updated, self.center))

    # ------------------------------------------------------------------------------------------
    # Collapse diagnostics (no host sync; call .item() only at logging cadence).

    @torch.no_grad()
    def teacher_entropy(self, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        """Mean entropy of the centred, sharpened teacher distribution (current center).

        Near 0: one-dimension collapse (sharpening wins); near log(out_dim): uniform collapse
        (centering wins).
        """
        log_pt = self._teacher_log_probs(teacher_out, teacher_temp)
        return -(log_pt.exp() * log_pt).sum(dim=-1).mean()

    @torch.no_grad()
    def kl_teacher_student(
        self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float
    ) -> Tensor:
        """Mean KL(P_t || P_s) over the loss's (teacher view, other student view) pairs."""
        batch = self._check(student_out, teacher_out)
        log_ps = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        log_pt = self._teacher_log_probs(teacher_out, teacher_temp)
        pt = log_pt.exp()
        entropy = -(pt * log_pt).sum(dim=-1).mean()
        return self._pair_mean_cross_entropy(log_ps, pt, batch) - entropy
