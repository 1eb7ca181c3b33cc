"""Reference (Sense-GVT/DeCLIP) checkpoint -> ours: names, shapes, inferred config, identical outputs.

The reference side is a re-creation of the reference architecture in the test, with its module
names and layout (sequence-first `nn.MultiheadAttention`, additive causal mask, SimSiam MLPs with
named layers, a `DistModule`-style `module.` wrapper), so the synthetic checkpoint has exactly the
reference's keys and shapes and its outputs are computed the reference's way.
"""

from collections import OrderedDict

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from declip.config import config_from_dict, load_config
from declip.convert import convert_checkpoint_file, convert_state_dict, to_reference_state_dict
from declip.errors import InputError
from declip.model import build_model
from declip.text.tokenizer import EOT_ID, SOT_ID, VOCAB_SIZE

torch.set_num_threads(1)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width: int, heads: int, mask: torch.Tensor | None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]
            )
        )
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = mask  # a plain attribute in the reference: not in the state dict

    def forward(self, x):  # (L, N, D)
        x = x + self.attn(*(self.ln_1(x),) * 3, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mask: torch.Tensor | None = None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVisual(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, embed_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefText(nn.Module):
    def __init__(self, context, width, layers, heads, embed_dim):
        super().__init__()
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.transformer = RefTransformer(width, layers, heads, mask)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim)

    def states(self, tokens):
        x = (self.token_embedding(tokens) + self.positional_embedding).permute(1, 0, 2)
        return self.ln_final(self.transformer(x).permute(1, 0, 2))

    def forward(self, tokens):
        return self.text_projection(self.states(tokens)[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)])


class RefProjector(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.linear1, self.bn1, self.relu1 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()
        self.linear2, self.bn2, self.relu2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU()
        self.linear3, self.bn3 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)

    def forward(self, x):
        x = self.relu1(self.bn1(self.linear1(x)))
        return self.bn3(self.linear3(self.relu2(self.bn2(self.linear2(x)))))


