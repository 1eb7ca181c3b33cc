"""Numerics: an infinite loss under each guard policy, and a logit scale driven out of range.

NaN under each policy is covered by tests/test_train.py (DECLIP_INJECT_NONFINITE_AT makes the loss NaN);
here the objective's loss becomes +inf at a chosen step (the objective's forward is wrapped in-process).
"""

from __future__ import annotations

import json

import pytest
import torch
from faults import TINY, overrides

from declip.config import load_config
from declip.model import unwrap_model
from declip.objective import DeCLIPObjective
from declip.train.checkpoint import load_checkpoint
from declip.train.distributed import init_distributed
from declip.train.loop import NonFiniteLossError, Trainer, _batch_to_device, train
from declip.train.optim import lr_at

pytestmark = pytest.mark.reliability


@pytest.fixture
def inf_at(monkeypatch):
    """`inf_at(n)`: the n-th objective forward of this process (training step n) returns loss = +inf."""

    def arm(step: int) -> None:
        forward, calls = DeCLIPObjective.forward, [0]

        def infinite_once(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            calls[0] += 1
            return {**out, "loss": out["loss"] + float("inf")} if calls[0] == step else out

        monkeypatch.setattr(DeCLIPObjective, "forward", infinite_once)

    return arm


def metric_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_inf_loss_skip(demo, tmp_path, inf_at):
    inf_at(3)
    cfg = load_config(TINY, overrides(demo, "train.max_steps=4", "checkpoint.every_steps=100",
                                      "train.nonfinite_policy=skip"))  # fmt: skip
    summary = train(cfg, tmp_path / "run", device="cpu")
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # step 3 made no update
    assert torch.isfinite(state["objective"][0]["nn_bank"]).all()
    assert metric_steps(tmp_path / "run") == [1, 2, 4]


def test_inf_loss_rollback(demo, tmp_path, inf_at):
    inf_at(3)
    cfg = load_config(TINY, overrides(demo, "train.max_steps=4", "checkpoint.every_steps=2",
                                      "train.nonfinite_policy=rollback", "train.rollback_lr_factor=0.5"))  # fmt: skip
    summary = train(cfg, tmp_path / "run", device="cpu")
    assert summary["steps"] == 4 and summary["lr_scale"] == 0.5
    assert "non-finite loss at step 3" in (tmp_path / "run" / "train.log").read_text()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}  # 1-2, then 3-4 again
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["lr"] == pytest.approx(lr_at(4, cfg) * 0.5)


def test_inf_loss_stop(demo, tmp_path, inf_at):
    inf_at(2)
    cfg = load_config(TINY, overrides(demo, "train.max_steps=3", "train.nonfinite_policy=stop"))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 2 .*stopping"):
        train(cfg, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "train_summary.json").exists()


def test_logit_scale_driven_out_of_range_stays_clamped(demo, tmp_path):
    cfg = load_config(TINY, overrides(demo, "train.max_steps=2"))
    lo, hi = cfg.loss.logit_scale_clamp
    trainer = Trainer(cfg, tmp_path / "run", init_distributed("cpu"))
    try:
        batches, param = trainer.batches(), unwrap_model(trainer.model).logit_scale
        for step, value in ((1, 50.0), (2, -5.0)):
            with torch.no_grad():
                param.fill_(value)
            losses = trainer.train_step(step, _batch_to_device(next(batches), trainer.env.device))
            assert losses is not None and torch.isfinite(losses["loss"])  # exp(50) is capped in the forward
            assert lo <= param.item() <= hi, (value, param.item())
            # clamped to the bound before the step, moved at most about one LR by AdamW, clamped again
            assert param.item() == pytest.approx(hi if value > hi else lo, abs=1e-3)
    finally:
        for handler in trainer.log.handlers:
            handler.close()
