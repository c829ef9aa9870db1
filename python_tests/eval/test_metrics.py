"""Metrics against hand-computed rankings and the textbook definition."""
import math

import numpy as np
import pytest
import torch

from s2meta_fast.eval.metrics import (MetricAccumulator, check_ks, metric_keys, reference_metrics,
                                      topk_metric_sums)


def _log2(rank):  # discount of the 1-based rank
    return 1.0 / math.log2(rank + 1)


class TestHandComputed:
    # 6 candidates; scores rank them 3, 0, 5, 1, 4, 2 (position 3 highest).
    scores = torch.tensor([[0.5, 0.2, -1.0, 0.9, 0.0, 0.3]])

    def test_one_user_exact_values(self):
        relevance = torch.zeros(1, 6, dtype=torch.bool)
        relevance[0, [0, 2]] = True          # ranked 2nd and 6th
        out = topk_metric_sums(self.scores, relevance, ks=[1, 2, 6])
        assert out["count"] == 1
        assert out["recall@1"] == 0.0 and out["hit@1"] == 0.0 and out["ndcg@1"] == 0.0
        assert out["recall@2"] == 0.5 and out["hit@2"] == 1.0
        assert out["ndcg@2"] == pytest.approx(_log2(2) / (_log2(1) + _log2(2)))
        assert out["recall@6"] == 1.0
        assert out["ndcg@6"] == pytest.approx((_log2(2) + _log2(6)) / (_log2(1) + _log2(2)))

    def test_k_beyond_candidates_and_more_positives_than_k(self):
        relevance = torch.tensor([[True, True, True, True, False, False]])
        out = topk_metric_sums(self.scores, relevance, ks=[2, 50])
        # top-2 = positions 3, 0: both positive; IDCG@2 over min(4, 2) = 2 positives
        assert out["recall@2"] == 0.5 and out["ndcg@2"] == pytest.approx(1.0)
        assert out["recall@50"] == 1.0  # every candidate is ranked when K > B
        assert out["ndcg@50"] == pytest.approx(
            (_log2(1) + _log2(2) + _log2(4) + _log2(6)) / sum(_log2(r) for r in range(1, 5)))

    def test_ties_break_by_candidate_position(self):
        scores = torch.zeros(1, 4)
        first = torch.tensor([[True, False, False, False]])
        last = torch.tensor([[False, False, False, True]])
        assert topk_metric_sums(scores, first, ks=[1])["hit@1"] == 1.0
        assert topk_metric_sums(scores, last, ks=[1])["hit@1"] == 0.0


def test_padding_is_ignored_and_pooling_is_over_rows():
    # scenario 0: 2 users x 3 items; scenario 1: 1 user x 2 items; padded to [2, 2, 3].
    scores = torch.tensor([[[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]],
                           [[0.0, 1.0, 99.0], [7.0, 7.0, 7.0]]])
    relevance = torch.zeros(2, 2, 3, dtype=torch.bool)
    relevance[0, 0, 0] = True   # rank 1
    relevance[0, 1, 0] = True   # rank 3
    relevance[1, 0, 0] = True   # rank 2 of 2 (the padded item scored 99 must not count)
    relevance[1, 1, 0] = True   # a padded user: ignored
    user_mask = torch.tensor([[True, True], [True, False]])
    item_mask = torch.tensor([[True, True, True], [True, True, False]])
    acc = MetricAccumulator(ks=(1, 2))
    acc.add(scores, relevance, user_mask, item_mask)
    res = acc.result()
    assert acc.count == 3
    assert res["recall@1"] == pytest.approx(1 / 3)
    assert res["recall@2"] == pytest.approx(2 / 3)
    assert res["ndcg@2"] == pytest.approx((1.0 + 0.0 + _log2(2)) / 3)
    # the same rows fed one block per scenario pool to the same means
    acc2 = MetricAccumulator(ks=(1, 2))
    acc2.add(scores[0], relevance[0])
    acc2.add(scores[1, :1, :2], relevance[1, :1, :2])
    assert acc2.result() == pytest.approx(res)


def test_rows_without_positives_are_not_counted():
    out = topk_metric_sums(torch.rand(3, 5), torch.zeros(3, 5, dtype=torch.bool), ks=[5])
    assert out["count"] == 0 and out["recall@5"] == 0.0
    with pytest.raises(ValueError, match="no \\(scenario, user\\) pair"):
        MetricAccumulator(ks=(5,)).result()


def test_matches_textbook_on_random_rankings():
    gen = np.random.default_rng(0)
    scores = torch.from_numpy(gen.permutation(40 * 30).reshape(40, 30).astype(np.float64))
    relevance = torch.from_numpy(gen.random((40, 30)) < 0.15)
    relevance[:, 0] = True
    ks = (1, 5, 10, 30)
    out = topk_metric_sums(scores, relevance, ks)
    for k in ks:
        expect = {"recall": 0.0, "ndcg": 0.0, "hit": 0.0}
        for a in range(40):
            ranked = torch.argsort(scores[a], descending=True).tolist()
            ref = reference_metrics(ranked, torch.nonzero(relevance[a]).flatten().tolist(), k)
            for name in expect:
                expect[name] += ref[name]
        for name, value in expect.items():
            assert out[f"{name}@{k}"] == pytest.approx(value, rel=1e-12)


def test_ks_validation_and_key_order():
    assert check_ks([50, 10, 20]) == (10, 20, 50)
    assert metric_keys((10, 20))[:3] == ["recall@10", "recall@20", "ndcg@10"]
    for bad in ([], [0], [10, 10], [2.5]):
        with pytest.raises(ValueError, match="ks must"):
            check_ks(bad)
