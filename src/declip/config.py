"""Run configuration: typed sections, YAML loading, `--set` overrides, validation.

One YAML file describes one run. Every key lives in a dataclass below with a
one-line doc; the defaults are the reference run `yfcc15m_vit_declip`
(ViT-B/32 DeCLIP on YFCC15M). Unknown keys, wrong types and impossible values
fail before any work, with a message that names the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key, type or value is wrong; the message names the key."""


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with a one-line documentation string."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class ModelConfig:
    embed_dim: int = doc("joint embedding width (image and text projections)", default=512)
    image_size: int = doc("input resolution of the image tower", default=224)
    patch_size: int = doc("ViT patch size", default=32)
    vision_width: int = doc("ViT residual width", default=768)
    vision_layers: int = doc("ViT blocks", default=12)
    vision_heads: int = doc("ViT attention heads", default=12)
    freeze_patch_embed: bool = doc("keep the patch projection at its random init (reference)", default=True)
    context_length: int = doc("text tokens per caption, SOT and EOT included", default=77)
    vocab_size: int = doc("text vocabulary: 49406 BPE ids + mask, SOT, EOT", default=49409)
    text_width: int = doc("text transformer width", default=512)
    text_layers: int = doc("text transformer blocks", default=12)
    text_heads: int = doc("text attention heads", default=8)
    mlp_ratio: float = doc("MLP hidden width / residual width", default=4.0)
    simsiam_dim: int = doc("SimSiam projector width (reference 1024)", default=1024)
    simsiam_pred_dim: int = doc("SimSiam predictor bottleneck (reference 512)", default=512)
    logit_scale_init: float = doc("initial log logit scale, ln(1/0.07)", default=math.log(1 / 0.07))
    logit_scale_max: float = doc("forward clamps exp(logit scale) to at most this", default=100.0)


@dataclass
class LossConfig:
    mvs_weight: float = doc("weight of the multi-view contrastive loss (pair loss in CLIP mode)", default=0.4)
    nns_weight: float = doc("weight of nearest-neighbour supervision; 0 disables it", default=0.2)
    simsiam_weight: float = doc("weight of image self-supervision (SimSiam); 0 disables it", default=0.2)
    mlm_weight: float = doc("weight of masked language modelling; 0 disables it", default=0.2)
    image_views: int = doc("augmented image views per sample: 2 for DeCLIP, 1 for CLIP", default=2)
    text_views: int = doc("text views per sample: 2 (masked + EDA) for DeCLIP, 1 for CLIP", default=2)
    nn_bank_size: int = doc("per-device FIFO bank of text embeddings for NNS", default=65536)
    mlm_probability: float = doc("fraction of real tokens chosen for MLM", default=0.15)
    logit_scale_clamp: list[float] = doc(
        "[min, max] clamp of the log logit scale before and after each optimizer step",
        default_factory=lambda: [3.0, 6.0],
    )


@dataclass
class DataConfig:
    dataset_dir: str = doc("dataset folder laid out as the seed's ./dataset", default="./dataset")
    train_meta: str = doc(
        "training manifest (JSON Lines), relative to dataset_dir", default="yfcc15m_clean_open_data.json"
    )
    train_root: str = doc("training image folder, relative to dataset_dir", default="yfcc15m_clean_open_data")
    val_meta: str = doc("zero-shot manifest (JSON Lines), relative to dataset_dir", default="val_official.json")
    val_root: str = doc("zero-shot image folder, relative to dataset_dir", default="imagenet_val")
    bpe_vocab: str = doc(
        "BPE vocab relative to dataset_dir; the packaged copy when absent", default="bpe_simple_vocab_16e6.txt.gz"
    )
    nltk_dir: str = doc("NLTK data folder prepared by `declip setup-nltk`", default="resources/nltk_data")
    eda: bool = doc("EDA text augmentation for the second text view", default=True)
    workers: int = doc("DataLoader worker processes per rank", default=8)
    fast_decode: bool = doc("reduced-size JPEG decode when the crop allows it", default=True)
    device_augment: bool = doc(
        "colour jitter, grayscale, blur and normalisation run batched on the training device; the host only "
        "decodes, crops, resizes and flips (on for NPU/GPU; no gain on a CPU-only run, docs/performance.md)",
        default=True,
    )

    def path(self, name: str) -> Path:
        """Resolve one of the file keys against dataset_dir (absolute paths stay)."""
        return Path(self.dataset_dir) / getattr(self, name)


