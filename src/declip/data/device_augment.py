"""The colour half of the MoCo-v2 views, batched on the training device (`data.device_augment`).

The loader workers decode, crop, resize and flip (`TwoViewTransform(device_augment=True)`) and ship
uint8 views plus each view's colour parameters; `apply` then runs colour jitter (in each view's own
op order), grayscale, Gaussian blur with a per-view sigma and the ImageNet normalisation on the whole
batch at once. The results equal the per-sample CPU path (`TwoViewTransform` without the switch) up
to float rounding: both start from the same uint8 resize and use the same formulas.

Why: per-sample colour ops and blur are most of the host's augmentation time, and a fast device
needs hundreds of samples/s per host core. Batched on the device they cost a few ms per step, and
uint8 views are a quarter of float32's host-to-device traffic.

Parameter layout, one row of `COLOR_PARAMS` float32 per view (`ViewParams.vector()`):
`[jitter on, order of ops (4 ids: 0 brightness, 1 contrast, 2 saturation, 3 hue), brightness,
contrast, saturation, hue, grayscale on, blur sigma (0: no blur)]`.

Host syncs: none when `params` is a host (CPU) tensor, as the trainer passes it: which views take
which op is planned on the host and only index tensors travel. Device-resident params cost one copy
back to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as tnf
import torchvision.transforms.v2.functional as F

from declip.data.transforms import COLOR_PARAMS, adjust_hue, blur_kernel_size, normalize

JITTER_ON, ORDER, FACTORS, GRAY, SIGMA = 0, slice(1, 5), slice(5, 9), 9, 10
CPU_CHUNK = 4  # views per batched pass on a CPU (measured: 4 ~ 1.5x faster than whole batches)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` with one ratio per image: ratio * x + (1 - ratio) * other, clamped to [0, 1]."""
    return (x * ratio).add_(other * (1 - ratio)).clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return F.rgb_to_grayscale(x, num_output_channels=1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


OPS = (_brightness, _contrast, _saturation, adjust_hue)  # ids as in ColorJitter's order permutation


def gaussian_blur_batched(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each (3, H, W) image of `x` (N, 3, H, W) with its own sigma (N,): reflect padding, separable.

    One depthwise convolution per direction over all N * 3 channels (groups = N * 3), the same
    kernels as `transforms.gaussian_kernel1d`.
    """
    n, c, h, w = x.shape
    r = kernel_size // 2
    taps = torch.arange(kernel_size, dtype=torch.float32, device=x.device) - (kernel_size - 1) / 2
    k = torch.exp(-(taps**2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * 3, K)
    p = tnf.pad(x, (r, r, r, r), mode="reflect").reshape(1, n * c, h + 2 * r, w + 2 * r)
    y = tnf.conv2d(p, k[:, None, None, :], groups=n * c)
    return tnf.conv2d(y, k[:, None, :, None], groups=n * c).reshape(n, c, h, w)


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices (on `device`) of the True entries of a host mask; None when there are none."""
    idx = mask.nonzero().flatten()
    return idx.to(device, non_blocking=True) if len(idx) else None


def _augment(images: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 on the device + (N, COLOR_PARAMS) on the host -> (N, 3, H, W) float32, normalised."""
    device = images.device
    factors = host[:, FACTORS].to(device, non_blocking=True)
    x = images.to(torch.float32).div_(255)
    jitter, order = host[:, JITTER_ON] > 0, host[:, ORDER].long()
    for position in range(4):
        for op, fn in enumerate(OPS):
            if (idx := _rows(jitter & (order[:, position] == op), device)) is not None:
                f = factors[idx, op].view(-1, 1, 1, 1)
                x.index_copy_(0, idx, fn(x.index_select(0, idx), f))
    if (idx := _rows(host[:, GRAY] > 0, device)) is not None:
        x.index_copy_(0, idx, F.rgb_to_grayscale(x.index_select(0, idx), num_output_channels=3).contiguous())
    x = normalize(x)
    # Blurring after normalisation equals blurring before it (see transforms.TwoViewTransform._view).
    if (idx := _rows(host[:, SIGMA] > 0, device)) is not None:
        sigma = host[:, SIGMA].to(device, non_blocking=True)[idx]
        x.index_copy_(0, idx, gaussian_blur_batched(x.index_select(0, idx), sigma, blur_kernel_size(x.shape[-1])))
    return x


def apply(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """(B, V, 3, H, W) uint8 views + (B, V, COLOR_PARAMS) parameters -> (B, V, 3, H, W) float32, normalised.

    Runs on `images.device`; `params` is best left on the host (see the module doc). On a CPU the
    views go in chunks of CPU_CHUNK: whole-batch passes fall out of cache and run 1.5x slower.
    """
    if images.dtype != torch.uint8 or images.dim() != 5 or params.shape != (*images.shape[:2], COLOR_PARAMS):
        raise ValueError(
            f"device_augment.apply: expected uint8 (B, V, 3, H, W) images and (B, V, {COLOR_PARAMS}) params, "
            f"got {images.dtype} {tuple(images.shape)} and {tuple(params.shape)}"
        )
    rows = images.reshape(-1, *images.shape[2:])
    host = params.reshape(-1, COLOR_PARAMS).to("cpu", torch.float32)
    chunk = CPU_CHUNK if images.device.type == "cpu" else len(rows)
    parts = [_augment(rows[i : i + chunk], host[i : i + chunk]) for i in range(0, len(rows), chunk)]
    return torch.cat(parts).view(images.shape)
