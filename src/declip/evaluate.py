"""Zero-shot classification: a text classifier from class names x prompt templates, exact sharded scoring.

Reference §7: for each class, encode every prompt, L2-normalise each, average, re-normalise; image
embeddings are L2-normalised and the logits are plain dot products. Unlike the reference, whose
distributed sampler padded the last batch with duplicates and counted them, every image is scored
exactly once: rank r takes images r, r + W, r + 2W, ... and only integer counts are all-reduced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from declip.config import RunConfig
from declip.errors import InputError


def prompt_templates(name: str) -> list[Callable[[str], str]]:
    """ "prompt80": OpenAI CLIP's 80 ImageNet templates (open_clip's copy); "simple": one."""
    if name == "prompt80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if name == "simple":
        return [lambda c: f"a photo of a {c}."]
    raise ValueError(f"unknown template set {name!r}")


def eval_class_names(cfg: RunConfig) -> list[str]:
    """Class names ordered by label: from the val meta's `label_name`, or the standard ImageNet 1000."""
    if cfg.eval.class_names == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    from declip.data.manifest import class_names

    return class_names(cfg.data.path("val_meta"))


def shard_indices(n: int, rank: int, world: int) -> range:
    """This rank's share of n items, strided: disjoint across ranks, union exactly range(n), no padding."""
    return range(rank, n, world)


@torch.inference_mode()
def build_classifier(
    model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[Callable], device: torch.device,
    batch_size: int = 256, amp: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """(D, C) zero-shot weights: per class, the re-normalised mean of its L2-normalised prompt embeddings.

    Only the text tower runs under autocast (`amp`); normalising and averaging are fp32.
    """
    prompts = [t(c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            f = model.encode_text(tokens)
        feats.append(F.normalize(f.float(), dim=-1))
    per_prompt = torch.cat(feats).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """(len(ks),) long, on the logits' device: how many rows have their label among the k highest logits
    (k capped at the class count). No host sync, so batches queue up on an accelerator."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks])


def zero_shot_eval(
    model: nn.Module, cfg: RunConfig, device: torch.device | str, step: int = 0, group=None, progress: bool = True
) -> dict:
    """Top-1/top-5 (percent) over every val image exactly once, sharded across the ranks of `group`.

    Every rank builds the (small) classifier itself and scores its share; the counts are summed.
    The model is put in eval mode and its previous mode restored. `wall_time_s` covers the whole
    evaluation, `images_per_s` the image pass alone.
    """
    from declip.data.datasets import ValDataset
    from declip.model import unwrap_model
    from declip.text.tokenizer import Tokenizer, resolve_bpe_path
    from declip.train.loop import resolve_precision

    t0 = time.perf_counter()
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    precision = resolve_precision(cfg.train.precision, device.type)  # the trainer's rule, so eval matches it
    amp = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision)
    try:
        names = eval_class_names(cfg)
        templates = prompt_templates(cfg.eval.templates)
        tokenizer = Tokenizer(resolve_bpe_path(cfg.data), cfg.model.context_length)
        classifier = build_classifier(net, tokenizer, names, templates, device, cfg.eval.batch_size, amp)

        dataset = ValDataset(cfg.data.path("val_meta"), cfg.data.path("val_root"), cfg.model.image_size)
        loader = DataLoader(
            Subset(dataset, shard_indices(len(dataset), rank, world)),
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.workers,
            pin_memory=device.type != "cpu",
        )
        counts = torch.zeros(3, dtype=torch.long, device=device)  # top-1 hits, top-5 hits, images
        t1 = time.perf_counter()
        bar = tqdm(loader, desc=f"zero-shot @ {step}", unit="batch", disable=not (progress and rank == 0))
        with torch.inference_mode():
            for images, labels in bar:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    feats = net.encode_image(images.to(device, non_blocking=True))
                # fp32 scoring: bf16 logits would tie near-equal classes
                logits = F.normalize(feats.float(), dim=-1) @ classifier
                labels = labels.to(device, non_blocking=True)
                counts[:2] += topk_correct(logits, labels)
                counts[2] += labels.numel()
    finally:
        net.train(was_training)
    if distributed:
        dist.all_reduce(counts, group=group)  # on the rank's device: NCCL/HCCL reduce device tensors, gloo CPU ones
    n1, n5, n = counts.tolist()  # the one host sync: the image pass has finished once it returns
    images_pass_s = time.perf_counter() - t1
    if n != len(dataset):
        raise RuntimeError(f"zero-shot scored {n} images, the val set has {len(dataset)}")
    return {
        "top1": 100.0 * n1 / max(n, 1),
        "top5": 100.0 * n5 / max(n, 1),
        "images": n,
        "classes": len(names),
        "templates": len(templates),
        "step": int(step),
        "wall_time_s": time.perf_counter() - t0,
        "images_per_s": n / max(images_pass_s, 1e-9),
    }


# ---------------------------------------------------------------- checkpoints and the CLI verb


def _load(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """(state dict, training step or None) of a trainer checkpoint `.pt` or a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            sd = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        return sd, int(meta["step"]) if "step" in meta else None
    from declip.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise InputError(f"{path}: expected a trainer checkpoint, a dict with a 'model' state dict")
    return ckpt["model"], int(ckpt["step"]) if "step" in ckpt else None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of a trainer checkpoint (`.pt`, key `model`) or a `.safetensors` file."""
    return _load(path)[0]


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: Path | str) -> None:
    """`load_state_dict(strict=True)`, with an InputError naming a few differing keys when it does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:4]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})" if unexpected else "",
            f"{len(shapes)} with another shape (checkpoint vs model, e.g. {shapes[:3]})" if shapes else "",
        ]
        raise InputError(
            f"{source}: weights do not match the config's model: " + "; ".join(p for p in parts if p)
            + " (same model.* sizes and loss heads as in training?)"
        )  # fmt: skip
    model.load_state_dict(sd, strict=True)


def run_eval(
    cfg: RunConfig, checkpoint: Path, out: Path, device: str | None = None, run_dir: Path | str | None = None
) -> dict:
    """`declip eval`: load `checkpoint` into the config's model, evaluate, write `out` (rank 0), track it."""
    from declip.model import build_model
    from declip.tracking import Tracker
    from declip.train import distributed as D
    from declip.train.checkpoint import atomic_write

    env = D.init_distributed(device, cfg.train.dist_timeout_s)
    try:
        sd, step = _load(Path(checkpoint))
        if step is None:  # final weights (model.safetensors) carry no step: the run's summary has it
            summary = Path(run_dir or Path(checkpoint).parent) / "train_summary.json"
            step = json.loads(summary.read_text()).get("steps", 0) if summary.is_file() else 0
        model = build_model(cfg)
        load_strict(model, sd, checkpoint)
        model.to(env.device)
        result = zero_shot_eval(model, cfg, env.device, step=step)
        result.update(checkpoint=str(checkpoint), device_type=env.device_type, devices=env.world_size)
        if env.is_main:
            atomic_write(Path(out), lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
            # The training run's folder (and through it its MLflow run) when given, else one beside eval.json.
            tracker = Tracker(Path(run_dir) if run_dir else Path(out).parent, cfg.tracking, f"{cfg.name}-eval")
            tracker.log_metrics({"zeroshot_top1": result["top1"], "zeroshot_top5": result["top5"]}, step)
            tracker.log_artifact(Path(out))
            tracker.finish("FINISHED")
        D.barrier()
    finally:
        D.cleanup()
    return result
