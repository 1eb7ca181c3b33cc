"""`train(cfg, out_dir, device)`: the DeCLIP training loop (perf and full modes), its guards and summary.

One step: fetch a batch (the data time), forward all views through the model (DDP-wrapped when there
are several ranks), the objective (not wrapped: each rank keeps its own NN bank), the non-finite guard,
backward, optional clipping, logit-scale clamp, AdamW step, clamp again. The LR follows `lr_at(step)`
times `lr_scale` (lowered by each rollback).

`train.batch_size` is per device: the global batch is world size x batch_size, and `samples_seen`
counts global samples.

Host syncs: one per step, the non-finite guard, a 1-element all-reduce (MAX) of "is the loss finite"
plus its `.item()`, so every rank takes the same branch. It costs one small collective and one drain
of the launch queue per step (tens of microseconds to a millisecond, against steps of hundreds of
ms at the reference size); the step time measured on the host is honest because of it. Metrics are
reduced only every `train.log_every` steps (one all-reduce of a packed vector). Measured cost of the guard
and the alternatives considered: docs/performance.md ("Step optimisations", "Findings").

With `data.device_augment` the batch arrives as uint8 views plus colour parameters; the views are copied
(non-blocking, from pinned memory) and augmented batched on the device, inside the data time.

Metrics (metrics.jsonl, MLflow): `loss` (weighted total), each active term (`mvs`, `nns`, `simsiam`,
`mlm`), `i2t_top1`, `nn_bank_fill` (NNS only): means over ranks at the logged step; `lr`,
`logit_scale` (the effective scale exp(param)), `fps` (global samples/s since the last log),
`data_time` (mean seconds per step waiting for data), `replaced_samples` (total over ranks since the
run began), and `zeroshot_top1`/`zeroshot_top5` at evaluations.

Non-finite loss (`train.nonfinite_policy`): `skip` drops the step (no backward, no update; the data
is consumed), `rollback` reloads `checkpoints/latest.pt`, multiplies `lr_scale` by
`train.rollback_lr_factor` and goes on (with no checkpoint yet it stops), `stop` raises
NonFiniteLossError. Test hook: DECLIP_INJECT_NONFINITE_AT=N makes the loss of step N NaN, once per
process (tests only; a rollback past step N does not re-inject).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from declip.config import RunConfig, flatten, save_config
from declip.data import device_augment
from declip.errors import InputError
from declip.model import build_model, unwrap_model
from declip.objective import DeCLIPObjective
from declip.tracking import Tracker, versions
from declip.train import checkpoint as ckpt
from declip.train.distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank,
    barrier,
    cleanup,
    gather_to_main,
    init_distributed,
)
from declip.train.optim import build_optimizer, clamp_logit_scale, clip_gradients, lr_at, set_lr
from declip.train.sampler import IterationSampler

INJECT_ENV = "DECLIP_INJECT_NONFINITE_AT"
MAX_ROLLBACKS = 5  # in a row without reaching a new checkpoint: past this the run is diverging, not unlucky
LOSS_TERMS = ("loss", "mvs", "nns", "simsiam", "mlm")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and the policy says stop (or a rollback is impossible)."""


