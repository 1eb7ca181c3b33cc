"""Model: parameter count, init, names, SDPA attention, causal text tower, forward contract."""

import math

import pytest
import torch
from open_clip.model import CLIP
from torch import nn

from declip.config import load_config
from declip.model import Attention, build_model, unwrap_model
from declip.text.tokenizer import EOT_ID, mask_tokens, tokenize

torch.set_num_threads(1)

TINY = "config/declip_tiny.yaml"
CLIP_MODE = [
    "loss.image_views=1",
    "loss.text_views=1",
    "loss.nns_weight=0",
    "loss.simsiam_weight=0",
    "loss.mlm_weight=0",
    "loss.mvs_weight=1",
]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(TINY)
    return cfg, build_model(cfg).eval()


def ln(w: int) -> int:
    return 2 * w


def block(w: int) -> int:
    attn = 3 * w * w + 3 * w + w * w + w
    mlp = w * 4 * w + 4 * w + 4 * w * w + w
    return attn + mlp + 2 * ln(w)


def test_vitb32_declip_parameter_count():
    """Each tensor of reference §2 written out: ViT-B/32 image tower, 12-layer text tower, SimSiam, MLM head."""
    vision = 3 * 768 * 32 * 32 + 768 + 50 * 768 + ln(768) + 12 * block(768) + ln(768) + 768 * 512
    text = 49409 * 512 + 77 * 512 + 12 * block(512) + ln(512) + (512 * 512 + 512)
    logit_scale = 1
    bn = 2  # affine weight and bias
    projector = (512 * 1024 + 1024 + bn * 1024) + 2 * (1024 * 1024 + 1024 + bn * 1024)
    predictor = (1024 * 512 + 512 + bn * 512) + (512 * 1024 + 1024)
    mlm = 512 * 49409 + 49409
    expected = vision + text + logit_scale + projector + predictor + mlm

    with torch.device("meta"):
        model = build_model({})
    count = sum(p.numel() for p in model.parameters())
    print(
        f"ViT-B/32 DeCLIP parameters: {count:,} (towers {vision + text:,}, logit scale 1, heads {projector + predictor + mlm:,})"
    )
    assert count == expected == 180_306_946
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count - trainable == 3 * 768 * 32 * 32  # only the frozen patch embedding


