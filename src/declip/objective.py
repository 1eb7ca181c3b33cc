"""The DeCLIP objective (reference §4): MVS, NNS, SimSiam and MLM on one device's share of a global batch.

Contrastive terms take this rank's rows against columns gathered from every rank, shape (B, W*B), labels
y = rank*B + arange(B). `gather_with_grad` sums the gradients of all ranks' losses w.r.t. this rank's rows, so
after DDP averages the parameter gradients, W processes train exactly like one process on the concatenated batch
(the loss of one process is the mean over ranks of the per-rank losses). SimSiam and MLM are per-device means,
as in the reference; MLM equals the global mean when every rank masks the same number of tokens.

Precision: the objective runs in fp32 with autocast off. Its matmuls are (B, D) x (D, W*B) and (2B, D) x (D, K),
negligible next to the towers, while bf16 rounds logits near the maximum scale of 100 to steps of 0.5.

Nearest-neighbour bank (NNS). Each rank keeps its own FIFO of K = loss.nn_bank_size L2-normalised text
embeddings in fp32 buffers: `nn_bank` (K, D), `nn_bank_ptr` (next slot to write) and `nn_bank_filled` (slots
holding real embeddings; the filled slots are always the prefix [0, filled) until the bank is full). This module
is not wrapped in DDP, so DDP's buffer broadcast never overwrites a rank's bank; the trainer checkpoints
`state_dict()` per rank. Per step: look up the top-1 cosine neighbour of Tm and of Te over the filled slots of
the unchanged bank (one fp32 matmul on the features' device, then argmax), then enqueue Te, then Tm.

What the bank holds at step 0: nothing. The reference fills it with random unit vectors and queries that noise
for its first K / (2B) steps; here it starts as zeros with `nn_bank_filled` = 0, look-ups only ever consider
filled slots, and while the bank is empty (the very first step) the NNS term is exactly 0, still connected to the
graph. From the second step on, neighbours come from real embeddings only. The decision is a multiplication by
(filled > 0), not a Python branch: no host sync, and every rank runs the same collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from declip.config import LossConfig


def _world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        rank, world = _world(group)
        ctx.group, ctx.rows = group, slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's loss reads this rank's rows: sum those gradients. all_reduce, not reduce_scatter, because
        # gloo has no reduce_scatter; the gradient is only (W*B, D).
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rows], None


def gather_with_grad(x: Tensor, group=None) -> Tensor:
    """All-gather `x` (B, ...) into (W*B, ...) in rank order; the backward returns this rank's slice of the sum
    of the gradients over ranks. Without a process group, or with one rank, returns `x` itself."""
    if _world(group)[1] == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def _labels(x: Tensor, rank: int) -> Tensor:
    return torch.arange(rank * x.shape[0], (rank + 1) * x.shape[0], device=x.device)


def pair_loss(img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, scale: Tensor, rank: int) -> Tensor:
    """Symmetric CLIP loss 1/2 [CE(s img txt_all^T, y) + CE(s txt img_all^T, y)].

    Expects L2-normalised features (it does not normalise): `img`, `txt` (B, D) local rows; `img_all`, `txt_all`
    (W*B, D) gathered, with this rank's rows at rank*B.
    """
    y = _labels(img, rank)
    return 0.5 * (F.cross_entropy(scale * img @ txt_all.T, y) + F.cross_entropy(scale * txt @ img_all.T, y))


def nns_loss(img: Tensor, nn_all: Tensor, scale: Tensor, rank: int) -> Tensor:
    """Image-to-neighbour CE(s img nn_all^T, y) on L2-normalised `img` (B, D) and gathered neighbours (W*B, D)."""
    return F.cross_entropy(scale * img @ nn_all.T, _labels(img, rank))


def simsiam_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """-1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))], mean over the local batch; no gradient reaches z."""
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1) + F.cosine_similarity(p2, z1.detach(), dim=-1)).mean()


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of `logits` (N, V) at the chosen positions against `labels` (N,).

    With no chosen position (N = 0) the loss is 0 but stays connected to the head's graph, so DDP sees a
    gradient (zero) for every head parameter instead of an unused one.
    """
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)


