"""Image transforms: MoCo-v2 two-view training augmentation and the eval transform.

The training augmentation is the reference's (MoCo v2, applied independently per view):
RandomResizedCrop(size, scale 0.2-1, ratio 3/4-4/3), ColorJitter(0.4, 0.4, 0.4, 0.1) with
p 0.8, RandomGrayscale p 0.2, Gaussian blur sigma ~ U[0.1, 2] with p 0.5, horizontal flip
p 0.5, ImageNet normalisation. The result is the same distribution; the work is ordered for
speed, which decode + augment dominates on the CPU side of training:

- the crop boxes of all views are drawn on the header's image size before decoding, so a JPEG
  is decoded once for all views, at a reduced DCT scale (`Image.draft`) whenever every crop
  still has at least the output resolution there;
- each view is cropped and resized in one PIL call (sub-pixel box after a reduced decode);
- colour ops, normalisation and blur then run on the small `size x size` float tensor (no
  uint8 rounding between ops); the hue rotation is closed-form and the blur separable (the
  same results as torchvision's HSV round trip and 2-D convolution, several times faster).

Blur kernel: torchvision/SimCLR convention, 10% of the output size rounded up to odd
(23 at 224, 7 at 64). The reference blurs with PIL's radius=sigma filter, whose support is
unbounded; at 224 px and sigma <= 2 the 23-tap kernel covers +-5.5 sigma, a negligible difference.

With `device_augment` the transform stops after crop, resize and flip: it returns the uint8 views
and each view's colour parameters (`ViewParams.vector()`, drawn by the same `ViewParams` in the same
order, so the random stream is identical), and `declip.data.device_augment.apply` does the colour
ops, blur and normalisation batched on the training device. Flipping before instead of after the
colour ops and blur changes nothing (they are per pixel, or mirror-symmetric with reflect padding).

All randomness comes from the `torch.Generator` passed in, never from a global RNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from declip.data.check import MAX_PIXELS

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
SIGMA = (0.1, 2.0)

Source = str | Path | bytes


def open_image(src: Source) -> Image.Image:
    """Lazily open a path or encoded bytes (only the header is read); refuse bomb-sized images before decoding."""
    img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"{img.width}x{img.height} image exceeds {MAX_PIXELS} pixels (decompression bomb)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode (if not yet) and convert any PIL mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grey: PIL's convert would clip at 255; scale 16-bit range to 8 bits instead.
        a = np.asarray(img, dtype=np.float32)
        a = a / 257.0 if mode != "F" else a
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return img.convert("RGB")


def blur_kernel_size(size: int) -> int:
    k = int(0.1 * size)
    return k + 1 if k % 2 == 0 else k


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of a (C, H, W) float image with reflect padding, equal to torchvision's.

    Separable, each pass a sum of shifted slices: on one CPU thread about ten times faster than
    torchvision's depthwise 2-D convolution (23 x 23 taps at 224 px).
    """
    w = gaussian_kernel1d(kernel_size, sigma).tolist()
    r = kernel_size // 2
    h, wd = x.shape[-2:]
    p = torch.nn.functional.pad(x[None], (r, r, r, r), mode="reflect")[0]
    y = p[..., :wd] * w[0]
    for i in range(1, kernel_size):
        y.add_(p[..., i : i + wd], alpha=w[i])
    z = y[..., :h, :] * w[0]
    for i in range(1, kernel_size):
        z.add_(y[..., i : i + h, :], alpha=w[i])
    return z