@dataclass
class OptimConfig:
    lr: float = doc("peak learning rate after warmup", default=1e-3)
    warmup_lr: float = doc("learning rate at step 1", default=1e-4)
    warmup_steps: int = doc("linear warmup from warmup_lr to lr over steps 1..warmup_steps", default=2500)
    betas: list[float] = doc("AdamW betas", default_factory=lambda: [0.9, 0.98])
    eps: float = doc("AdamW epsilon", default=1e-8)
    weight_decay: float = doc("AdamW weight decay (not on norms, biases, logit scale)", default=0.1)
    grad_clip: float = doc("max global grad norm; 0 disables clipping (reference)", default=0.0)
    fused: bool = doc("fused AdamW kernel where the device has one", default=True)


@dataclass
class TrainConfig:
    mode: Literal["perf", "full"] = doc("perf: fixed steps, FPS; full: train to max_steps with eval", default="full")
    max_steps: int = doc("optimizer steps (the cosine schedule ends at cosine_end_step)", default=128001)
    cosine_end_step: int = doc("step where the cosine reaches 0 (reference 128001)", default=128001)
    perf_steps: int = doc("steps of a perf run (seed: 100)", default=100)
    perf_warmup_steps: int = doc("first steps excluded from the FPS mean", default=5)
    batch_size: int = doc("samples per device per step", default=128)
    precision: Literal["auto", "fp32", "amp_fp16", "amp_bf16"] = doc(
        "auto: bf16 autocast on NPU/CUDA when supported, fp32 on CPU", default="auto"
    )
    compile: bool = doc("torch.compile the model (opt-in: compile time dominates short runs)", default=False)
    seed: int = doc("seed of sampling, augmentation and init", default=0)
    log_every: int = doc("steps between metric logs", default=100)
    eval_every: int = doc("steps between zero-shot evaluations in full mode; 0 disables", default=2000)
    nonfinite_policy: Literal["skip", "rollback", "stop"] = doc(
        "on a non-finite loss: skip the step, roll back to the last checkpoint with a lower LR, or stop",
        default="rollback",
    )
    rollback_lr_factor: float = doc("LR multiplier applied after each rollback", default=0.5)
    dist_timeout_s: int = doc("collective timeout; a dead rank fails the job after this", default=600)


@dataclass
class CheckpointConfig:
    every_steps: int = doc("steps between `latest` checkpoints", default=200)
    keep_every_steps: int = doc("steps between kept snapshots; 0 keeps none", default=4000)


@dataclass
class EvalConfig:
    templates: Literal["prompt80", "simple"] = doc(
        "prompt set: CLIP's 80 ImageNet templates or one", default="prompt80"
    )
    batch_size: int = doc("images per device per eval batch", default=256)
    class_names: Literal["meta", "imagenet"] = doc(
        "class names from val meta label_name, or the standard 1000 ImageNet names", default="meta"
    )


@dataclass
class TrackingConfig:
    enabled: bool = doc("log to MLflow (the run folder always keeps metrics)", default=True)
    uri: str = doc("MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db", default="")
    experiment: str = doc("MLflow experiment name", default="declip")


