"""Training and zero-shot datasets.

`TrainDataset[(index, draw)]` is a pure function of (seed, index, draw): the image views,
the MLM mask and the EDA caption draw from generators seeded by (seed, draw), so a resumed
run sees exactly the samples it would have seen and workers need no RNG state.

A sample that cannot be used (bad JSON line, empty caption, missing or corrupt image) is
replaced, like the reference does, but deterministically: attempt k loads the index
`replacement_index(seed, index, draw, k)`; the item is flagged `replaced = 1` so the
trainer can count them, and the first failures of each process are logged with file:line.
"""

from __future__ import annotations

import logging
import random
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from declip.config import RunConfig
from declip.data.check import ImagePaths
from declip.data.manifest import ManifestIndex, parse_json_object, parse_train_record, read_val_meta
from declip.data.transforms import TwoViewTransform, eval_transform
from declip.errors import InputError
from declip.text.tokenizer import Tokenizer, mask_tokens, resolve_bpe_path

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16  # with 2% bad samples, 16 failures in a row happen with probability 1e-27
LOGGED_FAILURES = 10  # per process; the rest are only counted
_REPLACE_TAG = 0x5EED  # separates the replacement stream from the augmentation streams

# What a bad image or line raises: PIL's UnidentifiedImageError and truncation are OSErrors,
# JSON and record errors are ValueErrors, some broken files raise the others.
LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class SampleError(ValueError):
    """A training sample's image cannot be used; the message names file:line and the image."""


def sample_seeds(seed: int, draw: int) -> tuple[int, int, int]:
    """Independent 64-bit seeds (image, mask, EDA) of the sample at stream position `draw`."""
    a, b, c = np.random.SeedSequence([seed, draw]).generate_state(3, dtype=np.uint64)
    return int(a), int(b), int(c)


def replacement_index(seed: int, index: int, draw: int, attempt: int, n: int) -> int:
    """The index tried at `attempt` (>= 1) for a failed sample."""
    (state,) = np.random.SeedSequence([_REPLACE_TAG, seed, index, draw, attempt]).generate_state(1, dtype=np.uint64)
    return int(state % np.uint64(n))


class TrainDataset(torch.utils.data.Dataset):
    """`dataset[(index, draw)] -> dict` of tensors; see `collate` for the batch keys."""

    def __init__(self, cfg: RunConfig, meta: Path, root: Path, seed: int):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        try:
            self.index = ManifestIndex(meta)
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
        if len(self.index) == 0:
            raise InputError(f"training manifest {meta} has no records")
        self.meta = Path(meta)
        self.root = Path(root)
        self.paths = ImagePaths(self.root)
        self.seed = seed
        self.transform = TwoViewTransform(
            cfg.model.image_size, cfg.data.fast_decode, cfg.loss.image_views, cfg.data.device_augment
        )
        self.tokenizer = Tokenizer(resolve_bpe_path(cfg.data), cfg.model.context_length)
        self.mlm_probability = cfg.loss.mlm_probability if cfg.loss.mlm_weight > 0 else None
        self.text_views = cfg.loss.text_views
        self.eda = None
        if cfg.loss.text_views == 2 and cfg.data.eda:
            from declip.text.eda import EDA

            self.eda = EDA(cfg.data.nltk_dir)
        self.failures = 0  # in this process

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, draw = (int(k) for k in key)
        i, errors = index, []
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                i = replacement_index(self.seed, index, draw, attempt, len(self.index))
            try:
                item = self._load(i, draw)
            except LOAD_ERRORS as e:
                self._failed(i, e, errors)
                continue
            item["replaced"] = torch.tensor(int(attempt > 0))
            item["index"] = torch.tensor(index)
            return item
        raise InputError(
            f"{self.meta}: no loadable sample for index {index} (draw {draw}) after {MAX_ATTEMPTS} attempts; "
            f"failures: {'; '.join(errors)}"
        )

    def _failed(self, i: int, e: BaseException, errors: list[str]) -> None:
        where = self.index.where(i)
        reason = str(e) if str(e).startswith(where) else f"{where}: {type(e).__name__}: {e}"
        errors.append(reason)
        self.failures += 1
        if self.failures <= LOGGED_FAILURES:
            log.warning("bad sample replaced: %s%s", reason, "" if self.failures < LOGGED_FAILURES else " (no more)")

    def _load(self, i: int, draw: int) -> dict[str, torch.Tensor]:
        where = self.index.where(i)
        caption, filename = parse_train_record(parse_json_object(self.index.line(i), where), where)
        image_seed, mask_seed, eda_seed = sample_seeds(self.seed, draw)
        path = self.paths.check(filename)
        if isinstance(path, tuple):
            raise SampleError(f"{where}: {path[1]}")
        try:
            images = self.transform(path, torch.Generator().manual_seed(image_seed))
        except LOAD_ERRORS as e:
            raise SampleError(f"{where}: image {path}: {type(e).__name__}: {e}") from e
        item = {}
        if isinstance(images, tuple):  # data.device_augment: uint8 views + colour parameters
            images, item["aug_params"] = images
        captions = [caption]
        if self.text_views == 2:
            captions.append(self.eda(caption, random.Random(eda_seed)) if self.eda is not None else caption)
        tokens = self.tokenizer(captions)
        item.update(images=images, text=tokens[0])
        if self.mlm_probability is not None:
            masked, labels = mask_tokens(
                tokens[0], torch.Generator().manual_seed(mask_seed), probability=self.mlm_probability
            )
            item["text"], item["mlm_labels"] = masked, labels
        if self.text_views == 2:
            item["text_eda"] = tokens[1]
        return item


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items: images (B, V, 3, H, W), text/mlm_labels/text_eda (B, L), replaced/index (B,);
    with data.device_augment images are uint8 and aug_params (B, V, COLOR_PARAMS) float32 comes along."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class ValDataset(torch.utils.data.Dataset):
    """`dataset[i] -> (image (3, S, S), label)`; an unreadable image is an error, never skipped."""

    def __init__(self, meta: Path, root: Path, image_size: int):
        self.meta = Path(meta)
        self.root = Path(root)
        try:
            self.items = read_val_meta(self.meta)
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        filename, label = self.items[i]
        path = self.root / filename
        try:
            return self.transform(path), label
        except LOAD_ERRORS as e:
            raise InputError(f"{self.meta}: val image {path} (record {i}) cannot be read: {e}") from e
