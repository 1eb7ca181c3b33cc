"""AdamW parameter groups, the learning-rate schedule and the logit-scale clamp (reference §1).

Pure functions: nothing here knows about ranks or checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from declip.config import RunConfig

# Modules whose `bias` is exempt from weight decay (the reference's no-decay list); norms lose decay on
# their weight too. The attention's `in_proj_bias` is a raw Parameter of the attention module, not a
# module bias, so it keeps weight decay, as in the reference.
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
_BIAS_MODULES = (nn.Linear, nn.modules.conv._ConvNd, *_NORMS)


def no_decay(module: nn.Module, name: str) -> bool:
    """Whether parameter `name` directly owned by `module` is exempt from weight decay."""
    return isinstance(module, _NORMS) or (name == "bias" and isinstance(module, _BIAS_MODULES)) or name == "logit_scale"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, `decay` and `no_decay`, each with the parameter names (for tests and logs).

    Frozen parameters (the patch embedding) are left out: the optimizer never sees them.
    """
    groups = {"decay": ([], []), "no_decay": ([], [])}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            params, names = groups["no_decay" if no_decay(module, name) else "decay"]
            params.append(p)
            names.append(f"{module_name}.{name}" if module_name else name)
    return [
        {"params": params, "names": names, "weight_decay": weight_decay if key == "decay" else 0.0, "group": key}
        for key, (params, names) in groups.items()
        if params
    ]


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of optimizer step `step` (the first step is 1).

    Warmup, t < W (W = optim.warmup_steps): lr(t) = warmup_lr + (lr - warmup_lr) * (t - 1) / (W - 1),
    so lr(1) = warmup_lr and the line would reach lr at t = W.
    Cosine, W <= t <= E (E = train.cosine_end_step): lr(t) = lr * (1 + cos(pi * (t - W) / (E - W))) / 2,
    so lr(W) = lr (the peak) and lr(E) = 0; after E the rate stays 0.
    This is the reference scheduler (warmup then cosine to a minimum of 0 over the remaining steps)
    written in terms of the 1-based step. W <= 1 means no warmup.
    """
    o, end = cfg.optim, cfg.train.cosine_end_step
    warm = o.warmup_steps
    if step < warm:
        return o.warmup_lr + (o.lr - o.warmup_lr) * (step - 1) / (warm - 1)
    if step >= end:
        return 0.0
    start = max(warm, 1)
    return o.lr * 0.5 * (1.0 + math.cos(math.pi * (step - start) / (end - start)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, bounds: list[float]) -> None:
    """Clamp the raw (log) logit scale to [min, max]; called before and after every optimizer step."""
    model.logit_scale.clamp_(bounds[0], bounds[1])


def _npu_fused_adamw():
    try:
        from torch_npu.optim import NpuFusedAdamW
    except Exception:
        try:
            from apex.optimizers import NpuFusedAdamW
        except Exception:
            return None
    return NpuFusedAdamW


def build_optimizer(model: nn.Module, cfg: RunConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: fused kernel on CUDA (torch) or NPU (torch_npu/apex) when
    `optim.fused`, else the foreach implementation (multi-tensor, also deterministic on CPU)."""
    o = cfg.optim
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, o.weight_decay)]
    kwargs = {"lr": lr_at(1, cfg), "betas": tuple(o.betas), "eps": o.eps}
    if o.fused and device_type == "cuda":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if o.fused and device_type == "npu" and (fused := _npu_fused_adamw()) is not None:
        return fused(groups, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the global grad norm to `max_norm` (0 disables, as the reference); returns the pre-clip norm."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
