"""Training-step throughput: DeCLIP ViT-B/32, the same model in CLIP mode, and open_clip's ViT-B-32.

For each system, at the same per-device batch and precision, in one process: samples/s of a full
training step (forward, loss, backward, AdamW step) on synthetic inputs (no data loading), FLOPs of
one step counted by torch.utils.flop_counter.FlopCounterMode, the achieved GFLOP/s, and that as a
fraction of the matmul throughput measured in the same run (a 4096^3 matmul in the step's dtype:
fp32, or bf16/fp16 under autocast). The fraction says how much of the device the step uses; the
ratio of DeCLIP's to CLIP's step time says what the extra views and heads cost.

    python benchmarks/train_step.py --batch 128 --steps 20 --device cuda --precision auto \
        --append docs/performance.md
    python benchmarks/train_step.py --quick          # tiny sizes: CI, seconds on a CPU
    python benchmarks/train_step.py --device cuda --precision amp_bf16 --compile --batch 128

Runs unchanged on CUDA and NPU (bf16 autocast under --precision auto). With --compile the models'
forward is torch.compile'd (the trainer's `train.compile`); FLOPs are always counted on the eager
model (a dispatch-mode counter sees no ops inside compiled kernels), and the first two steps, which
compile, are not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from declip.config import RunConfig, config_from_dict
from declip.model import build_model
from declip.objective import DeCLIPObjective
from declip.text.tokenizer import EOT_ID, SOT_ID, mask_tokens
from declip.train.distributed import detect_device_type
from declip.train.loop import resolve_precision
from declip.train.optim import build_optimizer, clamp_logit_scale

QUICK_MODEL = {
    "embed_dim": 64, "image_size": 32, "patch_size": 16, "vision_width": 64, "vision_layers": 2,
    "vision_heads": 2, "context_length": 16, "text_width": 64, "text_layers": 2, "text_heads": 2,
    "simsiam_dim": 64, "simsiam_pred_dim": 32,
}  # fmt: skip
DECLIP = "DeCLIP (2 image + 2 text views, MVS, NNS, SimSiam, MLM)"
CLIP_MODE = "DeCLIP code, CLIP mode (1 + 1 views, pair loss only)"
OPEN_CLIP = "open_clip CLIP + ClipLoss"
CLIP_LOSS = {"image_views": 1, "text_views": 1, "mvs_weight": 1.0, "nns_weight": 0.0, "simsiam_weight": 0.0,
             "mlm_weight": 0.0}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize()


def autocast(device: torch.device, precision: str):
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def synthetic_tokens(batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Captions of random length: SOT, random regular ids, EOT, padding."""
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(torch.randint(3, length - 1, (batch,), generator=g).tolist()):
        tokens[row, 0], tokens[row, n + 1] = SOT_ID, EOT_ID
        tokens[row, 1 : n + 1] = torch.randint(1, 49405, (n,), generator=g)
    return tokens


def declip_step(
    cfg: RunConfig, batch: int, device: torch.device, precision: str, compile: bool = False
) -> Callable[..., None]:
    """One DeCLIP (or CLIP-mode) training step, built from the trainer's own parts; `step(eager=True)`
    bypasses torch.compile (for FLOP counting)."""
    model = build_model(cfg).to(device).train()
    compiled = torch.compile(model) if compile else model
    objective = DeCLIPObjective(cfg.loss, cfg.model.embed_dim).to(device)
    opt = build_optimizer(model, cfg, device.type)
    g = torch.Generator().manual_seed(0)
    size, length = cfg.model.image_size, cfg.model.context_length
    images = [torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(cfg.loss.image_views)]
    texts = [synthetic_tokens(batch, length, g) for _ in range(cfg.loss.text_views)]
    mask = labels = None
    if cfg.loss.mlm_weight > 0:
        texts[0], full_labels = mask_tokens(texts[0], g, cfg.loss.mlm_probability)
        mask = (full_labels != -100).to(device)
        labels = full_labels.to(device)[mask]
    texts = [t.to(device) for t in texts]

    def step(eager: bool = False) -> None:
        with autocast(device, precision):
            out = (model if eager else compiled)(images, texts, mask)
        objective(out, labels)["loss"].backward()
        clamp_logit_scale(model, cfg.loss.logit_scale_clamp)
        opt.step()
        clamp_logit_scale(model, cfg.loss.logit_scale_clamp)
        opt.zero_grad(set_to_none=True)

    return step


