"""Zero-shot KNN retrieval (DUNIA section 4.1.2): exact cosine top-k, distance-weighted vote/mean, database I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from terratorch_eoplugins.nn.knn import KNNDatabase, cosine_topk, l2_normalize, model_fingerprint


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _data(n: int, q: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(q, d, generator=g)


def _brute_force(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 reference: full similarity matrix, full descending sort."""
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = qn @ kn.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def _weights(s: np.ndarray, eps: float, p: float) -> np.ndarray:
    return 1.0 / (np.maximum(1.0 - s, 0.0) + eps) ** p


def test_top_k_matches_a_float64_brute_force() -> None:
    keys, queries = _data(3000, 200, 16)
    v, i = cosine_topk(queries, keys, 50)
    rv, ri = _brute_force(keys.double().numpy(), queries.double().numpy(), 50)
    np.testing.assert_array_equal(i.numpy(), ri)
    np.testing.assert_allclose(v.numpy(), rv, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_distance_weighted_vote_and_mean_match_independent_formulas(k: int, power: float) -> None:
    keys, queries = _data(800, 64, 8, seed=k)
    g = torch.Generator().manual_seed(1)
    classes = torch.randint(0, 7, (800,), generator=g)
    values = torch.rand(800, 2, generator=g) * 30
    eps = 1e-3
    rs, ri = _brute_force(keys.double().numpy(), queries.double().numpy(), k)
    w = _weights(rs, eps, power)
    # vote: sum of weights per class over the k neighbours, argmax (lowest id on ties)
    votes = np.zeros((64, 7))
    for q in range(64):
        for j in range(k):
            votes[q, classes[ri[q, j]]] += w[q, j]
    want_cls = votes.argmax(1)
    want_val = (w[:, :, None] * values.double().numpy()[ri]).sum(1) / w.sum(1, keepdims=True)

    db_c = KNNDatabase(8, "classification", num_classes=7, eps=eps, weight_power=power)
    db_c.add(keys, classes)
    np.testing.assert_array_equal(db_c.predict(queries, k).numpy(), want_cls)
    db_r = KNNDatabase(8, "regression", value_names=["a", "b"], eps=eps, weight_power=power)
    db_r.add(keys, values)
    np.testing.assert_allclose(db_r.predict(queries, k).numpy(), want_val, rtol=1e-5, atol=1e-4)


def test_several_k_from_one_search_equal_separate_searches() -> None:
    keys, queries = _data(500, 40, 8)
    db = KNNDatabase(8, "regression")
    db.add(keys, torch.arange(500.0))
    both = db.predict(queries, [1, 5, 50])
    for k in (1, 5, 50):
        torch.testing.assert_close(both[k], db.predict(queries, k))


def test_exact_match_dominates_the_vote() -> None:
    keys, _ = _data(100, 1, 8)
    labels = torch.arange(100) % 5
    db = KNNDatabase(8, "classification", num_classes=5)
    db.add(keys, labels)
    pred = db.predict(keys[:20] * 3.0, 50)  # scaled copies: cosine 1 with themselves
    torch.testing.assert_close(pred, labels[:20])


@pytest.mark.parametrize("k", [1, 7, 50])
def test_chunked_search_equals_unchunked(k: int) -> None:
    keys, queries = _data(4099, 301, 16, seed=3)
    v_ref, i_ref = cosine_topk(queries, keys, k, max_chunk_bytes=1 << 30, group=1)  # one block, plain top-k
    for bytes_, group in [(1 << 30, None), (1 << 14, None), (4096 * 4, 3), (1 << 16, 64)]:
        v, i = cosine_topk(queries, keys, k, max_chunk_bytes=bytes_, group=group)
        torch.testing.assert_close(v, v_ref)
        torch.testing.assert_close(i, i_ref)


def test_group_prefilter_is_exact_with_many_ties() -> None:
    """Keys repeat 10 distinct vectors: every top-k list is full of ties; the similarity values must be exact."""
    base, queries = _data(10, 50, 8, seed=5)
    keys = base.repeat(300, 1)
    for k in (1, 5, 50):
        v, i = cosine_topk(queries, keys, k, group=16)
        rv, _ = _brute_force(keys.double().numpy(), queries.double().numpy(), k)
        np.testing.assert_allclose(v.numpy(), rv, atol=1e-6)
        # the returned neighbours really have the returned similarities
        sims = l2_normalize(queries) @ l2_normalize(keys).T
        torch.testing.assert_close(sims.gather(1, i), v)
        assert all(len(set(row)) == k for row in i.tolist())  # distinct neighbours


def test_predict_map_equals_per_pixel_prediction_in_chunks() -> None:
    keys, _ = _data(600, 1, 8)
    db = KNNDatabase(8, "classification", num_classes=4)
    db.add(keys, torch.arange(600) % 4)
    emb = torch.randn(2, 8, 9, 7, generator=torch.Generator().manual_seed(2))
    maps = db.predict_map(emb, [1, 5], pixels_per_chunk=10, max_chunk_bytes=1 << 12)
    flat = emb.permute(0, 2, 3, 1).reshape(-1, 8)
    for k in (1, 5):
        assert maps[k].shape == (2, 9, 7)
        torch.testing.assert_close(maps[k].reshape(-1), db.predict(flat, k))
    dbr = KNNDatabase(8, "regression", value_names=["x", "y"])
    dbr.add(keys, torch.rand(600, 2))
    m = dbr.predict_map(emb, 5)
    assert m.shape == (2, 2, 9, 7)
    torch.testing.assert_close(m.permute(0, 2, 3, 1).reshape(-1, 2), dbr.predict(flat, 5))


def test_agrees_with_faiss_exact_inner_product_search() -> None:
    faiss = pytest.importorskip("faiss")
    keys, queries = _data(5000, 300, 32, seed=7)
    kn, qn = l2_normalize(keys), l2_normalize(queries)
    index = faiss.IndexFlatIP(32)
    index.add(kn.numpy())
    fv, fi = index.search(qn.numpy(), 50)
    v, i = cosine_topk(qn, kn, 50, normalized=True)
    same_set = [set(a) == set(b) for a, b in zip(i.tolist(), fi.tolist())]
    assert np.mean(same_set) == 1.0  # random Gaussian data: no ties
    np.testing.assert_allclose(v.numpy(), fv, atol=1e-5)


def test_bad_inputs_raise_clear_errors() -> None:
    keys, queries = _data(100, 10, 8)
    db = KNNDatabase(8, "classification", num_classes=3, fingerprint="a" * 64)
    with pytest.raises(ValueError, match="empty"):
        db.predict(queries, 5)
    bad = keys.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        db.add(bad, torch.zeros(100, dtype=torch.long))
    db.add(keys, torch.arange(100) % 3)
    q = queries.clone()
    q[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        db.predict(q, 5)
    with pytest.raises(ValueError, match="different model"):
        db.predict(queries, 5, fingerprint="b" * 64)
    with pytest.raises(ValueError, match="different model"):
        db.add(keys, torch.zeros(100, dtype=torch.long), fingerprint="b" * 64)
    db.predict(queries, 5, fingerprint="a" * 64)  # the right model is fine
    with pytest.raises(ValueError, match="D=4"):
        db.predict(queries[:, :4], 5)
    with pytest.raises(ValueError, match="exceeds the database size"):
        db.search(queries, 101)
    torch.testing.assert_close(db.predict(queries, 101), db.predict(queries, 100))  # k clamped to the size
    with pytest.raises(ValueError, match="zero norm"):
        db.predict(torch.zeros(2, 8), 1)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 3\)"):
        db.add(keys[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 embeddings but 3 labels"):
        db.add(keys[:2], torch.tensor([0, 1, 2]))
    reg = KNNDatabase(8, "regression")
    with pytest.raises(ValueError, match="NaN or Inf"):
        reg.add(keys[:2], torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="num_classes"):
        KNNDatabase(8, "classification")


def test_save_load_round_trip_without_pickle(tmp_path) -> None:
    keys, queries = _data(300, 20, 8)
    db = KNNDatabase(8, "regression", value_names=["rh98"], fingerprint="f" * 64, eps=1e-4, weight_power=2.0)
    db.add(keys, torch.rand(300) * 40)
    path = db.save(tmp_path / "db.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert set(z.files) == {"keys", "labels", "metadata"}
    back = KNNDatabase.load(path)
    assert (back.fingerprint, back.value_names, back.eps, back.weight_power) == ("f" * 64, ["rh98"], 1e-4, 2.0)
    torch.testing.assert_close(back.predict(queries, [1, 5, 50]), db.predict(queries, [1, 5, 50]))
    with pytest.raises(ValueError, match="different model"):
        back.predict(queries, 5, fingerprint="0" * 64)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a KNN database"):
        KNNDatabase.load(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", keys=np.zeros((2, 8), np.float32), labels=np.zeros(2),
             metadata=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="cannot be read"):
        KNNDatabase.load(tmp_path / "pickled.npz")
    with pytest.raises(FileNotFoundError):
        KNNDatabase.load(tmp_path / "missing.npz")


def test_model_fingerprint_tracks_weights_and_branch() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a, "vertical") != model_fingerprint(a, "horizontal")
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


@pytest.fixture
def medium_precision():
    """What ``import terratorch`` sets: float32 products may run in bfloat16 (AMX CPUs) or TF32 (CUDA)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(previous)


def test_search_runs_in_full_float32_under_medium_precision_and_restores_it(medium_precision, matmul_spy) -> None:
    """Every similarity product runs at "highest" although the caller set "medium", which is left as it was."""
    keys, queries = _data(3000, 200, 16)
    with matmul_spy:
        v, i = cosine_topk(queries, keys, 50, max_chunk_bytes=1 << 16)  # several query chunks and key blocks
    assert matmul_spy.calls and matmul_spy.precisions() == {"highest"}, matmul_spy.calls
    assert torch.get_float32_matmul_precision() == "medium"
    rv, ri = _brute_force(keys.double().numpy(), queries.double().numpy(), 50)
    np.testing.assert_array_equal(i.numpy(), ri)
    np.testing.assert_allclose(v.numpy(), rv, atol=1e-6)


def test_near_ties_keep_their_float64_order_under_medium_precision(medium_precision, matmul_spy) -> None:
    """Neighbours whose similarities differ by ~1e-5 (far below bfloat16's 4e-3 resolution) are ranked exactly."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 64, generator=g)
    other = torch.randn(64, 64, generator=g)
    other -= (other @ q.T) * q / q.square().sum()  # orthogonal to q
    other = l2_normalize(other)
    qn = l2_normalize(q)
    steps = torch.arange(64, dtype=torch.float64) * 1e-5
    cos = (0.9 - steps).float()  # 0.9, 0.89999, 0.89998, ...: one strict order
    keys = cos[:, None] * qn + torch.sqrt(1 - cos[:, None] ** 2) * other
    perm = torch.randperm(64, generator=g)
    db = KNNDatabase(64, "classification", num_classes=64)
    db.add(keys[perm], torch.arange(64)[perm])
    with matmul_spy:
        sims, idx = db.search(q, 10)
    assert matmul_spy.precisions() == {"highest"}
    assert db.labels[idx[0]].tolist() == list(range(10))  # label = rank by construction
    assert torch.get_float32_matmul_precision() == "medium"


# ----------------------------------------------------------------------------------------------- candidate pass
def _unit32(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def _adversarial_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Float32 unit keys and queries on which a reduced-precision ranking alone would go wrong."""
    g = torch.Generator().manual_seed(11)
    out = {"gaussian": (_unit32(torch.randn(4000, 32, generator=g)), _unit32(torch.randn(48, 32, generator=g)))}
    base = torch.randn(150, 32, generator=g)  # near-duplicates: 20 copies of each vector, 1e-5 apart
    keys = base.repeat(20, 1) + 1e-5 * torch.randn(3000, 32, generator=g)
    out["near_duplicates"] = (_unit32(keys), _unit32(base[:48] + 1e-3 * torch.randn(48, 32, generator=g)))
    base = torch.randn(10, 16, generator=g)  # exact ties: 10 vectors repeated 300 times
    out["ties"] = (_unit32(base.repeat(300, 1)), _unit32(torch.randn(32, 16, generator=g)))
    centres = torch.randn(8, 32, generator=g)  # tight clusters: dense similarities near the top
    pick = torch.randint(0, 8, (4000,), generator=g)
    out["clustered"] = (_unit32(centres[pick] + 0.05 * torch.randn(4000, 32, generator=g)),
                        _unit32(centres[torch.arange(40) % 8] + 0.05 * torch.randn(40, 32, generator=g)))
    out["k_close_to_n"] = (_unit32(torch.randn(60, 8, generator=g)), _unit32(torch.randn(20, 8, generator=g)))
    out["tiny_database"] = (_unit32(torch.randn(7, 8, generator=g)), _unit32(torch.randn(20, 8, generator=g)))
    v = torch.randn(1, 16, generator=g)  # 2500 identical keys: more tied candidates than the cap
    keys = torch.cat([v.repeat(2500, 1), torch.randn(500, 16, generator=g)])
    out["all_equal"] = (_unit32(keys), _unit32(v + 0.3 * torch.randn(16, 16, generator=g)))
    c = torch.randn(1, 32, generator=g)  # every similarity negative: thresholds <= 0
    out["negative"] = (_unit32(c + 0.2 * torch.randn(500, 32, generator=g)),
                       _unit32(-c + 0.2 * torch.randn(16, 32, generator=g)))
    return out


def _assert_exact_top_k(v: torch.Tensor, i: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    """Identical to a float64 brute force up to ties: the returned neighbours' float64 similarities are the k largest
    (as a multiset), in descending order, distinct, and the returned values are those similarities."""
    s = queries.double() @ keys.double().T  # float64 reference of the same float32 vectors
    ref = torch.sort(s, dim=1, descending=True).values[:, :k]
    got = s.gather(1, i)
    assert all(len(set(row)) == k for row in i.tolist()), "repeated neighbours"
    torch.testing.assert_close(torch.sort(got, dim=1, descending=True).values, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)  # sorted like the reference (ties: equal values)
    torch.testing.assert_close(v.double(), got, atol=1e-6, rtol=0)


@pytest.fixture(params=["medium", "highest"])
def float32_precision(request):
    """Each float32 matmul precision in turn; the caller's setting is restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32], ids=["auto", "float16", "float32"])
def test_candidate_pass_returns_the_exact_top_k_on_adversarial_data(float32_precision, dtype, monkeypatch) -> None:
    """Whatever the candidate format and matmul precision: exact sets on near-duplicates, ties, clusters, k ~ N,
    N below the group and candidate counts, negative similarities, one or many database blocks."""
    import terratorch_eoplugins.nn.knn as knn

    fallbacks = []
    exact = knn._exact_topk
    monkeypatch.setattr(knn, "_exact_topk", lambda q, *a: fallbacks.append(q.shape[0]) or exact(q, *a))
    for name, (keys, queries) in _adversarial_sets().items():
        for k in sorted({1, 5, min(50, keys.shape[0] - 3), keys.shape[0]}):
            for max_bytes in (1 << 26, 1 << 14):  # one database block / several blocks and query chunks
                fallbacks.clear()
                v, i = cosine_topk(queries, keys, k, max_chunk_bytes=max_bytes, normalized=True,
                                   candidate_dtype=dtype)
                _assert_exact_top_k(v, i, keys, queries, k)
                if name in ("gaussian", "near_duplicates", "clustered") and k <= 50 and max_bytes > 1 << 14:
                    assert not fallbacks, (name, k)  # the candidate pass did the work, not the exact fallback
                if name == "negative":  # thresholds <= 0: every row searched exactly in every database block
                    assert sum(fallbacks) and sum(fallbacks) % queries.shape[0] == 0
                if name == "all_equal" and max_bytes > 1 << 14:  # 2500 tied candidates: exact search
                    assert sum(fallbacks) == queries.shape[0]
                    for group in (1, 8):  # the cap met at the group / sub-group levels
                        v, i = cosine_topk(queries, keys, k, normalized=True, candidate_dtype=dtype, group=group)
                        _assert_exact_top_k(v, i, keys, queries, k)
        assert torch.get_float32_matmul_precision() == float32_precision


def test_unnormalized_inputs_match_the_float64_reference_under_medium_precision(medium_precision) -> None:
    g = torch.Generator().manual_seed(4)
    keys, queries = torch.randn(5000, 64, generator=g) * 7, torch.randn(300, 64, generator=g)
    v, i = cosine_topk(queries, keys, 50)
    rv, ri = _brute_force(keys.double().numpy(), queries.double().numpy(), 50)
    np.testing.assert_array_equal(np.sort(i.numpy(), 1), np.sort(ri, 1))
    np.testing.assert_allclose(v.numpy(), rv, atol=1e-6)
    assert torch.get_float32_matmul_precision() == "medium"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_candidate_similarity_error_bound_holds_and_is_tight(dtype) -> None:
    """|s - s~| <= c1 |s~| + c0 for every pair, the bound the candidate threshold is derived from."""
    import terratorch_eoplugins.nn.knn as knn

    g = torch.Generator().manual_seed(9)
    keys, queries = _unit32(torch.randn(3000, 64, generator=g)), _unit32(torch.randn(200, 64, generator=g))
    queries[0] = keys[0]  # an exact match: s = 1
    blk, bound = knn._KeyBlock(keys, 0, dtype), knn._Bound(dtype, 64)
    qa, q_err = knn._round_inputs(queries, dtype)
    from terratorch_eoplugins.runtime import exact_matmul

    with exact_matmul():  # as in the search: a float32 pass must not drop to bf16 under "medium"
        approx = torch.mm(blk.approx, qa.t()).t().double()  # the product of the search, [keys, queries] layout
    s = queries.double() @ keys.double().T
    c0 = bound.c0(knn._norm_bound(queries), q_err, knn._norm_bound(qa), blk)
    err_bound = bound.c1 * approx.abs() + c0[:, None]
    ratio = (s - approx).abs() / err_bound
    assert float(ratio.max()) <= 1.0
    if dtype != torch.float32:
        assert float(ratio.max()) > 0.2  # not vacuous: the observed error reaches a fair share of the bound


def test_database_search_reuses_and_refreshes_its_rounded_keys() -> None:
    keys, queries = _data(3000, 40, 16, seed=8)
    db = KNNDatabase(16, "classification", num_classes=3)
    db.add(keys, torch.arange(3000) % 3)
    first = db.search(queries, 10)
    assert len(db._search_cache["cpu"]) == 1
    torch.testing.assert_close(db.search(queries, 10), first)  # second search: cached key blocks
    db.add(queries[:5] * 2.0, torch.zeros(5, dtype=torch.long))  # the queries themselves join the database
    sims, idx = db.search(queries[:5], 1)
    assert idx.flatten().tolist() == list(range(3000, 3005))
    torch.testing.assert_close(sims.flatten(), torch.ones(5))
    with torch.inference_mode():  # keys added during validation are inference tensors (no version counter)
        inf = KNNDatabase(16, "classification", num_classes=3)
        inf.add(keys, torch.arange(3000) % 3)
        torch.testing.assert_close(inf.search(queries, 10), first)
        torch.testing.assert_close(inf.search(queries, 10), first)


def test_key_cache_notices_keys_changed_in_place() -> None:
    keys, queries = _data(2000, 20, 16, seed=12)
    keys, queries, cache = _unit32(keys), _unit32(queries), {}
    before = cosine_topk(queries, keys, 5, normalized=True, key_cache=cache)
    assert len(cache) == 1
    keys.neg_()  # same storage, new content
    v, i = cosine_topk(queries, keys, 5, normalized=True, key_cache=cache)
    _assert_exact_top_k(v, i, keys, queries, 5)
    assert not torch.equal(i, before[1])


def test_parallel_query_chunks_give_the_exact_top_k(medium_precision) -> None:
    """With several CPU threads the query chunks run in parallel pipelines (one thread each): same exact neighbours
    on every adversarial set (including the exact fallback of negative thresholds), and the caller's thread count
    and matmul precision are restored."""
    torch.set_num_threads(3)  # the autouse fixture restores the session's count afterwards
    for name, (keys, queries) in _adversarial_sets().items():
        queries = queries.repeat(6, 1)  # enough query rows for several chunks under the small byte bound
        for k in sorted({1, min(50, keys.shape[0] - 3)}):
            v, i = cosine_topk(queries, keys, k, max_chunk_bytes=1 << 14, normalized=True)
            _assert_exact_top_k(v, i, keys, queries, k)
            v1, i1 = cosine_topk(queries[:7], keys, k, max_chunk_bytes=1 << 14, normalized=True)
            assert torch.equal(v1, v[:7]), name  # the same similarities (indices may differ among ties)
    assert torch.get_num_threads() == 3
    assert torch.get_float32_matmul_precision() == "medium"


def test_parallel_search_reraises_a_worker_error(monkeypatch) -> None:
    import terratorch_eoplugins.nn.knn as knn

    torch.set_num_threads(2)
    keys, queries = _data(500, 300, 8)

    def boom(*args, **kwargs):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(knn, "_search_chunk", boom)
    with pytest.raises(RuntimeError, match="worker failed"):
        cosine_topk(queries, keys, 5, max_chunk_bytes=1 << 12)
    assert torch.get_num_threads() == 2
