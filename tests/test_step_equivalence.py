"""The optimised step's pieces equal the plain computations on the same inputs (fp32).

- data.device_augment: host crop/resize/flip + batched colour ops on the "device" (here the CPU) equal the
  all-on-host TwoViewTransform for the same sample seeds, through the trainer's own batch-to-device path;
- the MLM head at the chosen positions gives the loss and gradients of the full head followed by indexing.

torch.compile vs eager is not tested here: compiling the tiny model's forward and backward takes ~60 s on this
2-core CPU (measured, benchmarks/run_all.py), far over the suite's budget.
"""

import io

import pytest
import torch
import torch.nn.functional as F
from imaging import encode, photo
from PIL import Image

from declip.config import load_config
from declip.data import device_augment
from declip.data.datasets import collate
from declip.data.transforms import COLOR_PARAMS, TwoViewTransform, ViewParams
from declip.model import build_model
from declip.text.tokenizer import mask_tokens
from declip.train.loop import _batch_to_device

SEEDS = range(24)


@pytest.fixture(scope="module")
def jpegs():
    return [encode(photo(200, 150, 0, noise=8), quality=90), encode(photo(160, 210, 1, noise=8), quality=90)]


def test_device_augment_equals_host_path(jpegs):
    size = 48
    host_only, split = TwoViewTransform(size), TwoViewTransform(size, device_augment=True)
    reference, items = [], []
    for s in SEEDS:
        src = jpegs[s % 2]
        reference.append(host_only(src, torch.Generator().manual_seed(s)))
        views, params = split(src, torch.Generator().manual_seed(s))
        assert views.dtype == torch.uint8 and views.shape == (2, 3, size, size) and params.shape == (2, COLOR_PARAMS)
        items.append({"images": views, "aug_params": params, "replaced": torch.tensor(0)})
    batch = collate(items)
    assert batch["aug_params"].shape == (len(SEEDS), 2, COLOR_PARAMS)
    # The parameters are the same draws as the host path's: every branch (each op at each position of the
    # jitter order, grayscale, blur, none) occurs in this batch, so the comparison covers all of them.
    p = batch["aug_params"].reshape(-1, COLOR_PARAMS)
    on = p[:, 0] > 0
    assert all(((p[on, 1 + pos] == op).any()) for pos in range(4) for op in range(4))
    assert (p[:, 9] > 0).any() and (p[:, 10] > 0).any() and (~on).any() and (p[:, 10] == 0).any()
    g = torch.Generator().manual_seed(SEEDS[3])
    width, height = Image.open(io.BytesIO(jpegs[1])).size
    assert torch.equal(torch.tensor([ViewParams(width, height, g).vector() for _ in range(2)]), p[6:8])

    out = _batch_to_device(dict(batch), torch.device("cpu"))["images"]
    expected = torch.stack(reference)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    # Both paths start from the same uint8 resize; what differs is float summation order (batched blur by
    # convolution, per-image contrast mean): ~1e-6 of the normalised range of ~4.5.
    assert (out - expected).abs().max() < 2e-5


def test_device_augment_identity_params_only_normalise():
    images = torch.randint(0, 256, (2, 1, 3, 8, 8), dtype=torch.uint8)
    params = torch.tensor([0, 0, 1, 2, 3, 1, 1, 1, 0, 0, 0], dtype=torch.float32).expand(2, 1, COLOR_PARAMS)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (images.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert torch.allclose(device_augment.apply(images, params), expected, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        device_augment.apply(images.float(), params)


def test_batched_blur_equals_per_image():
    from declip.data.transforms import gaussian_blur

    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.9, 2.0])
    out = device_augment.gaussian_blur_batched(x, sigma, 7)
    for i in range(3):
        assert torch.allclose(out[i], gaussian_blur(x[i], 7, float(sigma[i])), atol=1e-6)


def test_mlm_head_at_chosen_positions_equals_full_head():
    cfg = load_config("config/declip_tiny.yaml")
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(4, 32, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:20], tokens[:, 20] = 49407, torch.randint(1, 49405, (4, 19), generator=g), 49408
    masked, labels = mask_tokens(tokens, g, probability=0.3)
    mask = labels != -100
    images = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = F.cross_entropy(model(images, [masked, tokens], mask)["mlm_logits"], labels[mask])
    g_fast = grads(fast)
    states = model.text_states(torch.cat([masked, tokens]))[:4]
    full = F.cross_entropy(model.text_mlm_head(states)[mask], labels[mask])
    g_full = grads(full)
    assert torch.allclose(fast, full, atol=1e-5)
    assert g_fast.keys() == g_full.keys()
    for name in g_full:
        assert torch.allclose(g_fast[name], g_full[name], atol=1e-5), name
