import itertools

import torch

from declip.train.sampler import IterationSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_passes_are_seeded_permutations():
    s = IterationSampler(10, batch_size=5, seed=3)
    keys = take(s, 30)
    assert [d for _, d in keys] == list(range(30))  # draw = global position
    for q in range(3):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 + q)).tolist()
        assert [i for i, _ in keys[10 * q : 10 * (q + 1)]] == expected
    assert take(IterationSampler(10, batch_size=5, seed=3), 30) == keys  # deterministic


def test_rank_slices_are_disjoint_and_cover_each_global_batch():
    n, b, w = 13, 3, 4
    single = take(IterationSampler(n, batch_size=b * w, seed=7), 5 * b * w)
    per_rank = [take(IterationSampler(n, b, rank=r, world_size=w, seed=7), 5 * b) for r in range(w)]
    for step in range(5):
        global_batch = [k for r in range(w) for k in per_rank[r][step * b : (step + 1) * b]]
        assert global_batch == single[step * b * w : (step + 1) * b * w]
        draws = [d for _, d in global_batch]
        assert sorted(draws) == list(range(step * b * w, (step + 1) * b * w))  # disjoint and covering


def test_resume_from_samples_seen_equals_the_continuation():
    n, b, w = 11, 2, 3
    for r in range(w):
        full = take(IterationSampler(n, b, rank=r, world_size=w, seed=1), 8 * b)
        resumed = take(IterationSampler(n, b, rank=r, world_size=w, seed=1, start=5 * b * w), 3 * b)
        assert resumed == full[5 * b :]
