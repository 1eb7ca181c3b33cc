"""Zero-shot evaluation: exact top-1/top-5 counts through the real scoring path, sharding, `declip eval`."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from ports import free_port
from safetensors.torch import save_file
from torch import nn

from declip.config import config_from_dict
from declip.errors import InputError
from declip.evaluate import (
    load_weights,
    prompt_templates,
    run_eval,
    shard_indices,
    topk_correct,
    zero_shot_eval,
)
from declip.model import build_model
from declip.text.tokenizer import VOCAB_SIZE, Tokenizer

torch.set_num_threads(1)

# Single BPE tokens that occur in none of the 80 templates ("black", "white" do).
CLASSES = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown"]
# One RGB colour per class: the corners of a cube, far apart under any resize and normalisation.
COLOURS = [(r, g, b) for r in (40, 215) for g in (40, 215) for b in (40, 215)]
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
RANK_WEIGHTS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # image of colour c is closest to class c, then c+1, ...


class HandSetModel(nn.Module):
    """Towers set by hand so every logit is known in closed form.

    Text: each token id has a fixed embedding; a class name's token is 5 * e_c in the first C
    dimensions, every other token a random vector in the remaining dimensions (the same for all
    classes, since the prompts differ only in the class name). So the classifier column of class c is
    a * e_c + n with one a and one n for all classes. Image: the nearest class colour c of the image's
    mean colour gives sum_k RANK_WEIGHTS[k] e_{c+k}; its logit against class c + k is a' RANK_WEIGHTS[k]
    (0 beyond k = 5), so the ranking of classes is c, c+1, ..., c+5, then ties.
    """

    def __init__(self, class_ids: list[int], dim: int = 24):
        super().__init__()
        C = len(class_ids)
        g = torch.Generator().manual_seed(0)
        table = torch.zeros(VOCAB_SIZE, dim)
        table[:, C:] = torch.randn(VOCAB_SIZE, dim - C, generator=g)
        table[0] = 0  # padding
        table[class_ids] = 0
        table[class_ids, torch.arange(C)] = 5.0
        self.token_embedding = nn.Embedding.from_pretrained(table)
        image_table = torch.zeros(C, dim)
        for c in range(C):
            for k, w in enumerate(RANK_WEIGHTS):
                image_table[c, (c + k) % C] = w
        self.register_buffer("image_table", image_table)
        self.register_buffer("colours", (torch.tensor(COLOURS[:C], dtype=torch.float32) / 255 - MEAN) / STD)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens).sum(dim=1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        nearest = torch.cdist(images.mean(dim=(2, 3)), self.colours).argmin(dim=1)
        return self.image_table[nearest]


def make_val(root, shifts: list[int], classes: int = 8) -> None:
    """Image i has label i % classes and the colour of class (label + shifts[i]) % classes."""
    (root / "val").mkdir(parents=True)
    lines = []
    for i, shift in enumerate(shifts):
        label = i % classes
        name = f"ILSVRC2012_val_{i + 1:08d}.png"
        Image.new("RGB", (40, 40), COLOURS[(label + shift) % classes]).save(root / "val" / name)
        lines.append(json.dumps({"filename": name, "label": label, "label_name": CLASSES[label]}))
    (root / "val.json").write_text("\n".join(lines) + "\n")


def eval_cfg(root, templates: str = "prompt80", batch_size: int = 3):
    return config_from_dict({
        "name": "eval_test",
        "model": {"embed_dim": 16, "image_size": 32, "patch_size": 16, "vision_width": 32, "vision_layers": 1,
                  "vision_heads": 2, "context_length": 16, "text_width": 32, "text_layers": 1, "text_heads": 2},
        "loss": {"image_views": 1, "text_views": 1, "nns_weight": 0, "simsiam_weight": 0, "mlm_weight": 0,
                 "mvs_weight": 1},
        "data": {"dataset_dir": str(root), "val_meta": "val.json", "val_root": "val", "workers": 0},
        "train": {"precision": "fp32"},
        "eval": {"templates": templates, "batch_size": batch_size, "class_names": "meta"},
        "tracking": {"enabled": False},
    })  # fmt: skip


def hand_model(classes: int = 8) -> HandSetModel:
    tok = Tokenizer(None, 16)
    ids = [tok.encode(c) for c in CLASSES[:classes]]
    assert all(len(i) == 1 for i in ids)
    template_ids = {i for t in prompt_templates("prompt80") for i in tok.encode(t(""))}
    assert not template_ids & {i[0] for i in ids}
    return HandSetModel([i[0] for i in ids])


def expected(shifts: list[int], classes: int = 8) -> tuple[int, int]:
    """(top-1 hits, top-5 hits): the ranking of an image shifted by s puts its label at place (-s) mod C."""
    places = [(-s) % classes for s in shifts]
    return sum(p == 0 for p in places), sum(p < 5 for p in places)


def test_hand_set_model_scores_every_image_right(tmp_path):
    make_val(tmp_path, [0] * 8)
    model = hand_model().train()
    out = zero_shot_eval(model, eval_cfg(tmp_path), "cpu", step=11, progress=False)
    assert out["top1"] == 100.0 and out["top5"] == 100.0
    assert (out["images"], out["classes"], out["templates"], out["step"]) == (8, 8, 80, 11)
    assert out["images_per_s"] > 0 and out["wall_time_s"] > 0
    assert model.training, "eval must restore train mode"


@pytest.mark.parametrize("templates", ["simple", "prompt80"])
def test_known_shifts_give_exact_top1_and_top5(tmp_path, templates):
    shifts = [0, 0, 1, 2, 0, 5, 7, 4, 0, 3, 6]  # label places (-shift) mod 8: 0 0 7 6 0 3 1 4 0 5 2
    make_val(tmp_path, shifts + [0] * 5)  # 16 images: every label occurs
    n1, n5 = expected(shifts + [0] * 5)
    assert (n1, n5) == (9, 13)
    out = zero_shot_eval(hand_model(), eval_cfg(tmp_path, templates, batch_size=5), "cpu", progress=False)
    assert out["top1"] == 100.0 * n1 / 16 and out["top5"] == 100.0 * n5 / 16 and out["images"] == 16
    assert out["templates"] == (80 if templates == "prompt80" else 1)


def test_shard_indices_cover_every_index_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 8):
            shards = [list(shard_indices(n, r, world)) for r in range(world)]
            flat = sorted(i for s in shards for i in s)
            assert flat == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_topk_correct_counts_and_caps_k_at_class_count():
    logits = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.1, 0.2, 0.3]])
    assert topk_correct(logits, torch.tensor([0, 0, 1]), ks=(1, 2)).tolist() == [1, 3]
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 5)).tolist() == [0, 3]  # 5 > 3 classes: all in


SHARD_SHIFTS = [0, 6, 1, 0, 5, 3, 0]  # 7 images of 7 classes: rank 0 scores 4 of them, rank 1 scores 3


def _shard_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = zero_shot_eval(hand_model(7), eval_cfg(Path(root), "simple", batch_size=2), "cpu", progress=False)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_eval_of_an_odd_val_set_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_val(tmp_path, SHARD_SHIFTS, classes=7)
    single = zero_shot_eval(hand_model(7), eval_cfg(tmp_path, "simple", batch_size=2), "cpu", progress=False)
    n1, n5 = expected(SHARD_SHIFTS, classes=7)
    assert (n1, n5) == (3, 6)
    assert single["images"] == 7 and single["top1"] == 100.0 * n1 / 7 and single["top5"] == 100.0 * n5 / 7
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_shard_worker, args=(2, free_port(), str(tmp_path), str(out_dir)), nprocs=2, join=True)
    keys = ("top1", "top5", "images", "classes", "templates")
    for rank in range(2):
        shard = json.loads((out_dir / f"rank{rank}.json").read_text())
        assert {k: shard[k] for k in keys} == {k: single[k] for k in keys}


def test_load_weights_reads_pt_and_safetensors(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save({"model": sd, "step": 3}, tmp_path / "c.pt")
    save_file(sd, str(tmp_path / "c.safetensors"))
    for name in ("c.pt", "c.safetensors"):
        got = load_weights(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(InputError, match="not found"):
        load_weights(tmp_path / "missing.pt")


def test_run_eval_writes_eval_json_and_logs_to_the_run_folder(tmp_path):
    make_val(tmp_path, [0] * 8)
    cfg = eval_cfg(tmp_path, "simple", batch_size=4)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "step": 7}, tmp_path / "ckpt.pt")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = run_eval(cfg, tmp_path / "ckpt.pt", tmp_path / "eval" / "eval.json", device="cpu", run_dir=run_dir)
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    direct = zero_shot_eval(model, cfg, "cpu", step=7, progress=False)
    assert written["step"] == 7 and written["images"] == 8
    assert written["top1"] == direct["top1"] == result["top1"] and written["top5"] == direct["top5"]
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row == {"step": 7, "zeroshot_top1": written["top1"], "zeroshot_top5": written["top5"]}

    # final weights carry no step: it comes from the run's train_summary.json
    save_file(model.state_dict(), str(run_dir / "model.safetensors"))
    (run_dir / "train_summary.json").write_text(json.dumps({"steps": 400}))
    result = run_eval(cfg, run_dir / "model.safetensors", run_dir / "eval.json", device="cpu", run_dir=run_dir)
    assert result["step"] == 400 and result["top1"] == direct["top1"]


def test_run_eval_rejects_a_checkpoint_of_another_model(tmp_path):
    make_val(tmp_path, [0] * 8)
    cfg = eval_cfg(tmp_path, "simple")
    other = config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "vision_layers": 2}})
    torch.save({"model": build_model(other).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"other\.pt.*12 unexpected.*visual\.transformer\.resblocks\.1\."):
        run_eval(cfg, tmp_path / "other.pt", tmp_path / "eval.json", device="cpu")
    assert not (tmp_path / "eval.json").exists()
