"""The DeCLIP objective against hand-computed values and brute-force references (single process)."""

import math

import pytest
import torch
import torch.nn.functional as F

from declip.config import LossConfig
from declip.objective import DeCLIPObjective, gather_with_grad, mlm_loss, pair_loss, simsiam_loss


def ce(row: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def loop_pair_loss(img, txt, img_all, txt_all, scale: float, rank: int) -> float:
    """CLIP loss with explicit loops over rows and columns."""
    b = len(img)
    i2t = [ce([scale * dot(img[r], col) for col in txt_all], rank * b + r) for r in range(b)]
    t2i = [ce([scale * dot(txt[r], col) for col in img_all], rank * b + r) for r in range(b)]
    return 0.5 * (sum(i2t) / b + sum(t2i) / b)


def outputs(imgs, txts, scale=10.0, **extra):
    return {"image_features": imgs, "text_features": txts, "logit_scale": torch.tensor(scale), **extra}


def cfg(**weights) -> LossConfig:
    base = {"mvs_weight": 0.0, "nns_weight": 0.0, "simsiam_weight": 0.0, "mlm_weight": 0.0}
    return LossConfig(**{**base, **weights})


def test_pair_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # s=10: image rows [10, 6], [0, 8]; text rows [10, 0], [6, 8]; CE(row, y) = log(1 + e^-(margin)).
    i2t = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-8))) / 2
    t2i = (math.log(1 + math.exp(-10)) + math.log(1 + math.exp(-2))) / 2
    loss = pair_loss(img, txt, img, txt, torch.tensor(10.0), rank=0)
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)


def test_pair_loss_matches_loops_for_rank_one():
    g = torch.Generator().manual_seed(0)
    img_all = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt_all = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    img, txt = img_all[3:], txt_all[3:]  # rank 1 of 2, B = 3
    loss = pair_loss(img, txt, img_all, txt_all, torch.tensor(7.0), rank=1)
    expected = loop_pair_loss(img.tolist(), txt.tolist(), img_all.tolist(), txt_all.tolist(), 7.0, rank=1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_mvs_two_by_two_is_mean_of_four_pair_losses():
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randn(4, 8, generator=g) for _ in range(2)]
    txts = [torch.randn(4, 8, generator=g) for _ in range(2)]
    out = DeCLIPObjective(cfg(mvs_weight=1.0), 8)(outputs(imgs, txts))
    n = [F.normalize(x, dim=-1) for x in imgs + txts]
    s = torch.tensor(10.0)
    pairs = [pair_loss(n[i], n[t], n[i], n[t], s, 0) for i in (0, 1) for t in (2, 3)]
    assert out["mvs"].item() == pytest.approx(sum(p.item() for p in pairs) / 4, rel=1e-6)
    assert set(out) == {"loss", "mvs", "i2t_top1"}


def test_clip_mode_is_pair_loss():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss_cfg = cfg(mvs_weight=1.0)
    loss_cfg.image_views = loss_cfg.text_views = 1
    out = DeCLIPObjective(loss_cfg, 8)(outputs([img], [txt], scale=20.0))
    ni, nt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    expected = loop_pair_loss(ni.tolist(), nt.tolist(), ni.tolist(), nt.tolist(), 20.0, 0)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_view_count_mismatch_names_the_keys():
    with pytest.raises(ValueError, match="loss.text_views=2"):
        DeCLIPObjective(cfg(mvs_weight=1.0), 2)(outputs([torch.randn(2, 2)] * 2, [torch.randn(2, 2)]))


def test_i2t_top1_counts_own_caption_hits():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # rows 2 and 3 point at each other's caption
    out = DeCLIPObjective(cfg(mvs_weight=1.0), 4)(outputs([img, img], [txt, txt]))
    assert out["i2t_top1"].item() == pytest.approx(50.0)
    assert not out["i2t_top1"].requires_grad