class DeCLIPObjective(nn.Module):
    """Weighted DeCLIP loss; owns the per-rank NN bank. Terms with weight 0 are neither computed nor reported."""

    def __init__(self, loss_cfg: LossConfig, embed_dim: int):
        super().__init__()
        self.image_views, self.text_views = loss_cfg.image_views, loss_cfg.text_views
        weights = {
            "mvs": loss_cfg.mvs_weight,
            "nns": loss_cfg.nns_weight,
            "simsiam": loss_cfg.simsiam_weight,
            "mlm": loss_cfg.mlm_weight,
        }
        self.weights = {name: w for name, w in weights.items() if w > 0}
        if "nns" in self.weights:
            self.register_buffer("nn_bank", torch.zeros(loss_cfg.nn_bank_size, embed_dim))
            self.register_buffer("nn_bank_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("nn_bank_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, queries: Tensor) -> Tensor:
        """Top-1 cosine neighbours (re-normalised) of L2-normalised `queries` (N, D) among the filled slots.
        Rows are zero vectors while the bank is empty."""
        sims = queries.to(self.nn_bank.dtype) @ self.nn_bank.T
        filled = torch.arange(self.nn_bank.shape[0], device=sims.device) < self.nn_bank_filled
        sims = sims.masked_fill(~filled, float("-inf"))
        return F.normalize(self.nn_bank[sims.argmax(dim=1)], dim=-1)

    @torch.no_grad()
    def enqueue(self, x: Tensor) -> None:
        """Write the rows of `x` (N, D), L2-normalised, into the FIFO in order, wrapping around."""
        k, n = self.nn_bank.shape[0], x.shape[0]
        x = F.normalize(x.detach().to(self.nn_bank.dtype), dim=-1)[-k:]  # with N > K only the last K rows survive
        slots = (self.nn_bank_ptr + (n - x.shape[0]) + torch.arange(x.shape[0], device=x.device)) % k
        self.nn_bank.index_copy_(0, slots, x)
        self.nn_bank_ptr.copy_((self.nn_bank_ptr + n) % k)
        self.nn_bank_filled.copy_((self.nn_bank_filled + n).clamp(max=k))

    def _nns(self, imgs: list[Tensor], txts: list[Tensor], scale: Tensor, rank: int, group) -> Tensor:
        if self.nn_bank.device != imgs[0].device:  # never let a forgotten .to() cost a copy every step
            self.to(imgs[0].device)
        has_bank = (self.nn_bank_filled > 0).to(scale.dtype)
        # Both look-ups see the same, unchanged bank, so Tm's and Te's queries share one matmul.
        neighbours = self.nearest(torch.cat(txts)).split(txts[0].shape[0])
        nn_all = [gather_with_grad(n, group) for n in neighbours]
        loss = torch.stack([nns_loss(i, n, scale, rank) for i in imgs for n in nn_all]).mean()
        self.enqueue(torch.cat(txts[::-1]))  # Te, then Tm
        return loss * has_bank

    def forward(self, outputs: dict, mlm_labels: Tensor | None = None, group=None) -> dict[str, Tensor]:
        """`outputs` as returned by `DeCLIP.forward`; `mlm_labels` (N,) the original ids at the masked positions.

        Returns `loss` (weighted sum), each active term unweighted (`mvs`, `nns`, `simsiam`, `mlm`), `i2t_top1`
        (percent of this rank's view-0 images whose top-1 among the global text-view-0 columns is their own
        caption) and, with NNS, `nn_bank_fill` (filled fraction of the bank after this step).
        """
        device = outputs["image_features"][0].device
        with torch.autocast(device.type, enabled=False):
            return self._losses(outputs, mlm_labels, group)

    def _losses(self, outputs: dict, mlm_labels: Tensor | None, group) -> dict[str, Tensor]:
        rank = _world(group)[0]
        imgs = [F.normalize(x.float(), dim=-1) for x in outputs["image_features"]]
        txts = [F.normalize(t.float(), dim=-1) for t in outputs["text_features"]]
        if len(imgs) != self.image_views or len(txts) != self.text_views:
            raise ValueError(
                f"model outputs have {len(imgs)} image and {len(txts)} text views, but loss.image_views="
                f"{self.image_views} and loss.text_views={self.text_views}"
            )
        scale = outputs["logit_scale"].float()
        terms: dict[str, Tensor] = {}
        if "mvs" in self.weights:
            img_all = [gather_with_grad(i, group) for i in imgs]
            txt_all = [gather_with_grad(t, group) for t in txts]
            pairs = [
                pair_loss(i, t, ia, ta, scale, rank)
                for i, ia in zip(imgs, img_all, strict=True)
                for t, ta in zip(txts, txt_all, strict=True)
            ]
            terms["mvs"] = torch.stack(pairs).mean()
            txt0_all = txt_all[0].detach()
        else:
            txt0_all = gather_with_grad(txts[0].detach(), group)
        if "nns" in self.weights:
            terms["nns"] = self._nns(imgs, [t.detach() for t in txts], scale, rank, group)
        if "simsiam" in self.weights:
            if "simsiam" not in outputs:
                raise ValueError("loss.simsiam_weight > 0 but the model outputs have no 'simsiam' (no SimSiam head)")
            (p1, z1), (p2, z2) = outputs["simsiam"]
            terms["simsiam"] = simsiam_loss(p1.float(), z1.float(), p2.float(), z2.float())
        if "mlm" in self.weights:
            if "mlm_logits" not in outputs or mlm_labels is None:
                raise ValueError(
                    "loss.mlm_weight > 0 needs outputs['mlm_logits'] (model built with MLM) and mlm_labels"
                )
            terms["mlm"] = mlm_loss(outputs["mlm_logits"].float(), mlm_labels)
        out = {"loss": sum(self.weights[name] * value for name, value in terms.items()), **terms}
        with torch.no_grad():
            hits = (imgs[0] @ txt0_all.T).argmax(dim=1) == _labels(imgs[0], rank)
            out["i2t_top1"] = hits.float().mean() * 100
            if "nns" in self.weights:
                out["nn_bank_fill"] = self.nn_bank_filled.float() / self.nn_bank.shape[0]
        return out
