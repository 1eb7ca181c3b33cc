"""Released DeCLIP checkpoints (Sense-GVT/DeCLIP) -> this project's parameter names.

The mapping below was derived from the reference implementation at commit
9d9e25da10e2299cf0c84b6e0be1c49085565d22 (`prototype/model/{clip,declip}.py`,
`image_encoder/visual_transformer.py`, `text_encoder/text_transformer.py`,
`{image,text}_encoder/base_transformer.py`, `utils/nnclr_modules/*`,
`utils/text_utils/simple_tokenizer.py`, `solver/declip_solver.py`).

File layout. The solver wraps the model in linklink's `DistModule` (attribute
`module`) and saves `{'model': state_dict, 'optimizer': ..., 'last_iter': ...}`,
so every key starts with `module.`. Only `model` is read.

Key mapping (reference, after `module.` -> ours):

| reference | ours | note |
| --- | --- | --- |
| `visual.<rest>` | `visual.<rest>` | same names: conv1 (no bias), class_embedding, positional_embedding (grid^2+1, W), ln_pre, transformer.resblocks.N.{ln_1, attn.in_proj_weight (3W, W), attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj (W, D) |
| `encode_text.<rest>` | `<rest>` | token_embedding (V, W), positional_embedding (L, W), transformer.resblocks.N.*, ln_final, text_projection (Linear with bias, weight (D, W)) |
| `logit_scale` (1,) | `logit_scale` () | the reference's parameter is a 1-element vector, ours a scalar |
| `projector.{linear1, bn1, linear2, bn2, linear3, bn3}` | `projector.{0, 1, 3, 4, 6, 7}` | SimSiam projector: Linear(D, H)-BN-ReLU-Linear(H, H)-BN-ReLU-Linear(H, H)-BN; BN running stats included |
| `predictor.{linear1, bn1, layer2}` | `predictor.{0, 1, 3}` | SimSiam predictor: Linear(H, P)-BN-ReLU-Linear(P, H) |
| `text_label_predictor` | `text_mlm_head` | MLM head Linear(W, V) with bias |

Both towers use `nn.MultiheadAttention` (packed q, k, v rows in that order, as
our `Attention`), sequence-first; the text tower's causal mask and the NN
memory banks are plain attributes, not buffers, so a reference state dict holds
no buffers besides BatchNorm statistics. Keys of optional heads that the
reference run `yfcc15m_vit_declip` never builds (`projector_text`,
`predictor_text`, `projector_nn_text`, `predictor_nn_text`) are dropped by
name; any other key is an error.

Token ids. The reference tokenizer's vocabulary is 256 bytes + 256 byte-with-
`</w>` + 48894 merges, then `<|mask|>` 49406, `<|startoftext|>` 49407,
`<|endoftext|>` 49408 (`vocab_size = len(encoder) = 49409`), and the token
embedding has those 49409 rows in that order: exactly our ids
(`declip.text.tokenizer`). OpenAI CLIP's SOT/EOT (49406/49407) are not
involved, so no row of `token_embedding` or `text_label_predictor` is shifted.

Sizes come from shapes; attention heads cannot, so they default to the
reference's rule `heads = width // 64` (ViT-B/32: 12, text 512: 8) unless
given. Floating tensors are stored as float32 (the reference's fp16 runs save
half weights; our model holds fp32 parameters).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import save

from declip.config import config_from_dict
from declip.errors import InputError
from declip.model import build_model
from declip.train.checkpoint import atomic_write, load_checkpoint

# (reference prefix, our prefix), most specific first; `module.` is stripped before.
_RENAMES: list[tuple[str, str]] = [
    ("visual.", "visual."),
    ("encode_text.", ""),
    ("projector.linear1.", "projector.0."),
    ("projector.bn1.", "projector.1."),
    ("projector.linear2.", "projector.3."),
    ("projector.bn2.", "projector.4."),
    ("projector.linear3.", "projector.6."),
    ("projector.bn3.", "projector.7."),
    ("predictor.linear1.", "predictor.0."),
    ("predictor.bn1.", "predictor.1."),
    ("predictor.layer2.", "predictor.3."),
    ("text_label_predictor.", "text_mlm_head."),
]
_INVERSE = [(dst, src) for src, dst in _RENAMES if dst]
# Our text tower lives at the top level; these are its first name components.
_TEXT_ROOTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection.")
# Heads of DeCLIP variants the reference run does not build (text SimSiam, NN-text SimSiam).
DROPPED_PREFIXES = ("projector_text.", "predictor_text.", "projector_nn_text.", "predictor_nn_text.")


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def _layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if found != set(range(len(found))) or not found:
        raise InputError(f"reference checkpoint: blocks under '{prefix}' are {sorted(found)}, expected 0..N-1")
    return len(found)


def _require(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise InputError(f"reference checkpoint: missing key '{reference_name(key)}' (not a DeCLIP ViT checkpoint?)")
    return sd[key]


def infer_config(sd: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None) -> dict:
    """Config overrides (`{'model': {...}, 'loss': {...}}`) read off a state dict in *our* names."""
    conv = _require(sd, "visual.conv1.weight")
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    grid = round((_require(sd, "visual.positional_embedding").shape[0] - 1) ** 0.5)
    embed_dim = _require(sd, "visual.proj").shape[1]
    vocab_size, text_width = _require(sd, "token_embedding.weight").shape
    proj = _require(sd, "text_projection.weight")
    if tuple(proj.shape) != (embed_dim, text_width):
        raise InputError(
            f"reference checkpoint: text_projection.weight is {tuple(proj.shape)}, "
            f"expected (embed_dim {embed_dim}, text width {text_width})"
        )
    model = {
        "embed_dim": embed_dim,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "vision_width": vision_width,
        "vision_layers": _layers(sd, "visual.transformer.resblocks."),
        "vision_heads": vision_heads or max(1, vision_width // 64),
        "context_length": _require(sd, "positional_embedding").shape[0],
        "vocab_size": vocab_size,
        "text_width": text_width,
        "text_layers": _layers(sd, "transformer.resblocks."),
        "text_heads": text_heads or max(1, text_width // 64),
        "mlp_ratio": _require(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0] / vision_width,
    }
    loss: dict[str, float] = {}
    if "projector.0.weight" in sd:
        model["simsiam_dim"] = sd["projector.0.weight"].shape[0]
        model["simsiam_pred_dim"] = _require(sd, "predictor.0.weight").shape[0]
    else:
        loss["simsiam_weight"] = 0.0
    if "text_mlm_head.weight" not in sd:
        loss["mlm_weight"] = 0.0
    return {"model": model, "loss": loss} if loss else {"model": model}


def convert_state_dict(
    ref_sd: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Reference state dict (`module.`-prefixed or not) -> (our state dict, config overrides)."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our key -> the reference key, for messages
    for key, value in ref_sd.items():
        name = key.removeprefix("module.")
        if name.startswith(DROPPED_PREFIXES):
            continue
        ours = "logit_scale" if name == "logit_scale" else _rename(name, _RENAMES) or f"?{key}"
        out[ours], source[ours] = (value.reshape(()) if ours == "logit_scale" else value), key
    out = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in out.items()}
    overrides = infer_config(out, vision_heads, text_heads)
    # The model these sizes build (on the meta device: no memory, no init cost) must take every key.
    with torch.device("meta"):
        expected = build_model(config_from_dict(overrides)).state_dict()
    unknown = [source[k] for k in out if k not in expected]
    missing = [k for k in expected if k not in out]
    shapes = [f"{source[k]} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
              for k, v in out.items() if k in expected and v.shape != expected[k].shape]  # fmt: skip
    if unknown or missing or shapes:
        parts = [
            f"{len(unknown)} unknown keys, e.g. {unknown[:5]}" if unknown else "",
            f"{len(missing)} missing (our names), e.g. {missing[:5]}" if missing else "",
            f"{len(shapes)} of an unexpected shape, e.g. {shapes[:3]}" if shapes else "",
        ]
        raise InputError("reference checkpoint: " + "; ".join(p for p in parts if p))
    return out, overrides


def reference_name(key: str) -> str:
    """The reference checkpoint's key for one of ours."""
    if key == "logit_scale":
        return "module.logit_scale"
    # the text tower's empty prefix cannot be inverted by prefix: its roots are listed instead
    name = "encode_text." + key if key.startswith(_TEXT_ROOTS) else _rename(key, _INVERSE)
    if name is None:
        raise KeyError(f"no reference name for our key '{key}'")
    return "module." + name