def test_simsiam_hand_computed_and_stop_gradient():
    p1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0], [2.0, 2.0]], requires_grad=True)
    p2 = torch.tensor([[0.0, 2.0], [3.0, 4.0]], requires_grad=True)
    z1 = torch.tensor([[3.0, 0.0], [1.0, 0.0]], requires_grad=True)
    # cos(p1, z2) = [1/sqrt2, 1]; cos(p2, z1) = [0, 3/5]
    expected = -0.5 * ((1 / math.sqrt(2) + 0.0) / 2 + (1.0 + 0.6) / 2)
    loss = simsiam_loss(p1, z1, p2, z2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_mlm_loss_matches_cross_entropy_and_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert mlm_loss(logits, torch.tensor([1])).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    assert mlm_loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_mlm_without_chosen_positions_is_zero_and_connected():
    head = torch.nn.Linear(4, 9)
    loss = mlm_loss(head(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() == 0


def test_weighted_total_and_disabled_terms():
    g = torch.Generator().manual_seed(4)
    imgs = [torch.randn(3, 6, generator=g, requires_grad=True) for _ in range(2)]
    txts = [torch.randn(3, 6, generator=g) for _ in range(2)]
    sims = [(torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)) for _ in range(2)]
    mlm = {"mlm_logits": torch.randn(4, 10, generator=g)}
    labels = torch.tensor([1, 2, 3, 4])
    objective = DeCLIPObjective(LossConfig(nn_bank_size=16), 6)
    objective.enqueue(torch.randn(9, 6, generator=g))  # a non-empty bank, so NNS is not 0
    out = objective(outputs(imgs, txts, simsiam=sims, **mlm), labels)
    assert out["nns"].item() > 0
    total = 0.4 * out["mvs"] + 0.2 * out["nns"] + 0.2 * out["simsiam"] + 0.2 * out["mlm"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert out["simsiam"].item() == pytest.approx(simsiam_loss(*sims[0], *sims[1]).item(), rel=1e-6)
    assert out["mlm"].item() == pytest.approx(F.cross_entropy(mlm["mlm_logits"], labels).item(), rel=1e-6)

    only = DeCLIPObjective(cfg(mvs_weight=0.4, mlm_weight=0.2), 6)
    out2 = only(outputs(imgs, txts, **mlm), labels)
    assert set(out2) == {"loss", "mvs", "mlm", "i2t_top1"}
    assert "nn_bank" not in only.state_dict()
    assert out2["loss"].item() == pytest.approx(0.4 * out["mvs"].item() + 0.2 * out["mlm"].item(), rel=1e-6)


def brute_force_lookup(slots: list, queries: list[list[float]]) -> list[int]:
    """Index of the top-1 cosine neighbour among the filled slots, computed in float64 Python."""
    picks = []
    for q in queries:
        scores = [(dot(q, s), i) for i, s in enumerate(slots) if s is not None]
        picks.append(max(scores)[1])
    return picks


def unit_rows(x: torch.Tensor) -> list[list[float]]:
    return F.normalize(x, dim=-1).tolist()


def test_nn_bank_fifo_wraparound_and_lookup_match_brute_force():
    k, b, d = 7, 3, 4
    g = torch.Generator().manual_seed(5)
    objective = DeCLIPObjective(cfg(nns_weight=1.0, nn_bank_size=k), d)
    slots: list = [None] * k
    ptr = 0
    for step in range(8):  # 48 embeddings through a 7-slot bank: wraps around many times, at varying offsets
        imgs = [torch.randn(b, d, generator=g, requires_grad=True) for _ in range(2)]
        tm, te = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
        s = 5.0
        out = objective(outputs(imgs, [tm, te], scale=s))
        if step == 0:
            assert out["nns"].item() == 0.0 and out["nns"].requires_grad
        else:
            picks = brute_force_lookup(slots, unit_rows(tm) + unit_rows(te))
            neighbours = [slots[i] for i in picks]
            expected = 0.0
            for img in imgs:
                for t in range(2):
                    cols = neighbours[t * b : (t + 1) * b]
                    rows = [[s * dot(r, col) for col in cols] for r in unit_rows(img)]
                    expected += sum(ce(row, i) for i, row in enumerate(rows)) / b / 4
            assert out["nns"].item() == pytest.approx(expected, rel=1e-5)
        for row in unit_rows(te) + unit_rows(tm):  # Te enqueued before Tm
            slots[ptr] = row
            ptr = (ptr + 1) % k
        filled = sum(s is not None for s in slots)
        assert objective.nn_bank_ptr.item() == ptr and objective.nn_bank_filled.item() == filled
        assert out["nn_bank_fill"].item() == pytest.approx(filled / k)
        expected_bank = torch.tensor([s if s is not None else [0.0] * d for s in slots])
        torch.testing.assert_close(objective.nn_bank, expected_bank, rtol=0, atol=1e-6)


def test_lookup_ignores_unfilled_slots():
    objective = DeCLIPObjective(cfg(nns_weight=1.0, nn_bank_size=5), 2)
    objective.enqueue(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    # Every filled slot scores below 0, the cosine of an empty (zero) slot: only a masked look-up picks them.
    queries = torch.tensor([[-1.0, 0.0], [-0.6, -0.8]])
    torch.testing.assert_close(objective.nearest(queries), torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    assert objective.nn_bank_filled.item() == 2


def test_nns_with_one_text_view_enqueues_only_tm():
    loss_cfg = cfg(nns_weight=1.0, nn_bank_size=8)
    loss_cfg.text_views = 1
    objective = DeCLIPObjective(loss_cfg, 3)
    tm = torch.randn(3, 3)
    objective(outputs([torch.randn(3, 3), torch.randn(3, 3)], [tm]))
    assert objective.nn_bank_filled.item() == 3 and objective.nn_bank_ptr.item() == 3
    torch.testing.assert_close(objective.nn_bank[:3], F.normalize(tm, dim=-1))
    assert objective.nn_bank[3:].abs().sum() == 0


def test_enqueue_more_rows_than_slots_keeps_the_last_k_in_fifo_position():
    objective = DeCLIPObjective(cfg(nns_weight=1.0, nn_bank_size=3), 1)
    objective.enqueue(torch.tensor([[1.0]]))
    objective.enqueue(torch.tensor([[2.0], [3.0], [-4.0], [5.0], [-6.0]]))  # 6 rows into 3 slots: ptr 1 -> 0
    # the stream 1, 2, 3, -4, 5, -6 written at slots 0,1,2,0,1,2 leaves [-4, 5, -6], normalised to signs
    torch.testing.assert_close(objective.nn_bank, torch.tensor([[-1.0], [1.0], [-1.0]]))
    assert objective.nn_bank_ptr.item() == 0 and objective.nn_bank_filled.item() == 3


def test_bank_is_checkpointed_in_state_dict():
    objective = DeCLIPObjective(cfg(nns_weight=1.0, nn_bank_size=4), 2)
    objective.enqueue(torch.tensor([[3.0, 4.0]]))
    restored = DeCLIPObjective(cfg(nns_weight=1.0, nn_bank_size=4), 2)
    restored.load_state_dict(objective.state_dict())
    assert restored.nn_bank_ptr.item() == 1 and restored.nn_bank_filled.item() == 1
    torch.testing.assert_close(restored.nn_bank[0], torch.tensor([0.6, 0.8]))