def test_init_statistics_follow_the_reference():
    cfg = load_config(
        None,
        [
            "model.vision_width=384",
            "model.vision_layers=3",
            "model.vision_heads=6",
            "model.text_width=256",
            "model.text_layers=2",
            "model.text_heads=4",
            "loss.mlm_weight=0",
        ],
    )
    sd = build_model(cfg).state_dict()

    def std(key: str, expected: float, tol: float = 0.03) -> None:
        actual = sd[key].float().std().item()
        assert abs(actual / expected - 1) < tol, f"{key}: std {actual:.5f}, expected {expected:.5f}"

    for prefix, w, layers in (("visual.transformer", 384, 3), ("transformer", 256, 2)):
        b = f"{prefix}.resblocks.1"
        std(f"{b}.attn.in_proj_weight", w**-0.5)
        std(f"{b}.attn.out_proj.weight", w**-0.5 * (2 * layers) ** -0.5)
        std(f"{b}.mlp.c_fc.weight", (2 * w) ** -0.5)
        std(f"{b}.mlp.c_proj.weight", w**-0.5 * (2 * layers) ** -0.5)
        assert (sd[f"{b}.attn.in_proj_bias"] == 0).all() and (sd[f"{b}.attn.out_proj.bias"] == 0).all()
        assert (sd[f"{b}.ln_1.weight"] == 1).all() and (sd[f"{b}.ln_1.bias"] == 0).all()
    std("visual.positional_embedding", 0.01)
    std("visual.class_embedding", 384**-0.5, tol=0.12)  # 384 samples
    std("visual.proj", 384**-0.5)
    std("token_embedding.weight", 0.02)
    std("positional_embedding", 0.01)
    std("text_projection.weight", 256**-0.5)
    # conv1 keeps nn.Conv2d's default: U(-b, b) with b = 1/sqrt(fan_in), std b/sqrt(3)
    std("visual.conv1.weight", (3 * 32 * 32) ** -0.5 / math.sqrt(3))
    assert sd["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))


def test_init_is_a_function_of_the_seed():
    a = build_model(load_config(TINY)).state_dict()
    torch.rand(10)  # the caller's RNG state must not matter
    b = build_model(load_config(TINY)).state_dict()
    c = build_model(load_config(TINY, ["train.seed=1"])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_names_and_shapes_match_openai_clip_layout():
    """open_clip's CLIP follows OpenAI's names; ours match except the Linear text projection (with bias)."""
    cfg = load_config(TINY, CLIP_MODE)
    m = cfg.model
    ours = build_model(cfg).state_dict()
    theirs = CLIP(
        m.embed_dim,
        dict(
            image_size=m.image_size,
            patch_size=m.patch_size,
            width=m.vision_width,
            layers=m.vision_layers,
            head_width=m.vision_width // m.vision_heads,
        ),
        dict(
            context_length=m.context_length,
            vocab_size=m.vocab_size,
            width=m.text_width,
            heads=m.text_heads,
            layers=m.text_layers,
        ),
        quick_gelu=True,
    ).state_dict()
    assert set(ours) - set(theirs) == {"text_projection.weight", "text_projection.bias"}
    assert set(theirs) - set(ours) == {"text_projection"}
    for k in set(ours) & set(theirs):
        assert ours[k].shape == theirs[k].shape, k
    assert ours["text_projection.weight"].shape == theirs["text_projection"].T.shape


@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_scaled_dot_product(causal):
    torch.manual_seed(0)
    width, heads, B, L = 32, 4, 3, 7
    attn = Attention(width, heads, causal)
    nn.init.normal_(attn.in_proj_weight, std=width**-0.5)
    nn.init.normal_(attn.in_proj_bias, std=0.1)
    x = torch.randn(B, L, width)

    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(B, L, heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    manual = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, width)
    manual = attn.out_proj(manual)
    assert torch.allclose(attn(x), manual, atol=1e-5)

    # the same state dict drives nn.MultiheadAttention: OpenAI/DeCLIP checkpoints load by name
    mha = nn.MultiheadAttention(width, heads, batch_first=True)
    mha.load_state_dict(attn.state_dict())
    mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_text_tower_is_causal(tiny):
    _, model = tiny
    tokens = tokenize(["a dog running on the beach at sunset"], context_length=32)
    k = 4
    changed = tokens.clone()
    changed[0, k + 1 : 9] = torch.arange(100, 104)
    with torch.no_grad():
        a, b = model.text_states(tokens), model.text_states(changed)
    assert torch.allclose(a[:, : k + 1], b[:, : k + 1], atol=1e-6)
    assert not torch.allclose(a[:, k + 1 :], b[:, k + 1 :], atol=1e-3)


def test_text_pools_at_eot(tiny):
    _, model = tiny
    tokens = tokenize(["a cat", "a photo of a small brown dog", ""], context_length=32)
    eot = [(row == EOT_ID).nonzero().item() for row in tokens]
    assert eot == tokens.argmax(-1).tolist() and len(set(eot)) == 3
    with torch.no_grad():
        states = model.text_states(tokens)
        expected = model.text_projection(states[torch.arange(3), eot])
        assert torch.allclose(model.encode_text(tokens), expected, atol=1e-6)
        # what follows EOT (padding) cannot change the feature
        noisy = tokens.clone()
        for i, e in enumerate(eot):
            noisy[i, e + 1 :] = 7
        assert torch.allclose(model.encode_text(noisy), expected, atol=1e-5)


def test_forward_contract_declip(tiny):
    cfg, model = tiny
    m = cfg.model
    B = 5
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(B, 3, m.image_size, m.image_size, generator=g) for _ in range(2)]
    plain = tokenize(["a red car", "two dogs", "a bowl of soup on a table", "city at night", "x"], m.context_length)
    masked, labels = mask_tokens(plain, g, probability=0.5)
    mlm_mask = labels != -100
    assert mlm_mask.sum() > 0
    eda = tokenize(["red car", "two dog", "bowl soup table", "a city at night", "x y"], m.context_length)
    with torch.no_grad():
        out = model(images, [masked, eda], mlm_mask)

    assert set(out) == {"image_features", "text_features", "simsiam", "mlm_logits", "logit_scale"}
    assert [f.shape for f in out["image_features"]] == [(B, m.embed_dim)] * 2
    assert [f.shape for f in out["text_features"]] == [(B, m.embed_dim)] * 2
    assert [(p.shape, z.shape) for p, z in out["simsiam"]] == [((B, m.simsiam_dim), (B, m.simsiam_dim))] * 2
    assert out["mlm_logits"].shape == (mlm_mask.sum().item(), m.vocab_size)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)

    with torch.no_grad():
        # one batched tower call per modality gives each view's own features
        for view, feats in zip(images, out["image_features"], strict=True):
            assert torch.allclose(model.encode_image(view), feats, atol=1e-5)
        for view, feats in zip([masked, eda], out["text_features"], strict=True):
            assert torch.allclose(model.encode_text(view), feats, atol=1e-5)
        # the head at the chosen positions of the masked caption only
        full = model.text_mlm_head(model.text_states(masked))
        assert torch.allclose(out["mlm_logits"], full[mlm_mask], atol=1e-5)
        # SimSiam: per-view projector, predictor on top
        z0 = model.projector(out["image_features"][0])
        assert torch.allclose(out["simsiam"][0][1], z0, atol=1e-5)
        assert torch.allclose(out["simsiam"][0][0], model.predictor(z0), atol=1e-5)
        # no mask: no MLM logits
        assert "mlm_logits" not in model(images, [masked, eda], None)