_SCALE = torch.tensor([1 / s for s in STD]).view(3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)]).view(3, 1, 1)
_HUE_N = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def to_float(img: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float32 (3, H, W) in [0, 1]."""
    return F.pil_to_tensor(img).to(torch.float32).div_(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel of (..., 3, H, W), as one fused multiply-add (on x's device)."""
    return torch.addcmul(_SHIFT.to(x.device), x, _SCALE.to(x.device))


def adjust_hue(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of a (..., 3, H, W) float image in [0, 1] by `factor` turns.

    `factor` is a number or a tensor broadcastable to (..., 1, 1, 1) (one per image of a batch).
    The same result as torchvision's `adjust_hue` (HSV round trip) in a fraction of its ops:
    V = max and S * V = max - min are kept, only the hue moves (closed-form HSV -> RGB).
    """
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3, keepdim=True), x.amin(-3, keepdim=True)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    is_r, is_g = maxc == r.unsqueeze(-3), maxc == g.unsqueeze(-3)
    diff = torch.where(is_r, (g - b).unsqueeze(-3), torch.where(is_g, (b - r).unsqueeze(-3), (r - g).unsqueeze(-3)))
    sector = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    k = _HUE_N.to(x.device) + (diff / safe + sector + factor * 6)  # hue in sextants, shifted; reduced mod 6 below
    k = k - 6 * torch.floor(k / 6)  # (cheaper than torch.remainder)
    return maxc - delta * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


# ---------------------------------------------------------------- parameters


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, n: int) -> int:
    """Uniform in [0, n)."""
    return int(torch.randint(n, (), generator=g))


def sample_crop(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): torchvision's algorithm, our generator."""
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * _uniform(g, *CROP_SCALE)
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, height - h + 1), _randint(g, width - w + 1), h, w
    ratio = width / height  # fallback: the central crop with the ratio clamped
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ViewParams:
    """The random choices of one view, drawn before decoding."""

    __slots__ = ("box", "jitter", "gray", "sigma", "flip")

    def __init__(self, width: int, height: int, g: torch.Generator):
        self.box = sample_crop(width, height, g)
        self.jitter: tuple[list[int], float, float, float, float] | None = None
        if float(torch.rand((), generator=g)) < P_JITTER:
            b, c, s, h = JITTER
            order = torch.randperm(4, generator=g).tolist()
            self.jitter = (
                order,
                _uniform(g, 1 - b, 1 + b),
                _uniform(g, 1 - c, 1 + c),
                _uniform(g, 1 - s, 1 + s),
                _uniform(g, -h, h),
            )
        self.gray = float(torch.rand((), generator=g)) < P_GRAY
        self.sigma = _uniform(g, *SIGMA) if float(torch.rand((), generator=g)) < P_BLUR else None
        self.flip = float(torch.rand((), generator=g)) < P_FLIP

    def vector(self) -> list[float]:
        """The colour/blur choices as `COLOR_PARAMS` numbers (layout: `declip.data.device_augment`)."""
        order, b, c, s, h = self.jitter or ([0, 1, 2, 3], 1.0, 1.0, 1.0, 0.0)
        return [float(self.jitter is not None), *map(float, order), b, c, s, h, float(self.gray), self.sigma or 0.0]


COLOR_PARAMS = 11  # length of ViewParams.vector()


def draft_scale(boxes: list[tuple[int, int, int, int]], size: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) at which every crop keeps >= size pixels per side."""
    smallest = min(min(h, w) for _, _, h, w in boxes)
    for s in (8, 4, 2):
        if smallest >= s * size:
            return s
    return 1


def _color(img: torch.Tensor, p: ViewParams) -> torch.Tensor:
    if p.jitter is not None:
        order, b, c, s, h = p.jitter
        for op in order:
            if op == 0:
                img = F.adjust_brightness(img, b)
            elif op == 1:
                img = F.adjust_contrast(img, c)
            elif op == 2:
                img = F.adjust_saturation(img, s)
            else:
                img = adjust_hue(img, h)
    if p.gray:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    return img


class TwoViewTransform:
    """(path or bytes, generator) -> (views, 3, size, size) float32: the reference's MoCo-v2 views.

    With `device_augment`: -> ((views, 3, size, size) uint8 cropped, resized and flipped,
    (views, COLOR_PARAMS) float32 colour parameters) for `declip.data.device_augment.apply`.
    """

    def __init__(self, size: int, fast_decode: bool = True, views: int = 2, device_augment: bool = False):
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        self.size = size
        self.fast_decode = fast_decode
        self.views = views
        self.device_augment = device_augment
        self.kernel_size = blur_kernel_size(size)

    def __call__(self, src: Source, generator: torch.Generator) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with open_image(src) as img:
            width, height = img.size
            params = [ViewParams(width, height, generator) for _ in range(self.views)]
            scale = 1
            if self.fast_decode and img.format == "JPEG":
                scale = draft_scale([p.box for p in params], self.size)
                if scale > 1:
                    img.draft("RGB", (width // scale, height // scale))
            rgb = to_rgb(img)
            views = torch.stack([self._view(rgb, p, width, height) for p in params])
        if self.device_augment:
            return views, torch.tensor([p.vector() for p in params], dtype=torch.float32)
        return views

    def _view(self, img: Image.Image, p: ViewParams, width: int, height: int) -> torch.Tensor:
        top, left, h, w = p.box
        sx, sy = img.width / width, img.height / height  # 1 unless decoded at a reduced scale
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        view = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if self.device_augment:
            u8 = F.pil_to_tensor(view)
            return u8.flip(-1) if p.flip else u8
        x = normalize(_color(to_float(view), p))
        if p.sigma is not None:
            # Blurring after normalisation equals blurring before it: the kernel sums to 1 and the
            # normalisation is per-channel affine (up to the reference's uint8 rounding).
            x = gaussian_blur(x, self.kernel_size, p.sigma)
        return x.flip(-1) if p.flip else x


def eval_transform(size: int) -> Callable[[Image.Image | Source], torch.Tensor]:
    """Reference eval preprocessing: bilinear resize of the short side to 256/224 * size, center crop."""
    resize = int(round(size * 256 / 224))

    def transform(src: Image.Image | Source) -> torch.Tensor:
        if isinstance(src, Image.Image):
            img = to_rgb(src)
        else:
            with open_image(src) as f:
                img = to_rgb(f)
        img = F.resize(img, [resize], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        return normalize(to_float(F.center_crop(img, [size, size])))

    return transform