@dataclass
class RunConfig:
    name: str = doc("run name shown in reports and MLflow", default="yfcc15m_vit_declip")
    model: ModelConfig = doc("towers and heads", default_factory=ModelConfig)
    loss: LossConfig = doc("objective terms", default_factory=LossConfig)
    data: DataConfig = doc("dataset locations and loading", default_factory=DataConfig)
    optim: OptimConfig = doc("AdamW and LR schedule", default_factory=OptimConfig)
    train: TrainConfig = doc("loop, precision, guards", default_factory=TrainConfig)
    checkpoint: CheckpointConfig = doc("checkpoint cadence", default_factory=CheckpointConfig)
    eval: EvalConfig = doc("zero-shot evaluation", default_factory=EvalConfig)
    tracking: TrackingConfig = doc("MLflow", default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def clip_mode(self) -> bool:
        """Plain CLIP: one view of each modality and only the pair loss."""
        return self.loss.image_views == 1 and self.loss.text_views == 1


# ---------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} does not match {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}': expected null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string; accept it as the number it obviously is.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-3, true, [1, 2], fp32."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse override value {text!r}: {e}") from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides to a nested dict (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, text = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return values


# ---------------------------------------------------------------- validation


def _positive(cfg: RunConfig) -> list[tuple[str, Any]]:
    return [
        ("model.embed_dim", cfg.model.embed_dim),
        ("model.image_size", cfg.model.image_size),
        ("model.patch_size", cfg.model.patch_size),
        ("model.vision_width", cfg.model.vision_width),
        ("model.vision_layers", cfg.model.vision_layers),
        ("model.vision_heads", cfg.model.vision_heads),
        ("model.context_length", cfg.model.context_length),
        ("model.text_width", cfg.model.text_width),
        ("model.text_layers", cfg.model.text_layers),
        ("model.text_heads", cfg.model.text_heads),
        ("train.max_steps", cfg.train.max_steps),
        ("train.cosine_end_step", cfg.train.cosine_end_step),
        ("train.perf_steps", cfg.train.perf_steps),
        ("train.batch_size", cfg.train.batch_size),
        ("train.log_every", cfg.train.log_every),
        ("train.dist_timeout_s", cfg.train.dist_timeout_s),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps),
        ("eval.batch_size", cfg.eval.batch_size),
        ("optim.lr", cfg.optim.lr),
    ]


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-key checks that types alone cannot express."""
    for key, value in _positive(cfg):
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    m, loss = cfg.model, cfg.loss
    if m.image_size % m.patch_size:
        raise ConfigError(f"config key 'model.image_size' ({m.image_size}) must be a multiple of model.patch_size")
    if m.vision_width % m.vision_heads or m.text_width % m.text_heads:
        raise ConfigError("config keys 'model.vision_width'/'model.text_width' must be divisible by their heads")
    if m.context_length < 3:
        raise ConfigError("config key 'model.context_length' must leave room for SOT, a token and EOT")
    if loss.image_views not in (1, 2) or loss.text_views not in (1, 2):
        raise ConfigError("config keys 'loss.image_views' and 'loss.text_views' must be 1 or 2")
    if loss.simsiam_weight > 0 and loss.image_views != 2:
        raise ConfigError("config key 'loss.simsiam_weight' > 0 needs loss.image_views = 2")
    for key in ("mvs_weight", "nns_weight", "simsiam_weight", "mlm_weight"):
        if getattr(loss, key) < 0:
            raise ConfigError(f"config key 'loss.{key}' must be >= 0")
    if loss.mvs_weight + loss.nns_weight + loss.simsiam_weight + loss.mlm_weight <= 0:
        raise ConfigError("config keys 'loss.*_weight': at least one loss term must be on")
    if loss.nns_weight > 0 and loss.nn_bank_size <= 0:
        raise ConfigError("config key 'loss.nn_bank_size' must be > 0 when NNS is on")
    if not 0 < loss.mlm_probability < 1:
        raise ConfigError("config key 'loss.mlm_probability' must be in (0, 1)")
    lo, hi = (loss.logit_scale_clamp + [None, None])[:2]
    if len(loss.logit_scale_clamp) != 2 or lo >= hi:
        raise ConfigError("config key 'loss.logit_scale_clamp' must be [min, max] with min < max")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError("config key 'optim.betas' must be two numbers in [0, 1)")
    for key in ("warmup_steps", "grad_clip", "weight_decay", "warmup_lr"):
        if getattr(cfg.optim, key) < 0:
            raise ConfigError(f"config key 'optim.{key}' must be >= 0")
    for key in ("eval_every", "perf_warmup_steps"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"config key 'train.{key}' must be >= 0")
    if cfg.train.mode == "perf" and cfg.train.perf_warmup_steps >= cfg.train.perf_steps:
        raise ConfigError("config key 'train.perf_warmup_steps' must be < train.perf_steps")
    if cfg.checkpoint.keep_every_steps < 0:
        raise ConfigError("config key 'checkpoint.keep_every_steps' must be >= 0")
    if cfg.data.workers < 0:
        raise ConfigError("config key 'data.workers' must be >= 0")
    if not 0 < cfg.train.rollback_lr_factor <= 1:
        raise ConfigError("config key 'train.rollback_lr_factor' must be in (0, 1]")
    return cfg


# ---------------------------------------------------------------- public API


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (missing keys take defaults)."""
    if not isinstance(values, dict):
        raise ConfigError("a run config must be a mapping of sections")
    return validate(_build(RunConfig, values))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run YAML (or the defaults when path is None), apply overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a run config must be a mapping of sections")
    apply_overrides(values, overrides or [])
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def as_config(config: RunConfig | dict[str, Any]) -> RunConfig:
    """Accept either a RunConfig or a (possibly partial) nested dict."""
    return config if isinstance(config, RunConfig) else config_from_dict(config)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def documented_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf key: the source of docs/config.md."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += documented_keys(tp, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, f.metadata.get("doc", ""), default))
    return rows
