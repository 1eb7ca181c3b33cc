"""Two gloo ranks must train exactly like one process on the concatenated batch (catches a wrong gather)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from ports import free_port
from torch import nn

from declip.config import LossConfig
from declip.objective import DeCLIPObjective, gather_with_grad, simsiam_loss

W, B, D, IN, V, N_MLM, K = 2, 3, 4, 5, 11, 2, 8
BANK_FILLED = 6  # the step starts with a partly filled bank and wraps around while enqueueing


class Tiny(nn.Module):
    """Linear stand-ins for the towers and heads, producing DeCLIP.forward's output contract."""

    def __init__(self):
        super().__init__()
        self.img, self.txt, self.mlm = nn.Linear(IN, D), nn.Linear(IN, D), nn.Linear(IN, V)
        self.proj, self.pred = nn.Linear(D, D), nn.Linear(D, D)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, batch: dict) -> dict:
        imgs = [self.img(x) for x in batch["images"]]
        return {
            "image_features": imgs,
            "text_features": [self.txt(t) for t in batch["texts"]],
            "simsiam": [(self.pred(self.proj(i)), self.proj(i)) for i in imgs],
            "mlm_logits": self.mlm(batch["mlm_in"]),
            "logit_scale": self.log_scale.exp(),
        }


def local(batch: dict, rank: int) -> dict:
    rows, masked = slice(rank * B, (rank + 1) * B), slice(rank * N_MLM, (rank + 1) * N_MLM)
    return {
        "images": [x[rows] for x in batch["images"]],
        "texts": [t[rows] for t in batch["texts"]],
        "mlm_in": batch["mlm_in"][masked],
        "mlm_labels": batch["mlm_labels"][masked],
    }


def objective_with_bank(bank: torch.Tensor) -> DeCLIPObjective:
    objective = DeCLIPObjective(LossConfig(nn_bank_size=K), D)
    objective.load_state_dict(
        {"nn_bank": bank, "nn_bank_ptr": torch.tensor(BANK_FILLED), "nn_bank_filled": torch.tensor(BANK_FILLED)}
    )
    return objective


def step(model: Tiny, objective: DeCLIPObjective, batch: dict) -> dict:
    out = objective(model(batch), batch["mlm_labels"])
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}


def _worker(rank: int, port: int, payload: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        model = Tiny()
        model.load_state_dict(payload["model"])
        objective = objective_with_bank(payload["bank"])
        out = step(model, objective, local(payload["batch"], rank))
        grads = {}
        for name, p in model.named_parameters():  # what DDP does: average the gradients over ranks
            dist.all_reduce(p.grad)
            grads[name] = p.grad / W
        # gather_with_grad on its own: rank-specific upstream gradients, summed over ranks in the backward
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = gather_with_grad(x)
        (gathered * torch.arange(12.0).view(4, 3) * (rank + 1)).sum().backward()
        result = {"out": out, "grads": grads, "bank": objective.state_dict(), "gathered": gathered.detach()}
        torch.save({**result, "x_grad": x.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Tiny()
    batch = {
        "images": [torch.randn(W * B, IN, generator=g) for _ in range(2)],
        "texts": [torch.randn(W * B, IN, generator=g) for _ in range(2)],
        "mlm_in": torch.randn(W * N_MLM, IN, generator=g),
        "mlm_labels": torch.randint(0, V, (W * N_MLM,), generator=g),
    }
    bank = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    bank[BANK_FILLED:] = 0
    payload = {"model": model.state_dict(), "batch": batch, "bank": bank}
    mp.spawn(_worker, args=(free_port(), payload, str(tmp_path)), nprocs=W, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W)]

    one = step(model, objective_with_bank(bank), batch)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for key in ("loss", "mvs", "nns", "mlm", "simsiam", "i2t_top1"):
        torch.testing.assert_close(sum(r["out"][key] for r in ranks) / W, one[key], **tol, msg=key)
    assert one["nns"] > 0
    for name, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, **tol, msg=name)

    weights = torch.arange(12.0).view(4, 3)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["gathered"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
        torch.testing.assert_close(r["x_grad"], 3 * weights[2 * rank : 2 * rank + 2])  # (1 + 2) * this rank's rows

        with torch.no_grad():
            mine = model(local(batch, rank))
        (p1, z1), (p2, z2) = mine["simsiam"]
        torch.testing.assert_close(r["out"]["simsiam"], simsiam_loss(p1, z1, p2, z2), **tol)

        # this rank's Te then Tm, and nobody else's, written from slot BANK_FILLED on with wrap-around
        expected = bank.clone()
        tm, te = (F.normalize(t, dim=-1) for t in mine["text_features"])
        for j, row in enumerate(torch.cat([te, tm])):
            expected[(BANK_FILLED + j) % K] = row
        torch.testing.assert_close(r["bank"]["nn_bank"], expected, **tol)
        assert r["bank"]["nn_bank_ptr"].item() == (BANK_FILLED + 2 * B) % K
        assert r["bank"]["nn_bank_filled"].item() == K