@dataclass
class TrainState:
    """What a resume needs besides model, objective, optimizer and RNG (stored in the checkpoint)."""

    step: int = 0
    samples_seen: int = 0
    lr_scale: float = 1.0
    replaced: int = 0
    skipped: int = 0
    rollbacks: int = 0
    wall_time_s: float = 0.0
    last_eval: dict = field(default_factory=dict)


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto` -> amp_bf16 on NPU/CUDA when the device supports bf16, else amp_fp16 there; fp32 on CPU."""
    if precision != "auto":
        return precision
    if device_type == "cpu":
        return "fp32"
    module = torch.get_device_module(device_type)
    supported = getattr(module, "is_bf16_supported", lambda: True)()
    return "amp_bf16" if supported else "amp_fp16"


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any work when a dataset file is missing (the message names the path and key)."""
    keys = ["train_meta", "train_root"]
    if cfg.train.mode == "full" and cfg.train.eval_every > 0:
        keys += ["val_meta", "val_root"]
    for key in keys:
        path = cfg.data.path(key)
        if not path.exists():
            raise InputError(f"data.{key}: {path} does not exist (data.dataset_dir = {cfg.data.dataset_dir})")


def target_steps(cfg: RunConfig) -> int:
    return cfg.train.perf_steps if cfg.train.mode == "perf" else cfg.train.max_steps


def finished_summary(out_dir: Path, cfg: RunConfig) -> dict | None:
    """The summary of a run in `out_dir` that already reached this config's target, else None."""
    path = Path(out_dir) / "train_summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done = summary.get("mode") == cfg.train.mode and summary.get("steps", 0) >= target_steps(cfg)
    return summary if done else None


def train(cfg: RunConfig, out_dir: Path, device: str | None = None) -> dict:
    """Train (or resume, or return the summary of a finished run in `out_dir`); returns the summary."""
    check_inputs(cfg)
    owns_group = not dist.is_initialized()
    env = init_distributed(device, cfg.train.dist_timeout_s)
    try:
        if (summary := finished_summary(out_dir, cfg)) is not None:
            return {**summary, "rank": env.rank}
        return Trainer(cfg, Path(out_dir), env).run()
    finally:
        if owns_group:
            cleanup()


def _logger(out_dir: Path, enabled: bool) -> logging.Logger:
    log = logging.getLogger(f"declip.train.{out_dir.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if enabled:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        for h in (logging.FileHandler(out_dir / "train.log"), logging.StreamHandler(sys.stdout)):
            h.setFormatter(fmt)
            log.addHandler(h)
    return log


def _batch_to_device(batch: dict, device: torch.device) -> dict:
    """Copy the batch to the device; with data.device_augment the uint8 views are augmented there (the
    colour parameters stay on the host, which plans the batched ops without a sync)."""
    params = batch.pop("aug_params", None)
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if params is not None:
        out["images"] = device_augment.apply(out["images"], params)
    return out


def _inject_at() -> int | None:
    value = os.environ.get(INJECT_ENV)
    return int(value) if value else None


class Trainer:
    """Builds everything for one run, resumes it when RUN_DIR has a checkpoint, trains, summarises."""

    def __init__(self, cfg: RunConfig, out_dir: Path, env: DistEnv):
        self.started = time.perf_counter()
        self.cfg, self.out, self.env = cfg, out_dir, env
        self.total = target_steps(cfg)
        self.global_batch = cfg.train.batch_size * env.world_size
        self.precision = resolve_precision(cfg.train.precision, env.device_type)
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out_dir / "config.yaml")
            ckpt.clean_tmp_files(out_dir)
        barrier()
        self.log = _logger(out_dir, env.is_main)
        self.tracker = Tracker(out_dir, cfg.tracking, cfg.name, enabled=env.is_main)
        self.model = build_model(cfg).to(env.device)
        self.objective = DeCLIPObjective(cfg.loss, cfg.model.embed_dim).to(env.device)
        self.optimizer = build_optimizer(self.model, cfg, env.device_type)
        self.scaler = torch.amp.GradScaler(env.device_type, enabled=self.precision == "amp_fp16")
        self.state = TrainState()
        # Training draws no numbers from the global generators (per-sample seeds do that); seeding them
        # anyway makes fresh runs' checkpoints identical, RNG entries included.
        random.seed(cfg.train.seed + env.rank)
        np.random.seed(cfg.train.seed + env.rank)
        self.inject_at = _inject_at()
        self.replaced_acc = torch.zeros((), dtype=torch.long, device=env.device)
        self.last_metrics: dict[str, float] = {}
        if (path := ckpt.find_resume(out_dir)) is not None:
            self.restore(path)
            self.log.info(f"resumed from {path} at step {self.state.step} ({self.state.samples_seen} samples seen)")
        if env.world_size > 1:
            # SimSiam's BatchNorm statistics are per device (reference): no buffer broadcast.
            self.model = DistributedDataParallel(
                self.model, device_ids=None if env.device_type == "cpu" else [env.device.index],
                broadcast_buffers=False, find_unused_parameters=False,
            )  # fmt: skip
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.dataset = self._dataset()

    # ------------------------------------------------------------ data

    def _dataset(self):
        from declip.data.datasets import TrainDataset

        cfg = self.cfg
        if cfg.data.eda and cfg.loss.text_views == 2:
            from declip.text.nltk_setup import use_nltk_dir

            # Workers inherit NLTK_DATA whether they are forked or spawned.
            os.environ["NLTK_DATA"] = str(use_nltk_dir(cfg.data.nltk_dir))
        return TrainDataset(cfg, cfg.data.path("train_meta"), cfg.data.path("train_root"), cfg.train.seed)

    def batches(self):
        """An iterator of batches from `samples_seen` on (a new one after each rollback)."""
        from declip.data.datasets import collate

        sampler = IterationSampler(
            len(self.dataset), self.cfg.train.batch_size, self.env.rank, self.env.world_size,
            seed=self.cfg.train.seed, start=self.state.samples_seen,
        )  # fmt: skip
        workers = self.cfg.data.workers
        loader = DataLoader(
            self.dataset, batch_size=self.cfg.train.batch_size, sampler=sampler, num_workers=workers,
            collate_fn=collate, pin_memory=self.env.device_type != "cpu", persistent_workers=workers > 0,
        )  # fmt: skip
        return iter(loader)

    # ------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write `latest.pt` (and a kept snapshot when due). Every rank takes part: banks and RNG are gathered."""
        self._flush_replaced()
        objectives = gather_to_main(ckpt.to_cpu(self.objective.state_dict()))
        rngs = gather_to_main(ckpt.rng_state(self.env.device_type))
        if self.env.is_main:
            step, keep = self.state.step, self.cfg.checkpoint.keep_every_steps
            state = {
                "model": ckpt.to_cpu(unwrap_model(self.model).state_dict()),
                "objective": objectives,
                "optimizer": ckpt.to_cpu(self.optimizer.state_dict()),
                "scaler": self.scaler.state_dict(),
                "step": step,
                "samples_seen": self.state.samples_seen,
                "lr_scale": self.state.lr_scale,
                "rng": rngs,
                "config": self.cfg.to_dict(),
                "mlflow_run_id": self.tracker.run_id,
                "train_state": asdict(self.state),
            }
            ckpt.save_torch(state, ckpt.checkpoint_dir(self.out) / ckpt.LATEST)
            if keep and step % keep == 0:
                ckpt.keep_snapshot(self.out, step)
        self.state.rollbacks = 0
        barrier()

    def restore(self, path: Path) -> None:
        """Load a checkpoint into this rank: shared weights and optimizer, this rank's bank and RNG."""
        state = ckpt.load_checkpoint(path)
        r = self.env.rank
        if len(state["objective"]) != self.env.world_size and self.env.is_main:
            self.log.warning(
                f"{path} was written by {len(state['objective'])} ranks, resuming on {self.env.world_size}: "
                "NN banks and RNG states are reused round-robin, the resume is not exact"
            )
        unwrap_model(self.model).load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"][r % len(state["objective"])])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rollbacks = self.state.rollbacks
        for key, value in state["train_state"].items():  # in place: the loop holds a reference to self.state
            setattr(self.state, key, value)
        self.state.rollbacks = rollbacks
        ckpt.set_rng_state(state["rng"][r % len(state["rng"])], self.env.device_type)

    # ------------------------------------------------------------ one step

    def _forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"]
        views = [images[:, v] for v in range(images.shape[1])]
        texts = [batch["text"]] + ([batch["text_eda"]] if "text_eda" in batch else [])
        mlm_mask = mlm_labels = None
        if "mlm_labels" in batch:
            mlm_mask = batch["mlm_labels"] != -100
            mlm_labels = batch["mlm_labels"][mlm_mask]
        amp = self.precision != "fp32"
        dtype = torch.bfloat16 if self.precision == "amp_bf16" else torch.float16
        with torch.autocast(self.env.device_type, dtype=dtype, enabled=amp):
            outputs = self.model(views, texts, mlm_mask)
        return self.objective(outputs, mlm_labels)

    def train_step(self, step: int, batch: dict) -> dict[str, torch.Tensor] | None:
        """One optimizer step; None when the loss was non-finite (skipped or rolled back)."""
        set_lr(self.optimizer, lr_at(step, self.cfg) * self.state.lr_scale)
        losses = self._forward(batch)
        loss = losses["loss"]
        if step == self.inject_at:
            self.inject_at = None
            loss = loss * float("nan")
        if any_rank(~torch.isfinite(loss.detach()), self.env.device):  # the one host sync per step
            self.nonfinite(step)
            return None
        self.scaler.scale(loss).backward()
        model = unwrap_model(self.model)
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(model, self.cfg.optim.grad_clip)
        clamp_logit_scale(model, self.cfg.loss.logit_scale_clamp)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        clamp_logit_scale(model, self.cfg.loss.logit_scale_clamp)
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def nonfinite(self, step: int) -> None:
        policy = self.cfg.train.nonfinite_policy
        where = f"non-finite loss at step {step} (train.nonfinite_policy={policy})"
        self.optimizer.zero_grad(set_to_none=True)
        if policy == "stop":
            raise NonFiniteLossError(f"{where}: stopping; the last checkpoint is in {ckpt.checkpoint_dir(self.out)}")
        if policy == "skip":
            self.state.skipped += 1
            if hasattr(self.objective, "nn_bank"):  # the bad step may have enqueued non-finite embeddings
                bank = self.objective.nn_bank
                bank[~torch.isfinite(bank).all(dim=1)] = 0
            self.log.warning(f"{where}: step skipped ({self.state.skipped} so far)")
            return
        path = ckpt.find_resume(self.out)
        if path is None:
            raise NonFiniteLossError(f"{where}: no checkpoint yet to roll back to; stopping")
        if self.state.rollbacks >= MAX_ROLLBACKS:
            raise NonFiniteLossError(f"{where}: {MAX_ROLLBACKS} rollbacks without progress; stopping")
        lr_scale, rollbacks = self.state.lr_scale * self.cfg.train.rollback_lr_factor, self.state.rollbacks + 1
        self.state.rollbacks = rollbacks
        self.restore(path)
        self.state.lr_scale, self.state.rollbacks = lr_scale, rollbacks
        self.replaced_acc.zero_()
        self.log.warning(f"{where}: rolled back to step {self.state.step}, lr_scale now {lr_scale:g}")

    # ------------------------------------------------------------ logging and evaluation

    def _flush_replaced(self) -> None:
        self.state.replaced += int(all_reduce_sum(self.replaced_acc.clone()).item())
        self.replaced_acc.zero_()

    def log_step(self, losses: dict[str, torch.Tensor], step_times: list[float], data_times: list[float]) -> None:
        """Reduce and record the metrics of the current step (every rank calls this)."""
        keys = [k for k in (*LOSS_TERMS, "i2t_top1", "nn_bank_fill") if k in losses]
        packed = torch.stack([losses[k].detach().float() for k in keys])
        values = (all_reduce_sum(packed) / self.env.world_size).tolist()
        self._flush_replaced()
        metrics = dict(zip(keys, values, strict=True))
        metrics.update(
            lr=self.optimizer.param_groups[0]["lr"],
            logit_scale=math.exp(unwrap_model(self.model).logit_scale.item()),
            fps=self.global_batch * len(step_times) / max(sum(step_times), 1e-9),
            data_time=sum(data_times) / max(len(data_times), 1),
            replaced_samples=self.state.replaced,
        )
        self.last_metrics = metrics
        if not self.env.is_main:
            return
        self.tracker.log_metrics(metrics, self.state.step)
        eta = (self.total - self.state.step) * sum(step_times) / max(len(step_times), 1)
        terms = " ".join(f"{k} {metrics[k]:.4f}" for k in keys)
        self.log.info(
            f"step {self.state.step}/{self.total} {terms} lr {metrics['lr']:.3e} "
            f"scale {metrics['logit_scale']:.2f} fps {metrics['fps']:.1f} data {metrics['data_time'] * 1e3:.1f}ms "
            f"eta {eta / 60:.1f}min"
        )

    def evaluate(self) -> None:
        from declip.evaluate import zero_shot_eval

        result = zero_shot_eval(self.model, self.cfg, self.env.device, step=self.state.step, progress=self.env.is_main)
        self.state.last_eval = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        if self.env.is_main:
            metrics = {"zeroshot_top1": result["top1"], "zeroshot_top5": result["top5"]}
            self.tracker.log_metrics(metrics, self.state.step)
            self.log.info(f"step {self.state.step} zero-shot top1 {result['top1']:.2f} top5 {result['top5']:.2f}")

    # ------------------------------------------------------------ the run

    def _due(self, step: int, every: int) -> bool:
        return every > 0 and (step % every == 0 or step == self.total)

    def run(self) -> dict:
        cfg, state = self.cfg, self.state
        full = cfg.train.mode == "full"
        if self.env.is_main:
            self.log.info(
                f"{cfg.name}: {cfg.train.mode} to step {self.total} on {self.env.world_size} x {self.env.device_type} "
                f"({cfg.train.batch_size} per device, global batch {self.global_batch}), {self.precision}"
            )
            self.tracker.log_params(
                {**flatten(cfg.to_dict()), "device_type": self.env.device_type, "devices": self.env.world_size,
                 **{f"version.{k}": v for k, v in versions().items()}}
            )  # fmt: skip
        self.model.train()
        started = self.started  # the wall time includes building the model and data
        timings: list[tuple[float, float]] = []  # (step time, data time) of this process's steps
        window = 0  # timings since the last log
        status = "FAILED"
        try:
            batches = self.batches()
            while state.step < self.total:
                t0 = time.perf_counter()
                batch = _batch_to_device(next(batches), self.env.device)
                data_time = time.perf_counter() - t0
                rollbacks = state.rollbacks
                losses = self.train_step(state.step + 1, batch)
                if state.rollbacks > rollbacks:  # restored an older state: a new data stream from there
                    batches, window = self.batches(), 0
                    timings.clear()  # FPS counts from the restart: worker start-up is not step time
                    continue
                state.step += 1
                state.samples_seen += self.global_batch
                self.replaced_acc += batch["replaced"].sum()
                if not full and self.env.device_type != "cpu":
                    torch.accelerator.synchronize()  # perf mode times each step exactly
                timings.append((time.perf_counter() - t0, data_time))
                window += 1
                if losses is not None and self._due(state.step, cfg.train.log_every):
                    self.log_step(losses, [t for t, _ in timings[-window:]], [d for _, d in timings[-window:]])
                    window = 0
                if full and self._due(state.step, cfg.train.eval_every):
                    self.evaluate()
                if state.step == self.total or (full and self._due(state.step, cfg.checkpoint.every_steps)):
                    state.wall_time_s += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save()
            summary = self.finish(timings)
            status = "FINISHED"
            return summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if status != "FINISHED":
                self.tracker.finish(status)
            for handler in list(self.log.handlers):
                handler.close()
                self.log.removeHandler(handler)

    def finish(self, timings: list[tuple[float, float]]) -> dict:
        cfg, state = self.cfg, self.state
        measured = timings[cfg.train.perf_warmup_steps :] or timings
        step_time = sum(t for t, _ in measured) / max(len(measured), 1)
        summary = {
            "name": cfg.name,
            "mode": cfg.train.mode,
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "devices": self.env.world_size,
            "device_type": self.env.device_type,
            "per_device_batch": cfg.train.batch_size,
            "global_batch": self.global_batch,
            "precision": self.precision,
            "fps": self.global_batch / step_time if step_time > 0 else 0.0,
            "step_time_s": step_time,
            "data_time_fraction": sum(d for _, d in measured) / max(sum(t for t, _ in measured), 1e-9),
            "measured_steps": len(measured),
            "final_losses": {k: v for k, v in self.last_metrics.items() if k in LOSS_TERMS},
            "final_metrics": self.last_metrics,
            "wall_time_s": state.wall_time_s,
            "replaced_samples": state.replaced,
            "skipped_steps": state.skipped,
            "lr_scale": state.lr_scale,
            "zeroshot": state.last_eval,
            "versions": versions(),
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_synced": self.tracker.synced,
            "rank": 0,
        }
        if self.env.is_main:
            ckpt.export_weights(
                unwrap_model(self.model).state_dict(), {"model": asdict(cfg.model), "loss": asdict(cfg.loss)}, self.out
            )
            text = json.dumps(summary, indent=2) + "\n"
            ckpt.atomic_write(self.out / "train_summary.json", lambda f: f.write(text.encode()))
            self.log.info(
                f"done: {state.step} steps, {summary['fps']:.1f} samples/s, data {summary['data_time_fraction']:.1%} "
                f"of step time, {state.replaced} replaced samples -> {self.out}"
            )
            for name in ("config.yaml", "train_summary.json", "train.log"):
                self.tracker.log_artifact(self.out / name)
            self.tracker.finish("FINISHED")
        barrier()
        return {**summary, "rank": self.env.rank}