def to_reference_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the reference's layout (`module.` prefix, its names, logit_scale of shape (1,))."""
    return {reference_name(k): v.reshape(1) if k == "logit_scale" else v for k, v in sd.items()}


def load_reference_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The `model` state dict of a reference checkpoint file (a bare state dict is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference checkpoint not found: {path}")
    obj = load_checkpoint(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: expected {{'model': state_dict}} (the reference solver's layout)")
    return sd


def convert_checkpoint_file(
    src: Path, dst: Path, vision_heads: int | None = None, text_heads: int | None = None
) -> dict:
    """Convert `src` to safetensors at `dst`, config overrides beside it as `<dst stem>_config.yaml`.

    For `model.safetensors` the config lands in `model_config.yaml`, the name the
    trainer uses for its final weights. Returns a summary.
    """
    ref_sd = load_reference_checkpoint(Path(src))
    sd, overrides = convert_state_dict(ref_sd, vision_heads, text_heads)
    dropped = sorted(k for k in ref_sd if k.removeprefix("module.").startswith(DROPPED_PREFIXES))
    dst = Path(dst)
    config_path = dst.with_name(f"{dst.stem}_config.yaml")
    blob = save(sd, metadata={"source": str(src), "declip_config": json.dumps(overrides)})
    atomic_write(dst, lambda f: f.write(blob))
    atomic_write(config_path, lambda f: f.write(yaml.safe_dump(overrides, sort_keys=False).encode()))
    return {"tensors": len(sd), "dropped": dropped, "config": overrides, "config_path": str(config_path)}
