import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from imaging import encode, photo
from PIL import Image

from declip.data.transforms import (
    MEAN,
    STD,
    TwoViewTransform,
    ViewParams,
    adjust_hue,
    blur_kernel_size,
    draft_scale,
    eval_transform,
    gaussian_blur,
    normalize,
    sample_crop,
    to_float,
    to_rgb,
)

LO = [(0 - m) / s for m, s in zip(MEAN, STD, strict=True)]
HI = [(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]


@pytest.fixture(scope="module")
def jpeg():
    return encode(photo(320, 240), quality=90)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_shapes_range_views_differ(jpeg, tmp_path):
    t = TwoViewTransform(64)
    x = t(jpeg, gen(0))
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    for c in range(3):  # normalised: inside [(0 - mean) / std, (1 - mean) / std] per channel
        assert LO[c] - 1e-5 <= x[:, c].min() and x[:, c].max() <= HI[c] + 1e-5
    assert (x[0] - x[1]).abs().mean() > 0.05
    (tmp_path / "a.jpg").write_bytes(jpeg)
    assert torch.equal(t(tmp_path / "a.jpg", gen(0)), x)  # path and bytes alike
    one = TwoViewTransform(64, views=1)(jpeg, gen(0))
    assert one.shape == (1, 3, 64, 64) and torch.equal(one[0], x[0])  # view 1 draws first


def test_determinism(jpeg):
    t = TwoViewTransform(48)
    assert torch.equal(t(jpeg, gen(5)), t(jpeg, gen(5)))
    assert not torch.equal(t(jpeg, gen(5)), t(jpeg, gen(6)))
    state = torch.random.get_rng_state()
    t(jpeg, gen(7))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched


def test_normalize_formula():
    img = Image.new("RGB", (4, 4), (255, 128, 0))
    x = normalize(to_float(img))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((255, 128, 0), MEAN, STD, strict=True)])
    assert torch.allclose(x[:, 2, 3], expected, atol=1e-6)


def test_param_frequencies():
    g = gen(0)
    params = [ViewParams(500, 375, g) for _ in range(4000)]

    def freq(f):
        return np.mean([f(p) for p in params])

    # MoCo v2 probabilities, 4000 draws: standard error <= 0.008
    assert abs(freq(lambda p: p.jitter is not None) - 0.8) < 0.03
    assert abs(freq(lambda p: p.gray) - 0.2) < 0.03
    assert abs(freq(lambda p: p.sigma is not None) - 0.5) < 0.03
    assert abs(freq(lambda p: p.flip) - 0.5) < 0.03
    sigmas = [p.sigma for p in params if p.sigma is not None]
    assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0 and abs(np.mean(sigmas) - 1.05) < 0.05
    jit = np.array([p.jitter[1:] for p in params if p.jitter])
    assert jit[:, :3].min() >= 0.6 and jit[:, :3].max() <= 1.4 and np.abs(jit[:, 3]).max() <= 0.1
    orders = {tuple(p.jitter[0]) for p in params if p.jitter}
    assert len(orders) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)  # every op order occurs


def test_crop_box_distribution():
    g = gen(1)
    boxes = [sample_crop(500, 375, g) for _ in range(2000)]
    area = np.array([h * w for _, _, h, w in boxes]) / (500 * 375)
    ratio = np.array([w / h for _, _, h, w in boxes])
    assert all(t >= 0 and left >= 0 and t + h <= 375 and left + w <= 500 for t, left, h, w in boxes)
    assert area.min() > 0.19 and area.max() <= 1.0
    assert ratio.min() > 0.74 and ratio.max() < 1.34
    # the fallback for an extreme aspect ratio: the central crop with the ratio clamped to 4/3
    assert sample_crop(1000, 10, g) == (0, (1000 - 13) // 2, 10, 13)


def test_separable_blur_equals_torchvision():
    x = torch.rand(3, 40, 50, generator=gen(0))
    for sigma in (0.1, 0.7, 2.0):
        ours = gaussian_blur(x, 7, sigma)
        ref = F.gaussian_blur(x, [7, 7], [sigma, sigma])
        assert torch.allclose(ours, ref, atol=1e-5)
    assert [blur_kernel_size(s) for s in (224, 64, 32, 96)] == [23, 7, 3, 9]


def test_hue_equals_torchvision():
    x = torch.rand(3, 30, 40, generator=gen(0))
    x[:, :5] = 0.5  # grey pixels: no hue
    x[0, 5:8] = x[1, 5:8]  # ties between the max channels
    for factor in (-0.5, -0.1, 0.0, 0.03, 0.1, 0.5):
        assert torch.allclose(adjust_hue(x, factor), F.adjust_hue(x, factor), atol=1e-5)


def test_fast_decode_close_to_full_decode():
    data = encode(photo(1024, 768, seed=3), quality=90)
    size = 64
    fast, full = TwoViewTransform(size, fast_decode=True), TwoViewTransform(size, fast_decode=False)
    scales, diffs = [], []
    for seed in range(8):
        g = gen(seed)
        params = [ViewParams(1024, 768, g) for _ in range(2)]
        scales.append(draft_scale([p.box for p in params], size))
        a, b = fast(data, gen(seed)), full(data, gen(seed))
        diffs.append((a - b).abs().mean().item())
    assert max(scales) >= 4  # the reduced decode really ran
    # 0.03 in normalised units is under 2 grey levels of 255
    assert max(diffs) < 0.03, diffs


def test_draft_scale_rule():
    assert draft_scale([(0, 0, 300, 260)], 64) == 4  # 260 >= 4 * 64
    assert draft_scale([(0, 0, 300, 260), (0, 0, 130, 400)], 64) == 2  # the smaller crop decides
    assert draft_scale([(0, 0, 100, 100)], 64) == 1
    assert draft_scale([(0, 0, 2000, 2000)], 224) == 8


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "RGBA", "I;16", "I", "1"])
def test_non_rgb_inputs(mode):
    base = photo(120, 90)
    if mode == "P":
        img = base.convert("P")
        img.info["transparency"] = 0
        data = encode(img, "PNG", transparency=0)
    elif mode == "CMYK":
        data = encode(base.convert("CMYK"), "JPEG")
    elif mode in ("I;16", "I"):
        a = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(a) if mode == "I;16" else Image.fromarray(a.astype(np.int32))
        assert img.mode == mode
        data = encode(img, "PNG" if mode == "I;16" else "TIFF")
    else:
        data = encode(base.convert(mode), "PNG")
    x = TwoViewTransform(32)(data, gen(0))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    out = eval_transform(32)(data)
    if mode in ("P", "CMYK", "RGBA"):  # colour kept (CMYK through a lossy JPEG, P through a palette)
        assert (out - eval_transform(32)(base)).abs().mean() < 0.1
    elif mode in ("L", "LA", "I;16", "I"):
        assert (out - eval_transform(32)(base.convert("L"))).abs().mean() < 0.02


def test_sixteen_bit_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (1, 3, 3) and rgb[0, :, 0].tolist() == [0, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_eval_transform_matches_reference_pipeline(jpeg, tmp_path):
    size = 64
    ref = T.Compose(
        [
            T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    ours = eval_transform(size)
    (tmp_path / "a.jpg").write_bytes(jpeg)
    out = ours(tmp_path / "a.jpg")
    assert out.shape == (3, size, size)
    assert torch.allclose(out, ref(img), atol=1e-5)
    assert torch.equal(out, ours(img)) and torch.equal(out, ours(jpeg))
