"""Every benchmark in one run: one report, appended to docs/performance.md with command, machine and date.

    python benchmarks/run_all.py --batch 8 --steps 3 --out docs/performance.md       # this CPU, ~10 min
    python benchmarks/run_all.py --quick --out /tmp/perf.md                          # CI: tiny sizes, seconds
    python benchmarks/run_all.py --device cuda --precision amp_bf16 --compile --batch 128 --steps 20

Sections (each one Markdown table):
- Training step: DeCLIP ViT-B/32, the same code in CLIP mode and open_clip ViT-B-32 + ClipLoss at the same
  batch and precision, in this process (benchmarks/train_step.py): samples/s, GFLOP/s, fraction of the matmul
  rate measured in the same run, and each system's samples/s relative to open_clip.
- Step optimisations: before/after pairs measured here (MLM head at the chosen positions vs the full head,
  torch.compile on the tiny config, the cost of the per-step non-finite guard).
- Peak memory: DeCLIP ViT-B/32 at the reference's 128 per device, and whether it fits an Ascend 910 (32 GB)
  and 910B (64 GB). On an accelerator: measured (max_memory_allocated). On a CPU: the peak of live tensor
  bytes (a dispatch-mode counter over every op's outputs, freed when their storage dies) during two training
  steps at two small batches, extrapolated linearly in batch.
- Data pipeline: host decode + two-view augmentation samples/s per core on photograph-sized JPEGs
  (500x375, 640x427): plain torchvision, ours all on the host, ours with data.device_augment (host part), and
  the batched device part; check-data lines/s per core.
- Scaling: step time and bytes through each collective per step for 1 and 2 gloo processes (tiny model),
  measured by counting (DDP comm hook, wrapped all_gather/all_reduce) next to the formula.
- Communication at scale: the formula's bytes per step at the reference batch for 8, 32 and 128 devices.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402
from augment import baseline, photo, rates  # noqa: E402
from check_data import make_world  # noqa: E402
from common import machine  # noqa: E402

from declip.config import config_from_dict, load_config  # noqa: E402
from declip.data import device_augment  # noqa: E402
from declip.data.check import check_data  # noqa: E402
from declip.data.transforms import TwoViewTransform  # noqa: E402
from declip.model import build_model  # noqa: E402
from declip.train.distributed import any_rank, detect_device_type  # noqa: E402
from declip.train.loop import resolve_precision  # noqa: E402

SECTIONS = (
    "Training step",
    "Step optimisations",
    "Peak memory",
    "Data pipeline",
    "Scaling",
    "Communication at scale",
)
GIB = 2**30
REF_BATCH = 128
DEVICE_MEMORY = {"Ascend 910 (32 GB)": 32e9, "Ascend 910B (64 GB)": 64e9}
HEADROOM = 0.9  # usable fraction of device memory (framework, workspace, fragmentation)
TARGET_FPS = 3000  # one GPU: the host must feed this many samples/s
WORLDS = (8, 32, 128)
ROOT = Path(__file__).resolve().parents[1]


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def model_cfg(quick: bool, **loss):
    return config_from_dict({"model": ts.QUICK_MODEL if quick else {}, "loss": loss})


# ---------------------------------------------------------------- training step


def section_step(args, device: torch.device, precision: str) -> tuple[str, dict]:
    result = ts.run(
        argparse.Namespace(
            batch=args.batch, steps=args.steps, device=device.type, precision=precision, quick=args.quick,
            compile=args.compile,
        )
    )  # fmt: skip
    rows = {r["system"]: r for r in result["rows"]}
    ref = rows[ts.OPEN_CLIP]["samples_per_s"]
    body = table(
        ["system", "samples/s", "GFLOP/step", "achieved GFLOP/s", "of matmul rate", "samples/s vs open_clip"],
        [
            [name, f"{r['samples_per_s']:.2f}", f"{r['gflop_per_step']:.1f}", f"{r['gflop_per_s']:.1f}",
             f"{r['fraction_of_matmul_peak']:.1%}", f"{r['samples_per_s'] / ref:.2f}x"]
            for name, r in rows.items()
        ],
    )  # fmt: skip
    note = (
        f"{'Tiny models (--quick)' if args.quick else 'ViT-B/32'}, batch {args.batch}, {precision}"
        f"{', compiled' if args.compile else ''}, {args.steps} timed steps on synthetic inputs; matmul rate "
        f"{result['matmul_gflop_per_s']:.0f} GFLOP/s measured in this run. DeCLIP runs 2 image and 2 text views "
        "per sample, so about 2x CLIP's FLOPs per sample is expected; GFLOP/s and the matmul fraction compare the "
        "systems' efficiency.\n\n"
    )
    return note + body, result


# ---------------------------------------------------------------- optimisations


def _time(fn, reps: int, device: torch.device) -> float:
    fn()
    ts.sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    ts.sync(device)
    return (time.perf_counter() - t0) / reps


def mlm_head_pair(quick: bool, batch: int, device: torch.device) -> tuple[float, float, float]:
    """(seconds masked, seconds full-then-index, |loss difference|) of the MLM head forward + backward."""
    cfg = model_cfg(quick)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    tokens = ts.synthetic_tokens(batch, m.context_length, g)
    from declip.text.tokenizer import mask_tokens

    masked, labels = mask_tokens(tokens, g, cfg.loss.mlm_probability)
    mask = (labels != -100).to(device)
    labels = labels.to(device)
    head = torch.nn.Linear(m.text_width, m.vocab_size).to(device)
    states = torch.randn(batch, m.context_length, m.text_width, generator=g).to(device).requires_grad_()
    losses = {}

    def masked_step():
        loss = torch.nn.functional.cross_entropy(head(states[mask]), labels[mask])
        loss.backward()
        losses["masked"] = loss.detach()

    def full_step():
        loss = torch.nn.functional.cross_entropy(head(states)[mask], labels[mask])
        loss.backward()
        losses["full"] = loss.detach()

    reps = 3 if device.type == "cpu" else 20
    t_masked, t_full = _time(masked_step, reps, device), _time(full_step, reps, device)
    return t_masked, t_full, float((losses["masked"] - losses["full"]).abs())


def compile_pair(batch: int, steps: int, device: torch.device, precision: str) -> tuple[float, float, float]:
    """(first compiled step s, eager step s, compiled step s) of the tiny config (config/declip_tiny.yaml)."""
    cfg = load_config(ROOT / "config" / "declip_tiny.yaml")
    eager = ts.declip_step(cfg, batch, device, precision)
    t_eager = _time(eager, steps, device)
    compiled = ts.declip_step(cfg, batch, device, precision, compile=True)
    t0 = time.perf_counter()
    compiled()
    ts.sync(device)
    first = time.perf_counter() - t0
    return first, t_eager, _time(compiled, steps, device)


def section_optimisations(args, device: torch.device, precision: str, step_s: float) -> tuple[str, dict]:
    rows, out = [], {}
    t_masked, t_full, diff = mlm_head_pair(args.quick, args.batch, device)
    rows.append([
        "MLM head only at the chosen tokens (vs full head, then index)", f"{t_full * 1e3:.1f} ms",
        f"{t_masked * 1e3:.1f} ms", f"{t_full / t_masked:.1f}x", f"same loss (|diff| {diff:.1e}); in the model",
    ])  # fmt: skip
    flag = torch.zeros((), device=device)
    t_guard = _time(lambda: any_rank(~torch.isfinite(flag), device), 200, device)
    rows.append([
        "non-finite guard: one 1-element all-reduce + .item() per step", "-", f"{t_guard * 1e6:.0f} us",
        f"{t_guard / step_s:.3%} of the DeCLIP step", "kept per step (exact skip/rollback semantics)",
    ])  # fmt: skip
    out.update(mlm_masked_s=t_masked, mlm_full_s=t_full, guard_s=t_guard)
    if args.quick:
        rows.append(
            ["torch.compile, tiny config", "-", "-", "-", "not run in --quick (compiling takes ~1 min on a CPU)"]
        )
    else:
        first, t_eager, t_comp = compile_pair(args.batch, args.steps, device, precision)
        rows.append([
            f"torch.compile, tiny config, batch {args.batch}", f"{t_eager * 1e3:.0f} ms eager",
            f"{t_comp * 1e3:.0f} ms compiled", f"{t_eager / t_comp:.2f}x",
            f"first step (compiling) {first:.0f} s; "
            + (f"break-even after {first / (t_eager - t_comp):.0f} steps" if t_comp < t_eager else "never pays off"),
        ])  # fmt: skip
        out.update(compile_first_s=first, eager_s=t_eager, compiled_s=t_comp)
    return table(["change", "before", "after", "speed-up", "note"], rows), out


# ---------------------------------------------------------------- memory


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the bytes held by live tensor storages created by ops while active (CPU memory accounting).

    Every op's outputs are registered once per storage and released when the storage is freed. Not counted:
    storages created before entering, allocator caching and kernels' internal scratch. `phase()` returns the
    peak since the last call and starts a new phase at the current live bytes.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def phase(self) -> int:
        peak, self.peak = self.peak, self.live
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.sizes:
                    self.sizes[key] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def step_peak_bytes(cfg, batch: int, device: torch.device, precision: str) -> tuple[float, float]:
    """On a CPU: peak bytes of (forward + backward, optimizer step) over two training steps, the model, its
    optimizer state and the inputs included; the two phases peak at different times and scale differently
    with the batch (activations vs AdamW's temporaries). On an accelerator: (peak of one step, same)."""
    if device.type == "cpu":
        peaks = {"forward_backward": 0, "optimizer": 0}
        with LiveTensorBytes() as counter:
            step = ts.declip_step(cfg, batch, device, precision)
            counter.phase()

            def before(*_):
                peaks["forward_backward"] = max(peaks["forward_backward"], counter.phase())

            def after(*_):
                peaks["optimizer"] = max(peaks["optimizer"], counter.phase())

            hooks = [
                register_optimizer_step_pre_hook(before),
                register_optimizer_step_post_hook(after),
            ]
            try:
                step()
                step()
            finally:
                for h in hooks:
                    h.remove()
        return float(peaks["forward_backward"]), float(peaks["optimizer"])
    module = torch.get_device_module(device.type)
    step = ts.declip_step(cfg, batch, device, precision)
    step()  # optimizer state exists from here on
    ts.sync(device)
    module.reset_peak_memory_stats(device)
    step()
    ts.sync(device)
    peak = float(module.max_memory_allocated(device))
    return peak, peak


def section_memory(args, device: torch.device, precision: str) -> tuple[str, dict]:
    cfg = model_cfg(args.quick)
    name = "tiny models (--quick)" if args.quick else "DeCLIP ViT-B/32"
    if device.type == "cpu":
        # Large enough that activations, not the gradients' or AdamW's buffers, set the forward/backward peak
        b1, b2 = (2, 4) if args.quick else (8, 16)
        (f1, o1), (f2, o2) = step_peak_bytes(cfg, b1, device, precision), step_peak_bytes(cfg, b2, device, precision)
        per_sample, optimizer = (f2 - f1) / (b2 - b1), max(o1, o2)
        fixed = f1 - b1 * per_sample
        est = max(fixed + REF_BATCH * per_sample, optimizer)
        method = (
            f"CPU: peak live tensor bytes (all ops' outputs, counted by a dispatch mode) over two training steps, "
            f"{precision}, per phase. Forward + backward at batch {b1} / {b2}: {f1 / GIB:.2f} / {f2 / GIB:.2f} GiB, "
            f"a linear fit of {fixed / GIB:.2f} GiB fixed (weights, AdamW state, NN bank, grads) + "
            f"{per_sample / 2**20:.0f} MiB per sample (activations), evaluated at {REF_BATCH}; the optimizer step "
            f"peaks at {optimizer / GIB:.2f} GiB whatever the batch. Estimate = the larger. Allocator overhead is not "
            "included; bf16/fp16 autocast keeps most activations in 16 bits, so an AMP run needs less than this "
            "fp32 estimate."
        )
    else:
        est = step_peak_bytes(cfg, REF_BATCH, device, precision)[0]
        fixed = per_sample = float("nan")
        method = f"{device.type}: torch max_memory_allocated over one training step at batch {REF_BATCH}, {precision}."
    rows = [[name, f"{REF_BATCH}", f"{est / GIB:.1f} GiB"] + [
        "fits" if est <= HEADROOM * cap else "does NOT fit" for cap in DEVICE_MEMORY.values()
    ]]  # fmt: skip
    text = table(["model", "batch per device", "peak memory", *DEVICE_MEMORY], rows)
    text += f"\nMethod: {method} 'Fits' means at most {HEADROOM:.0%} of the device's memory.\n"
    return text, {"peak_bytes": est, "fixed_bytes": fixed, "per_sample_bytes": per_sample}


# ---------------------------------------------------------------- data


def section_data(args, device: torch.device) -> tuple[str, dict]:
    size = 64 if args.quick else 224
    samples, n_files = (8, 4) if args.quick else (48, 16)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(n_files):
            path = Path(tmp) / f"{i}.jpg"
            photo(*((500, 375) if i % 2 else (640, 427)), rng).save(path, "JPEG", quality=90)
            files.append(path)
        tv = baseline(size)

        def torchvision_two_views(path: Path) -> torch.Tensor:
            from PIL import Image

            img = Image.open(path).convert("RGB")
            return torch.stack([tv(img), tv(img)])

        ours, host = TwoViewTransform(size), TwoViewTransform(size, device_augment=True)
        g = torch.Generator().manual_seed(0)
        r_tv, r_ours, r_host = rates(
            [torchvision_two_views, lambda p: ours(p, g), lambda p: host(p, g)], files, samples, rounds=2
        )
        items = [host(files[i % n_files], torch.Generator().manual_seed(i)) for i in range(16)]
        images = torch.stack([a for a, _ in items]).to(device)
        params = torch.stack([b for _, b in items])
        if device.type == "cpu":  # samples per CPU-second, like the host rates
            device_augment.apply(images, params)
            t0 = time.process_time()
            for _ in range(2):
                device_augment.apply(images, params)
            r_dev = 2 * len(items) / (time.process_time() - t0)
        else:
            r_dev = len(items) / _time(lambda: device_augment.apply(images, params), 10, device)
        lines = 20_000 if args.quick else 200_000
        meta, root = make_world(Path(tmp) / "check", lines, files=500 if args.quick else 5000)
        lines_per_s = check_data(meta, root, Path(tmp) / "check" / "out", workers=1)["lines_per_s"]
    both = 1 / (1 / r_host + 1 / r_dev)
    where = "this CPU (1 thread)" if device.type == "cpu" else f"the {device.type} device"
    rows = [
        ["(a) plain torchvision (PIL decode, Compose per view)", f"{r_tv:.1f}", f"{TARGET_FPS / r_tv:.0f}"],
        ["(b) ours, all on the host (data.device_augment: false)", f"{r_ours:.1f}", f"{TARGET_FPS / r_ours:.0f}"],
        ["(c) ours, host part of data.device_augment: true", f"{r_host:.1f}", f"{TARGET_FPS / r_host:.0f}"],
        [f"device part of (c), batched on {where}", f"{r_dev:.1f}", "-"],
        ["(c) host + device part both on one CPU core (CPU-only run)", f"{both:.1f}", "-"],
    ]
    text = table(["two-view decode + augment, per core", "samples/s", f"host cores for {TARGET_FPS:,}/s"], rows)
    text += (
        f"\n{size} px views of {n_files} JPEGs (500x375 and 640x427, quality 90), per CPU-second of one thread, "
        f"best of 2 rounds x {samples}. check-data (stat mode): **{lines_per_s:,.0f} lines/s per core** "
        f"({lines:,} lines, 1 worker).\n"
    )
    out = {"torchvision": r_tv, "ours": r_ours, "host": r_host, "device_part": r_dev, "check_lines_per_s": lines_per_s}
    return text, out


# ---------------------------------------------------------------- scaling


def _count(fn, key: str, counts: dict):
    def wrapped(*a, **kw):
        tensors = a[0] if key == "all_gather" else [a[0]]  # all_gather(outputs, input), all_reduce(tensor)
        counts[key] += sum(t.numel() * t.element_size() for t in tensors)
        return fn(*a, **kw)

    return wrapped


def _scaling_worker(rank: int, world: int, batch: int, steps: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    counts = {"ddp": 0, "all_gather": 0, "all_reduce": 0}
    all_reduce = dist.all_reduce
    dist.all_gather = _count(dist.all_gather, "all_gather", counts)
    dist.all_reduce = _count(dist.all_reduce, "all_reduce", counts)  # the objective's calls, not DDP's
    from declip.objective import DeCLIPObjective
    from declip.train.optim import build_optimizer

    cfg = load_config(ROOT / "config" / "declip_tiny.yaml")
    model = build_model(cfg)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

        def hook(state, bucket):  # DDP's default all-reduce (average), counted
            buffer = bucket.buffer()
            counts["ddp"] += buffer.numel() * buffer.element_size()
            return all_reduce(buffer.div_(world), async_op=True).get_future().then(lambda f: f.value()[0])

        model.register_comm_hook(None, hook)
    objective = DeCLIPObjective(cfg.loss, cfg.model.embed_dim)
    opt = build_optimizer(model, cfg, "cpu")
    g = torch.Generator().manual_seed(rank)
    size, length = cfg.model.image_size, cfg.model.context_length
    images = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
    texts = [ts.synthetic_tokens(batch, length, g) for _ in range(2)]
    from declip.text.tokenizer import mask_tokens

    texts[0], labels = mask_tokens(texts[0], g)
    mask = labels != -100

    def step():
        objective(model(images, texts, mask), labels[mask])["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    for k in counts:
        counts[k] = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    if rank == 0:
        result = {"step_s": seconds, "trainable_bytes": trainable, "D": cfg.model.embed_dim,
                  **{k: v / steps for k, v in counts.items()}}  # fmt: skip
        Path(out_file).write_text(repr(result))
    if world > 1:
        dist.destroy_process_group()


def gathered_bytes(world: int, batch: int, dim: int) -> tuple[float, float]:
    """DeCLIP's feature traffic per step and rank: (all_gather output bytes, backward all_reduce bytes).

    Forward: I1, I2, Tm, Te and the two NN-text tensors are gathered (6 x W*B*D fp32); backward: the four with
    gradients all-reduce their (W*B, D) gradient."""
    one = world * batch * dim * 4
    return 6 * one, 4 * one


def section_scaling(args) -> tuple[str, dict]:
    import torch.multiprocessing as mp

    batch, steps = (4, 2) if args.quick else (args.batch, args.steps)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out_file = Path(tmp) / f"w{world}.txt"
            mp.spawn(
                _scaling_worker, args=(world, batch, steps, str(Path(tmp) / f"init{world}"), str(out_file)),
                nprocs=world, join=True,
            )  # fmt: skip
            results[world] = eval(out_file.read_text())  # our own repr of a dict of numbers
    rows = []
    for world, r in results.items():
        gather, reduce = gathered_bytes(world, batch, r["D"]) if world > 1 else (0, 0)
        ddp = r["trainable_bytes"] if world > 1 else 0
        rows.append([
            world, f"{r['step_s'] * 1e3:.0f} ms", f"{world * batch / r['step_s']:.1f}",
            f"{r['ddp'] / 2**20:.2f} MiB (formula {ddp / 2**20:.2f})",
            f"{r['all_gather'] / 2**10:.1f} KiB (formula {gather / 2**10:.1f})",
            f"{r['all_reduce'] / 2**10:.1f} KiB (formula {reduce / 2**10:.1f})",
        ])  # fmt: skip
    text = table(
        ["gloo processes", "step time", "global samples/s", "DDP gradient all-reduce", "feature all_gather",
         "gather backward all_reduce"], rows,
    )  # fmt: skip
    text += (
        f"\nTiny config (config/declip_tiny.yaml), {batch} per process, 1 thread per process, {steps} timed steps; "
        "bytes are the payload of each collective per step and rank, counted (DDP comm hook; wrapped "
        "torch.distributed.all_gather/all_reduce), next to the formula: DDP = trainable parameter bytes (fp32 "
        "grads), gathers = 6 x W*B*D*4, backward = 4 x W*B*D*4. Two processes share this machine's cores with "
        "everything else, so the step time shows overhead, not speed-up.\n"
    )
    return text, results


def section_comm_scale() -> tuple[str, dict]:
    with torch.device("meta"):
        model = build_model(config_from_dict({}))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ddp = params * 4
    rows, out = [], {}
    for world in WORLDS:
        gather, reduce = gathered_bytes(world, REF_BATCH, 512)
        # ring algorithms: all_gather moves (W-1)/W of its output through each rank, all_reduce 2(W-1)/W of its size
        wire = (world - 1) / world * (gather + 2 * reduce + 2 * ddp)
        rows.append([
            world, f"{world * REF_BATCH:,}", f"{gather / 2**20:.1f} MiB", f"{reduce / 2**20:.1f} MiB",
            f"{ddp / 2**20:.0f} MiB", f"{(gather + reduce) / (gather + reduce + ddp):.1%}", f"{wire / 2**20:.0f} MiB",
        ])  # fmt: skip
        out[world] = {"all_gather": gather, "gather_backward": reduce, "ddp": ddp, "wire": wire}
    text = table(
        ["devices", "global batch", "feature all_gather", "gather backward all_reduce", "DDP gradients (fp32)",
         "features share", "per-rank wire bytes (ring)"], rows,
    )  # fmt: skip
    text += (
        f"\nDeCLIP ViT-B/32, {REF_BATCH} per device, D = 512, {params / 1e6:.1f} M trainable parameters (patch "
        "embedding frozen, MLM head 512 x 49409 included). Per step and rank; 'features share' is the gathers' "
        "part of all payload bytes. The gradient all-reduce is constant in W, the gathered features grow linearly "
        "with W (the global batch).\n"
    )
    return text, out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI)")
    p.add_argument("--batch", type=int, default=8, help="per-device batch of the step benchmarks")
    p.add_argument("--steps", type=int, default=3, help="timed steps per system")
    p.add_argument("--device", choices=["npu", "cuda", "cpu"], help="default: detected")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "amp_fp16", "amp_bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the models in the step benchmark")
    p.add_argument("--out", type=Path, help="append the report to this Markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = min(args.batch, 4), 1
    device = torch.device(detect_device_type(args.device))
    if device.type != "cpu":
        torch.get_device_module(device.type).set_device(0)
        device = torch.device(device.type, 0)
    precision = resolve_precision(args.precision, device.type)

    started = time.perf_counter()
    parts, results = {}, {}
    parts["Training step"], results["step"] = section_step(args, device, precision)
    declip_s = next(r["step_s"] for r in results["step"]["rows"] if r["system"] == ts.DECLIP)
    parts["Step optimisations"], results["optimisations"] = section_optimisations(args, device, precision, declip_s)
    parts["Peak memory"], results["memory"] = section_memory(args, device, precision)
    with_one_thread = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core rates
    parts["Data pipeline"], results["data"] = section_data(args, device)
    torch.set_num_threads(with_one_thread)
    parts["Scaling"], results["scaling"] = section_scaling(args)
    parts["Communication at scale"], results["comm"] = section_comm_scale()

    command = "python " + " ".join(["benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])])
    report = (
        f"## run_all: {datetime.date.today().isoformat()}, {ts.device_name(device)}\n\n"
        f"Machine: {machine()}; torch {torch.__version__}. Command: `{command}` "
        f"({time.perf_counter() - started:.0f} s).\n\n" + "".join(f"### {name}\n\n{parts[name]}\n" for name in SECTIONS)
    )
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n" + report)
    return results


if __name__ == "__main__":
    main()