def open_clip_step(
    batch: int, device: torch.device, precision: str, quick: bool, compile: bool = False
) -> Callable[..., None]:
    """open_clip's ViT-B-32 with its ClipLoss and a plain AdamW (same betas/eps/decay as ours)."""
    import open_clip

    if quick:
        m = QUICK_MODEL
        vision = {"image_size": m["image_size"], "patch_size": m["patch_size"], "width": m["vision_width"],
                  "layers": m["vision_layers"], "head_width": m["vision_width"] // m["vision_heads"]}  # fmt: skip
        text = {"context_length": m["context_length"], "vocab_size": 49408, "width": m["text_width"],
                "layers": m["text_layers"], "heads": m["text_heads"]}  # fmt: skip
        model = open_clip.model.CLIP(m["embed_dim"], vision, text, quick_gelu=True)
        size, length = m["image_size"], m["context_length"]
    else:
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        size, length = 224, 77
    model = model.to(device).train()
    compiled = torch.compile(model) if compile else model
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1,
                            fused=device.type == "cuda")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    texts = synthetic_tokens(batch, length, g).clamp(max=49407).to(device)

    def step(eager: bool = False) -> None:
        with autocast(device, precision):
            image_features, text_features, logit_scale = (model if eager else compiled)(images, texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(step: Callable[..., None], steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, FLOPs of one step): one counted eager step, two warmup steps (compile, autotuning,
    allocator), then `steps` timed."""
    with FlopCounterMode(display=False) as counter:
        step(eager=True)
    step()
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps, float(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device, precision: str, n: int, reps: int = 3) -> float:
    """FLOP/s of an n^3 matmul in the step's dtype: the reference for 'fraction of peak' (MFU)."""
    dtype = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def matmul_peak(device: torch.device, precision: str, quick: bool) -> float:
    if device.type == "cpu":
        return matmul_flops_per_s(device, precision, 1024 if quick else 4096)
    return matmul_flops_per_s(device, precision, 2048 if quick else 8192, reps=20)  # long enough to time


def run(args: argparse.Namespace) -> dict:
    device = torch.device(detect_device_type(args.device))
    if device.type != "cpu":
        torch.get_device_module(device.type).set_device(0)
        device = torch.device(device.type, 0)
    precision = resolve_precision(args.precision, device.type)
    model = QUICK_MODEL if args.quick else {}
    declip = config_from_dict({"model": model})
    clip = config_from_dict({"model": model, "loss": CLIP_LOSS})
    peak = matmul_peak(device, precision, args.quick)
    c = args.compile
    systems = {
        DECLIP: lambda: declip_step(declip, args.batch, device, precision, c),
        CLIP_MODE: lambda: declip_step(clip, args.batch, device, precision, c),
        OPEN_CLIP: lambda: open_clip_step(args.batch, device, precision, args.quick, c),
    }
    rows = []
    for name, build in systems.items():
        step = build()  # one model in memory at a time
        seconds, flops = measure(step, args.steps, device)
        rows.append({
            "system": name, "samples_per_s": args.batch / seconds, "step_s": seconds,
            "gflop_per_step": flops / 1e9, "gflop_per_s": flops / seconds / 1e9,
            "fraction_of_matmul_peak": flops / seconds / peak,
        })  # fmt: skip
        del step
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": device_name(device),
        "batch": args.batch,
        "steps": args.steps,
        "precision": precision,
        "compile": args.compile,
        "quick": args.quick,
        "matmul_gflop_per_s": peak / 1e9,
        "torch": torch.__version__,
        "rows": rows,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return torch.get_device_module(device.type).get_device_name(device)


def markdown(result: dict) -> str:
    head = (
        f"### Training step, {'tiny models (--quick)' if result['quick'] else 'ViT-B/32'}, {result['device']}, "
        f"batch {result['batch']} per device, {result['precision']}{', compiled' if result['compile'] else ''}\n\n"
        f"{result['date']}, torch {result['torch']}, {result['steps']} timed steps on synthetic inputs; "
        f"matmul reference {result['matmul_gflop_per_s']:.0f} GFLOP/s.\n\n"
        "| system | samples/s | GFLOP/step | achieved GFLOP/s | of matmul peak |\n| --- | --- | --- | --- | --- |\n"
    )
    body = "".join(
        f"| {r['system']} | {r['samples_per_s']:.2f} | {r['gflop_per_step']:.1f} | {r['gflop_per_s']:.1f} "
        f"| {r['fraction_of_matmul_peak']:.1%} |\n"
        for r in result["rows"]
    )
    return head + body


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="samples per step (per device)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per system")
    p.add_argument("--device", choices=["npu", "cuda", "cpu"], help="default: detected")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "amp_fp16", "amp_bf16"])
    p.add_argument("--quick", action="store_true", help="tiny model sizes (CI)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models' forward")
    p.add_argument("--append", type=Path, help="append the Markdown table to this file")
    args = p.parse_args(argv)
    result = run(args)
    print(markdown(result))
    print(json.dumps(result))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + markdown(result))
    return result


if __name__ == "__main__":
    main()
