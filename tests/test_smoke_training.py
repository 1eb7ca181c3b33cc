"""The tiny DeCLIP learns: a few dozen CPU steps on a fixed random batch drive the total loss down.

Model, objective, MLM masking and the trainer's optimizer and logit-scale clamp, without the data
pipeline (random pixels and random caption tokens), as a new user's first sanity check would do.
"""

import torch

from declip.config import load_config
from declip.model import build_model
from declip.objective import DeCLIPObjective
from declip.text.tokenizer import EOT_ID, SOT_ID, mask_tokens
from declip.train.optim import build_optimizer, clamp_logit_scale


def random_batch(cfg, batch: int, g: torch.Generator) -> dict:
    size, length = cfg.model.image_size, cfg.model.context_length
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in tokens:
        n = int(torch.randint(4, length - 2, (1,), generator=g))
        row[0], row[1 : n + 1], row[n + 1] = SOT_ID, torch.randint(1, 49406, (n,), generator=g), EOT_ID
    masked, labels = mask_tokens(tokens, g)
    return {
        "images": [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)],
        "texts": [masked, tokens],
        "labels": labels,
    }


def test_tiny_declip_loss_goes_down_on_cpu():
    torch.manual_seed(0)
    cfg = load_config(
        "config/declip_tiny.yaml",
        ["model.vision_layers=2", "model.text_layers=2", "loss.nn_bank_size=64", "optim.lr=5e-4"],
    )
    model, objective = build_model(cfg), DeCLIPObjective(cfg.loss, cfg.model.embed_dim)
    optimizer = build_optimizer(model, cfg, "cpu")
    batch = random_batch(cfg, 16, torch.Generator().manual_seed(0))
    mask = batch["labels"] != -100
    losses = []
    for _ in range(40):
        out = model(batch["images"], batch["texts"], mask)
        loss = objective(out, batch["labels"][mask])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clamp_logit_scale(model, cfg.loss.logit_scale_clamp)
        optimizer.step()
        clamp_logit_scale(model, cfg.loss.logit_scale_clamp)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[1:4]) / 3, sum(losses[-3:]) / 3  # step 1 has no NNS term (empty bank)
    assert last < 0.6 * first, (first, last)
