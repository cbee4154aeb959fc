"""Optimisation pieces: parameter groups, AdamW, gradient clipping, last-layer freeze, EMA.

None of these call `.item()`: the training step stays free of host-device synchronisation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import torch
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups: "regularized" (weights) and "not_regularized" (biases, 1-D params).

    Only trainable parameters are included. The not-regularized group has weight_decay 0;
    the regularized group's weight decay is set by the training loop every iteration.
    """
    regularized: list[nn.Parameter] = []
    not_regularized: list[nn.Parameter] = []
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [
        {"name": "regularized", "params": regularized},
        {"name": "not_regularized", "params": not_regularized, "weight_decay": 0.0},
    ]


OptimizerImpl = Literal["auto", "fused", "foreach", "single"]


def build_optimizer(
    param_groups: list[dict[str, Any]],
    lr: float,
    *,
    fused: bool | None = None,
    impl: OptimizerImpl | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`.

    `impl`: "fused" (one kernel for all parameters; the only one that honours an on-device
    `found_inf`, see `dino_cluster.train.step`), "foreach" (multi-tensor), "single" (a Python
    loop over parameters, the 2021 reference) or "auto" (fused when every parameter is on
    CUDA, else foreach). The older `fused=True/False/None` spelling maps to fused/foreach/auto.
    """
    groups = param_groups
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters given to the optimizer")
    if impl is None:
        impl = "auto" if fused is None else ("fused" if fused else "foreach")
    elif fused is not None:
        raise ValueError("give either fused or impl, not both")
    if impl == "auto":
        impl = "fused" if all(p.is_cuda for p in params) else "foreach"
    if impl == "fused":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    if impl == "foreach":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    if impl == "single":
        return torch.optim.AdamW(groups, lr=lr, foreach=False, fused=False)
    raise ValueError(f"optimizer impl must be one of auto, fused, foreach, single; got {impl!r}")


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """True when every parameter group runs the fused kernel (which accepts `found_inf`)."""
    return bool(optimizer.param_groups) and all(
        bool(g.get("fused")) for g in optimizer.param_groups
    )


def clip_gradients(
    model: nn.Module, clip: float, mode: Literal["per_param", "global"] = "per_param"
) -> Tensor:
    """Clip gradients in place and return the norms measured before clipping.

    "per_param" (the reference): each parameter's own gradient norm is clipped to `clip`
    (scaled by clip / (norm + 1e-6) where that factor is < 1); returns a 1-D tensor of the
    norms, one per parameter with a gradient, in `named_parameters` order.
    "global": `torch.nn.utils.clip_grad_norm_` over all gradients; returns the total norm.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], clip
        )
    if mode != "per_param":
        raise ValueError(f"clip mode must be 'per_param' or 'global', got {mode!r}")
    if not grads:
        return torch.zeros(0)
    # Group by (device, dtype) because foreach kernels need homogeneous lists.
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        by_kind[(g.device, g.dtype)].append(i)
    norms: list[Tensor | None] = [None] * len(grads)
    for idx in by_kind.values():
        group = [grads[i] for i in idx]
        group_norms = torch._foreach_norm(group)
        stacked = torch.stack(group_norms).float()
        factors = (clip / (stacked + 1e-6)).clamp(max=1.0).to(group[0].dtype)
        torch._foreach_mul_(group, list(factors.unbind()))
        for i, n in zip(idx, group_norms, strict=True):
            norms[i] = n
    device = grads[0].device
    return torch.stack([n.float().to(device) for n in norms if n is not None])


def cancel_last_layer_gradients(model: nn.Module, epoch: float, freeze_last_layer: int) -> None:
    """Drop gradients of the head's last layer while epoch < freeze_last_layer (reference: 1)."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float | Tensor) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters only.

    Buffers (e.g. BatchNorm statistics) are not averaged, as in the reference. Either model
    may be wrapped by DDP or torch.compile. `momentum` may be a 0-d tensor on the teacher's
    device: the training step selects 1.0 there for a skipped step without a host sync (the
    teacher is then unchanged: t * 1 + s * 0 = t); a tensor is not range-checked, since that
    would read it back to the host.
    """
    if not isinstance(momentum, Tensor) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params = list(unwrap(teacher).parameters())
    s_params = [p.detach() for p in unwrap(student).parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(
            f"teacher has {len(t_params)} parameters, student {len(s_params)}: not the same model"
        )
    torch._foreach_mul_(t_params, momentum)
    if isinstance(momentum, Tensor):
        # No foreach add takes a tensor alpha: scale a temporary copy of the student instead.
        torch._foreach_add_(t_params, torch._foreach_mul(s_params, 1.0 - momentum))
    else:
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
