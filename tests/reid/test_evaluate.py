"""Golden tests of the Market-1501 protocol, computed by hand, plus a brute-force cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reid.evaluate as ev
from reid.evaluate import evaluate, evaluate_features


def test_junk_removal_cmc_ap_inp_by_hand():
    # query pid 1 on camera 1; gallery sorted by distance: junk (pid1 cam1), negative, hit, hit
    dist = np.array([[0.3, 0.1, 0.05, 0.4]])
    m = evaluate(dist, [1], [1, 2, 1, 1], [1], [2, 2, 1, 3], max_rank=5)
    # after junk removal: [neg, hit, hit] -> first hit at position 2
    np.testing.assert_allclose(m.cmc, [0, 1, 1, 1, 1])
    assert m.mAP == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m.mINP == pytest.approx(2 / 3)
    assert m.num_valid == 1


def test_trapezoid_ap_matches_original_fedreid_formula():
    dist = np.array([[0.3, 0.1, 0.05, 0.4]])
    m = evaluate(dist, [1], [1, 2, 1, 1], [1], [2, 2, 1, 3], max_rank=5, ap="trapezoid")
    # hits at 0-based ranks 1 and 2: ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 2
    assert m.mAP == pytest.approx(((0 + 0.5) / 2 + (0.5 + 2 / 3) / 2) / 2)


def test_query_without_valid_match_is_skipped_or_counted():
    # query 0 (pid 1, cam 1) matches on camera 2; query 1 (pid 3, cam 1) only has a same-camera copy
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    q_pids, q_cams = [1, 3], [1, 1]
    g_pids, g_cams = [1, 2, 3], [2, 2, 1]
    m = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    assert m.num_valid == 1 and m.num_query == 2
    np.testing.assert_allclose(m.cmc, [1, 1, 1])
    assert m.mAP == pytest.approx(1.0)
    m_all = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3, denominator="all")
    np.testing.assert_allclose(m_all.cmc, [0.5, 0.5, 0.5])
    assert m_all.mAP == pytest.approx(0.5)


def test_gallery_smaller_than_max_rank_gives_full_length_cmc():
    dist = np.array([[0.9, 0.1, 0.5], [0.2, 0.1, 0.3]])
    m = evaluate(dist, [1, 2], [1, 5, 2], [1, 1], [2, 2, 2], max_rank=50)
    assert m.cmc.shape == (50,)
    # query 0: order g1(neg) g2(neg) g0(hit) -> first hit 3; query 1: order g1 g0 g2 -> hit at 3
    np.testing.assert_allclose(m.cmc[:4], [0, 0, 1, 1])
    assert m.cmc[-1] == 1.0
    assert m.mAP == pytest.approx(1 / 3)


def test_ties_are_broken_by_gallery_index():
    hit_second = evaluate(np.array([[0.5, 0.5]]), [1], [2, 1], [1], [2, 2], max_rank=2)
    hit_first = evaluate(np.array([[0.5, 0.5]]), [1], [1, 2], [1], [2, 2], max_rank=2)
    assert hit_second.rank1 == 0.0 and hit_second.cmc[1] == 1.0
    assert hit_first.rank1 == 1.0


def test_distractors_never_match():
    m = evaluate(np.array([[0.0, 0.1, 0.2]]), [4], [0, 0, 4], [1], [2, 3, 2], max_rank=3)
    np.testing.assert_allclose(m.cmc, [0, 0, 1])
    assert m.mAP == pytest.approx(1 / 3)


def test_no_valid_query_is_nothing_to_score_and_bad_input_is_a_clear_error():
    m = evaluate(np.array([[0.1]]), [1], [1], [1], [1])  # the only match is on the query's own camera
    assert m.num_valid == 0 and m.num_query == 1
    assert m.summary() == {"valid_queries": 0.0}  # no rank-1 or mAP at all, rather than a score of 0
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.array([[np.nan, 0.1]]), [1], [1, 1], [1], [2, 2])
    with pytest.raises(ValueError, match="shape"):
        evaluate(np.array([[0.1, 0.2]]), [1], [1], [1], [2])


def _brute_force(dist, qp, gp, qc, gc, max_rank):
    cmc, aps, valid = np.zeros(max_rank), [], 0
    for i in range(len(qp)):
        order = sorted(range(len(gp)), key=lambda j: (dist[i, j], j))
        kept = [j for j in order if not (gp[j] == qp[i] and gc[j] == qc[i])]
        hits = [k + 1 for k, j in enumerate(kept) if gp[j] == qp[i]]
        if not hits:
            continue
        valid += 1
        cmc[hits[0] - 1 :] += 1
        aps.append(np.mean([(t + 1) / p for t, p in enumerate(hits)]))
    return cmc / valid, float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties_and_chunking(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    nq, ng = 23, 41
    dist = rng.integers(0, 6, size=(nq, ng)).astype(np.float64)  # many ties
    qp, gp = rng.integers(0, 8, nq), rng.integers(0, 8, ng)
    qc, gc = rng.integers(1, 4, nq), rng.integers(1, 4, ng)
    want_cmc, want_map = _brute_force(dist, qp, gp, qc, gc, 10)
    full = evaluate(dist, qp, gp, qc, gc, max_rank=10)
    monkeypatch.setattr(ev, "ChunkElements", 50)  # forces one query per chunk
    chunked = evaluate(dist, qp, gp, qc, gc, max_rank=10)
    for m in (full, chunked):
        np.testing.assert_allclose(m.cmc, want_cmc)
        assert m.mAP == pytest.approx(want_map)


def test_features_path_equals_distance_matrix_path(monkeypatch):
    g = torch.Generator().manual_seed(0)
    qf = torch.nn.functional.normalize(torch.randn(17, 8, generator=g), dim=1)
    gf = torch.nn.functional.normalize(torch.randn(29, 8, generator=g), dim=1)
    rng = np.random.default_rng(3)
    qp, gp, qc, gc = (
        rng.integers(0, 5, 17),
        rng.integers(0, 5, 29),
        rng.integers(0, 3, 17),
        rng.integers(0, 3, 29),
    )
    want = evaluate((1 - qf @ gf.t()).numpy(), qp, gp, qc, gc, max_rank=20)
    monkeypatch.setattr(ev, "ChunkElements", 64)
    got = evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=20)
    np.testing.assert_allclose(got.cmc, want.cmc)
    assert got.mAP == pytest.approx(want.mAP)
    assert got.mINP == pytest.approx(want.mINP)
