import math

import pytest
import torch

from declip.config import RunConfig, load_config
from declip.model import build_model
from declip.train.optim import build_optimizer, clamp_logit_scale, lr_at, param_groups


def reference_lr(t: int) -> float:
    """Reference §1 written out: warmup 1e-4 -> 1e-3 for t < 2500, then cosine to 0 at 128001."""
    if t < 2500:
        return 1e-4 + (1e-3 - 1e-4) * (t - 1) / 2499
    return 0.5 * 1e-3 * (1 + math.cos(math.pi * (t - 2500) / (128001 - 2500)))


@pytest.mark.parametrize("t", [1, 2, 2499, 2500, 2501, 64000, 128001])
def test_lr_schedule_matches_reference(t):
    assert lr_at(t, RunConfig()) == pytest.approx(reference_lr(t), rel=1e-12, abs=1e-15)


def test_lr_schedule_landmarks():
    cfg = RunConfig()
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(2, cfg) == pytest.approx(1e-4 + 9e-4 / 2499)
    assert lr_at(2500, cfg) == pytest.approx(1e-3)  # the peak
    assert lr_at(128001, cfg) == 0.0 and lr_at(130000, cfg) == 0.0
    assert lr_at(2499, cfg) < lr_at(2500, cfg) and lr_at(2501, cfg) < lr_at(2500, cfg)


def tiny():
    return load_config("config/declip_tiny.yaml", ["model.vision_layers=1", "model.text_layers=1"])


NO_DECAY_TOWER_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
                        "mlp.c_fc.bias", "mlp.c_proj.bias"]  # fmt: skip
DECAY_TOWER_BLOCK = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "mlp.c_fc.weight",
                     "mlp.c_proj.weight"]  # fmt: skip


def test_weight_decay_groups_are_the_reference_lists():
    groups = {g["group"]: g for g in param_groups(build_model(tiny()), 0.1)}
    blocks = ["visual.transformer.resblocks.0.", "transformer.resblocks.0."]
    no_decay = (
        ["logit_scale", "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
         "ln_final.weight", "ln_final.bias", "text_projection.bias", "text_mlm_head.bias"]
        + [b + n for b in blocks for n in NO_DECAY_TOWER_BLOCK]
        + [f"projector.{i}.{n}" for i in (1, 4, 7) for n in ("weight", "bias")] + [f"projector.{i}.bias" for i in (0, 3, 6)]
        + [f"predictor.{i}.bias" for i in (0, 1, 3)] + ["predictor.1.weight"]
    )  # fmt: skip
    decay = (
        ["positional_embedding", "token_embedding.weight", "visual.class_embedding", "visual.positional_embedding",
         "visual.proj", "text_projection.weight", "text_mlm_head.weight"]
        + [b + n for b in blocks for n in DECAY_TOWER_BLOCK]
        + [f"projector.{i}.weight" for i in (0, 3, 6)] + [f"predictor.{i}.weight" for i in (0, 3)]
    )  # fmt: skip
    assert sorted(groups["no_decay"]["names"]) == sorted(no_decay)
    assert sorted(groups["decay"]["names"]) == sorted(decay)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    # The frozen patch embedding is in neither group.
    assert "visual.conv1.weight" not in no_decay + decay


def test_optimizer_covers_exactly_the_trainable_params_and_clamp():
    model = build_model(tiny())
    opt = build_optimizer(model, tiny(), "cpu")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4) and opt.param_groups[0]["betas"] == (0.9, 0.98)
    with torch.no_grad():
        model.logit_scale.fill_(7.5)
    clamp_logit_scale(model, [3.0, 6.0])
    assert model.logit_scale.item() == 6.0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))  # the init, 2.659, is below the clamp's floor
    clamp_logit_scale(model, [3.0, 6.0])
    assert model.logit_scale.item() == 3.0
