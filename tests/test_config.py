"""Run config: reference defaults, overrides, and errors that name the key."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from declip.config import ConfigError, RunConfig, documented_keys, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_reference_defaults_match_the_reference_run():
    cfg = load_config(ROOT / "config/declip_vitb32_yfcc15m.yaml")
    assert cfg.to_dict() == RunConfig().to_dict()
    assert (cfg.model.vision_width, cfg.model.vision_layers, cfg.model.patch_size) == (768, 12, 32)
    assert (cfg.model.text_width, cfg.model.text_layers, cfg.model.text_heads) == (512, 12, 8)
    assert cfg.model.vocab_size == 49409 and cfg.model.context_length == 77
    assert cfg.train.batch_size == 128 and cfg.train.max_steps == 128001
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.weight_decay == 0.1
    assert (cfg.optim.warmup_lr, cfg.optim.lr, cfg.optim.warmup_steps) == (1e-4, 1e-3, 2500)
    weights = (cfg.loss.mvs_weight, cfg.loss.nns_weight, cfg.loss.simsiam_weight, cfg.loss.mlm_weight)
    assert weights == (0.4, 0.2, 0.2, 0.2)
    assert cfg.loss.logit_scale_clamp == [3.0, 6.0] and cfg.loss.nn_bank_size == 65536
    assert math.isclose(cfg.model.logit_scale_init, math.log(1 / 0.07))
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_every_steps, cfg.train.eval_every) == (200, 4000, 2000)


def test_tiny_config_loads_and_keeps_reference_objective():
    cfg = load_config(ROOT / "config/declip_tiny.yaml")
    assert cfg.model.embed_dim == 128 and cfg.loss.mvs_weight == 0.4 and not cfg.clip_mode


def test_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["train.max_steps=10", "optim.lr=5e-4", "train.compile=true", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.max_steps == 10 and cfg.optim.lr == 5e-4 and cfg.train.compile is True
    assert cfg.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=10", "unknown config key 'train.max_step'"),
        ("modle.embed_dim=3", "unknown config key 'modle'"),
        ("train.batch_size=abc", "'train.batch_size': expected an integer"),
        ("train.batch_size=0", "'train.batch_size' must be > 0"),
        ("train.max_steps=-5", "'train.max_steps' must be > 0"),
        ("train.batch_size=1.5", "'train.batch_size': expected an integer"),
        ("train.precision=fp8", "'train.precision': 'fp8' is not one of"),
        ("model.freeze_patch_embed=yes please", "'model.freeze_patch_embed': expected true/false"),
        ("model.image_size=100", "'model.image_size' (100) must be a multiple"),
        ("loss.image_views=1", "'loss.simsiam_weight' > 0 needs loss.image_views = 2"),
        ("train", "not of the form dotted.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_bad_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embed_dim: 64\n  widht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "model.widht" in str(err.value)


def test_every_key_is_documented_and_yaml_round_trips(tmp_path):
    rows = documented_keys()
    assert len(rows) > 50
    assert all(text for _, text, _ in rows), [k for k, t, _ in rows if not t]
    assert {k for k, _, _ in rows} == set(flatten(RunConfig().to_dict()))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(load_config(ROOT / "config/declip_tiny.yaml").to_dict()))
    assert load_config(path) == load_config(ROOT / "config/declip_tiny.yaml")


def test_cli_config_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "declip",
            "train",
            "--config",
            str(ROOT / "config/declip_tiny.yaml"),
            "--set",
            "train.batch_size=-1",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "train.batch_size" in proc.stderr
    assert not (tmp_path / "run").exists()
