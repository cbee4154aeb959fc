"""k-NN and linear probe on hand-built features, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from dino_cluster.evaluate.knn import TopK, knn_classify, merge_parts, vote
from dino_cluster.evaluate.linear import train_linear


def naive_knn(train, train_y, val, val_y, k, temperature, num_classes):
    """The protocol spelled out with Python loops: no torch top-k, no scatter."""
    top1 = top5 = 0
    for q in range(len(val)):
        sims = []
        for i in range(len(train)):
            dot = sum(float(val[q][d]) * float(train[i][d]) for d in range(len(val[q])))
            sims.append((dot, int(train_y[i])))
        sims.sort(key=lambda t: -t[0])
        weight = dict.fromkeys(range(num_classes), 0.0)
        for dot, label in sims[:k]:
            weight[label] += math.exp(dot / temperature)
        ranked = [c for c, w in sorted(weight.items(), key=lambda t: -t[1]) if w > 0]
        top1 += ranked[0] == int(val_y[q])
        top5 += int(val_y[q]) in ranked[: min(5, k)]
    n = len(val)
    return 100.0 * top1 / n, 100.0 * top5 / n


def unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64))


def test_knn_matches_naive_loops_streamed_in_chunks() -> None:
    gen = torch.Generator().manual_seed(3)
    classes, dim = 7, 6
    train, val = unit_rows(53, dim, gen), unit_rows(19, dim, gen)
    train_y = torch.randint(0, classes, (53,), generator=gen)
    val_y = torch.randint(0, classes, (19,), generator=gen)
    ks = [1, 3, 10, 20]
    # The bank arrives in uneven chunks of 7 and queries are processed 4 at a time.
    batches = [(train[i : i + 7], train_y[i : i + 7]) for i in range(0, 53, 7)]
    result = knn_classify(
        batches, val, val_y, ks, temperature=0.07, num_classes=classes, query_chunk=4
    )
    assert result.n_train == 53 and result.n_val == 19
    for k in ks:
        expected = naive_knn(train, train_y, val, val_y, k, 0.07, classes)
        print(f"k={k}: ours {result.by_k[k]} naive {expected}")
        assert result.by_k[k] == pytest.approx(expected, abs=1e-9)
    # The numbers are not trivial (a bug giving 0 or 100 everywhere would not pass).
    assert 0 < result.by_k[10][0] < 100


def test_vote_weights_by_exp_similarity_over_temperature() -> None:
    # Neighbours: 0.90 (class 1), 0.80 (class 0), 0.79 (class 0).
    # T = 0.07: class 1 gets e^(0.90/T) = 3.8e5 > class 0's e^(0.80/T) + e^(0.79/T) = 1.7e5.
    # T = 1: class 0's 2.23 + 2.20 beats class 1's 2.46.
    sims = torch.tensor([[0.90, 0.80, 0.79]])
    labels = torch.tensor([[1, 0, 0]])
    target1, target0 = torch.tensor([1]), torch.tensor([0])
    assert vote(sims, labels, target1, 3, temperature=0.07, num_classes=2) == (1, 1)
    assert vote(sims, labels, target0, 3, temperature=1.0, num_classes=2) == (1, 1)
    # k=1 uses the nearest only; a class that got no vote is never a top-5 hit.
    assert vote(sims, labels, target0, 1, temperature=0.07, num_classes=5) == (0, 0)


def test_topk_over_bank_parts_merges_to_the_whole_bank_topk() -> None:
    gen = torch.Generator().manual_seed(0)
    bank, y = unit_rows(40, 5, gen), torch.randint(0, 4, (40,), generator=gen)
    queries = unit_rows(6, 5, gen)
    whole = TopK(queries, 8)
    whole.add(bank, y)
    parts = []
    for lo, hi in ((0, 3), (3, 25), (25, 40)):  # one part has fewer rows than k
        part = TopK(queries, 8)
        part.add(bank[lo:hi], y[lo:hi])
        parts.append(part.padded())
    sims, labels = merge_parts([p[0] for p in parts], [p[1] for p in parts], 8)
    torch.testing.assert_close(sims, whole.sims)
    assert torch.equal(labels, whole.labels)
    expected = (queries @ bank.T).topk(8, dim=1).values
    torch.testing.assert_close(whole.sims, expected)


def test_linear_probe_separates_separable_features() -> None:
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 16, generator=gen) * 4
    y = torch.randint(0, 4, (400,), generator=gen)
    x = centers[y] + torch.randn(400, 16, generator=gen) * 0.3
    res = train_linear(
        x[:300], y[:300], x[300:], y[300:], num_classes=4, epochs=8, batch_size=64, base_lr=2.0
    )
    assert res.top1 == 100.0 and res.top5 == 100.0
    assert res.lr == pytest.approx(2.0 * 64 / 256)
    # Random labels cannot be learned: near chance on val (4 classes, 100 samples).
    shuffled = torch.randint(0, 4, (400,), generator=gen)
    chance = train_linear(
        x[:300], shuffled[:300], x[300:], shuffled[300:], num_classes=4, epochs=3, base_lr=0.5
    )
    assert chance.top1 < 50.0


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from dino_cluster.evaluate.features import gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train, train_y, val, val_y = _fixed_data()
        # Uneven parts; rank 1 holds no val rows at all (an empty part must still gather).
        lo, hi = ((0, 9), (9, 53))[rank]
        vlo, vhi = ((0, 19), (19, 19))[rank]
        val_all = gather_rows(val[vlo:vhi] if vhi > vlo else torch.zeros(0, 0), dim=6)
        val_y_all = gather_rows(val_y[vlo:vhi])
        batches = [
            (train[i : min(i + 4, hi)], train_y[i : min(i + 4, hi)]) for i in range(lo, hi, 4)
        ]
        res = knn_classify(batches, val_all, val_y_all, [1, 3, 10, 20], temperature=0.07)
        torch.save({"by_k": res.by_k, "n_train": res.n_train}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fixed_data():  # noqa: ANN202
    gen = torch.Generator().manual_seed(11)
    # float32, as extracted features are (an empty part is float32 too).
    train, val = unit_rows(53, 6, gen).float(), unit_rows(19, 6, gen).float()
    return (
        train,
        torch.randint(0, 5, (53,), generator=gen),
        val,
        torch.randint(0, 5, (19,), generator=gen),
    )


def test_knn_sharded_over_two_gloo_ranks_equals_one_process(tmp_path) -> None:  # noqa: ANN001
    import torch.multiprocessing as mp

    # spawn, not fork: a forked child of a process that already runs OpenMP/thread pools can
    # deadlock; the price is one torch import per rank.
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    train, train_y, val, val_y = _fixed_data()
    whole = knn_classify([(train, train_y)], val, val_y, [1, 3, 10, 20], temperature=0.07)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n_train"] == 53
        assert got["by_k"] == whole.by_k