class RefPredictor(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.linear1, self.bn1, self.relu1 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()
        self.layer2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.layer2(self.relu1(self.bn1(self.linear1(x))))


class RefDeCLIP(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.visual = RefVisual(
            m.image_size, m.patch_size, m.vision_width, m.vision_layers, m.vision_heads, m.embed_dim
        )
        self.encode_text = RefText(m.context_length, m.text_width, m.text_layers, m.text_heads, m.embed_dim)
        self.logit_scale = nn.Parameter(torch.ones([1]))
        self.projector = RefProjector(m.embed_dim, m.simsiam_dim)
        self.predictor = RefPredictor(m.simsiam_dim, m.simsiam_pred_dim)
        self.text_label_predictor = nn.Linear(m.text_width, VOCAB_SIZE)


class DistModule(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.fixture(scope="module")
def reference():
    """A reference-layout DeCLIP at the tiny config's sizes, every tensor random (BN statistics included)."""
    cfg = load_config("config/declip_tiny.yaml")
    torch.manual_seed(0)
    ref = DistModule(RefDeCLIP(cfg.model)).eval()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(123)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_(0, 0.2)
    return cfg, ref


def inputs(cfg):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
    tokens = torch.zeros(3, cfg.model.context_length, dtype=torch.long)
    for i, n in enumerate((4, 9, cfg.model.context_length - 2)):
        tokens[i, 0], tokens[i, n + 1] = SOT_ID, EOT_ID
        tokens[i, 1 : n + 1] = torch.randint(1, 49406, (n,), generator=g)
    return images, tokens


def test_converted_reference_gives_the_reference_outputs(reference):
    cfg, ref = reference
    ref_sd = ref.state_dict()
    assert all(k.startswith("module.") for k in ref_sd) and ref_sd["module.logit_scale"].shape == (1,)
    sd, overrides = convert_state_dict(ref_sd, vision_heads=cfg.model.vision_heads, text_heads=cfg.model.text_heads)

    m = cfg.model
    assert overrides == {"model": {
        "embed_dim": m.embed_dim, "image_size": m.image_size, "patch_size": m.patch_size,
        "vision_width": m.vision_width, "vision_layers": m.vision_layers, "vision_heads": m.vision_heads,
        "context_length": m.context_length, "vocab_size": 49409, "text_width": m.text_width,
        "text_layers": m.text_layers, "text_heads": m.text_heads, "mlp_ratio": 4.0,
        "simsiam_dim": m.simsiam_dim, "simsiam_pred_dim": m.simsiam_pred_dim,
    }}  # fmt: skip
    ours = build_model(config_from_dict(overrides)).eval()
    ours.load_state_dict(sd, strict=True)  # every name and shape matches

    images, tokens = inputs(cfg)
    net = ref.module
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), net.visual(images), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours.encode_text(tokens), net.encode_text(tokens), atol=2e-5, rtol=1e-4)
        feats = torch.randn(5, m.embed_dim)
        torch.testing.assert_close(ours.projector(feats), net.projector(feats), atol=1e-5, rtol=1e-4)
        z = torch.randn(5, m.simsiam_dim)
        torch.testing.assert_close(ours.predictor(z), net.predictor(z), atol=1e-5, rtol=1e-4)
        states = ours.text_states(tokens)
        torch.testing.assert_close(ours.text_mlm_head(states), net.text_label_predictor(net.encode_text.states(tokens)))
    assert ours.logit_scale.shape == () and ours.logit_scale.item() == net.logit_scale.item()
    assert torch.equal(ours.projector[7].running_var, net.projector.bn3.running_var)
    assert int(ours.projector[1].num_batches_tracked) == 123


def test_round_trip_is_bitwise(reference):
    cfg, ref = reference
    ref_sd = ref.state_dict()
    sd, overrides = convert_state_dict(ref_sd, cfg.model.vision_heads, cfg.model.text_heads)
    back = to_reference_state_dict(sd)
    assert back.keys() == ref_sd.keys()
    assert all(torch.equal(back[k], ref_sd[k]) and back[k].dtype == ref_sd[k].dtype for k in ref_sd)
    again, overrides2 = convert_state_dict(back, cfg.model.vision_heads, cfg.model.text_heads)
    assert overrides2 == overrides and again.keys() == sd.keys()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    # and from a model of ours: ours -> reference -> ours
    model_sd = build_model(config_from_dict(overrides)).state_dict()
    mine, _ = convert_state_dict(to_reference_state_dict(model_sd))
    assert mine.keys() == model_sd.keys() and all(torch.equal(mine[k], model_sd[k]) for k in model_sd)


def test_heads_default_to_the_reference_rule(reference):
    _, ref = reference
    _, overrides = convert_state_dict(ref.state_dict())
    assert overrides["model"]["vision_heads"] == overrides["model"]["text_heads"] == 128 // 64


def test_reference_vitb32_sizes_and_heads():
    """The reference run's sizes, on the meta device (shapes only): ViT-B/32 12 heads, text 8 heads."""
    with torch.device("meta"):
        ref_sd = to_reference_state_dict(build_model(load_config("config/declip_vitb32_yfcc15m.yaml")).state_dict())
    assert tuple(ref_sd["module.encode_text.token_embedding.weight"].shape) == (49409, 512)
    assert tuple(ref_sd["module.visual.positional_embedding"].shape) == (50, 768)
    _, overrides = convert_state_dict(ref_sd)
    m = overrides["model"]
    assert (m["image_size"], m["patch_size"], m["vision_width"], m["vision_layers"], m["vision_heads"]) == (
        224,
        32,
        768,
        12,
        12,
    )
    assert (m["embed_dim"], m["context_length"], m["text_width"], m["text_layers"], m["text_heads"]) == (
        512,
        77,
        512,
        12,
        8,
    )
    assert (m["simsiam_dim"], m["simsiam_pred_dim"], m["vocab_size"]) == (1024, 512, 49409)


def test_half_precision_weights_become_float32(reference):
    _, ref = reference
    half = {k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ours, _ = convert_state_dict(half, 4, 4)
    assert ours["visual.proj"].dtype == torch.float32 and ours["projector.1.num_batches_tracked"].dtype == torch.long
    assert torch.equal(ours["visual.proj"], half["module.visual.proj"].float())


def test_missing_heads_switch_their_loss_terms_off(reference):
    cfg, ref = reference
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith(("module.projector", "module.predictor"))}
    sd = {k: v for k, v in sd.items() if not k.startswith("module.text_label_predictor")}
    ours, overrides = convert_state_dict(sd, 4, 4)
    assert overrides["loss"] == {"simsiam_weight": 0.0, "mlm_weight": 0.0}
    build_model(config_from_dict(overrides)).load_state_dict(ours, strict=True)


def test_unknown_keys_are_errors_and_optional_heads_are_dropped(reference):
    _, ref = reference
    sd = dict(ref.state_dict())
    sd["module.projector_text.linear1.weight"] = torch.zeros(2, 2)
    ours, _ = convert_state_dict(sd)
    assert not any("projector_text" in k for k in ours)
    sd["module.visual.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(InputError, match=r"1 unknown keys.*module\.visual\.extra_head\.weight"):
        convert_state_dict(sd)
    sd.pop("module.visual.extra_head.weight")
    sd.pop("module.encode_text.token_embedding.weight")
    with pytest.raises(InputError, match="missing key 'module.encode_text.token_embedding.weight'"):
        convert_state_dict(sd)


def test_convert_checkpoint_file_writes_safetensors_and_config(reference, tmp_path):
    cfg, ref = reference
    ref_sd = ref.state_dict()
    ref_sd["module.predictor_nn_text.layer2.bias"] = torch.zeros(3)
    torch.save({"model": ref_sd, "optimizer": {"state": {}}, "last_iter": 128000}, tmp_path / "ckpt.pth.tar")
    summary = convert_checkpoint_file(tmp_path / "ckpt.pth.tar", tmp_path / "out" / "model.safetensors", 4, 4)
    assert summary["dropped"] == ["module.predictor_nn_text.layer2.bias"]
    written = load_file(tmp_path / "out" / "model.safetensors")
    expected, overrides = convert_state_dict(ref.state_dict(), 4, 4)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert yaml.safe_load((tmp_path / "out" / "model_config.yaml").read_text()) == overrides
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata()["declip_config"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt"):
        convert_checkpoint_file(tmp_path / "bad.pt", tmp_path / "x.safetensors")