def test_logit_scale_is_clamped():
    model = build_model(load_config(TINY, CLIP_MODE))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        out = model([torch.zeros(1, 3, 64, 64)], [tokenize(["a"], 32)])
    assert out["logit_scale"].item() == pytest.approx(100.0)
    assert isinstance(model.logit_scale, nn.Parameter)


def test_clip_mode_has_no_heads():
    cfg = load_config(TINY, CLIP_MODE)
    model = build_model(cfg)
    assert model.projector is None and model.predictor is None and model.text_mlm_head is None
    assert not any(k.startswith(("projector", "predictor", "text_mlm_head")) for k in model.state_dict())
    tokens = tokenize(["a cat", "a dog"], cfg.model.context_length)
    with torch.no_grad():
        out = model([torch.randn(2, 3, 64, 64)], [tokens], torch.ones_like(tokens, dtype=torch.bool))
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert len(out["image_features"]) == len(out["text_features"]) == 1


@pytest.mark.parametrize("freeze", [True, False])
def test_patch_embedding_freeze(freeze):
    model = build_model(load_config(TINY, [f"model.freeze_patch_embed={str(freeze).lower()}"])).train()
    tokens = tokenize(["a cat", "a dog", "a bird"], 32)
    masked, labels = mask_tokens(tokens, torch.Generator().manual_seed(0), probability=0.5)
    out = model([torch.randn(3, 3, 64, 64)] * 2, [masked, tokens], labels != -100)
    loss = sum(f.sum() for f in out["image_features"] + out["text_features"])
    loss = loss + sum((p * z).sum() for p, z in out["simsiam"]) + out["mlm_logits"].logsumexp(-1).sum()
    loss.backward()
    conv = model.visual.conv1.weight
    assert conv.requires_grad is not freeze
    assert (conv.grad is None) is freeze
    assert model.visual.class_embedding.grad is not None and model.text_mlm_head.weight.grad is not None
    assert model.projector[0].weight.grad is not None and model.token_embedding.weight.grad is not None


def test_unwrap_model(tiny):
    _, model = tiny
    wrapped = torch.compile(nn.DataParallel(model))
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model
