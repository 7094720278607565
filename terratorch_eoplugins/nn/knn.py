"""Exact cosine k-nearest-neighbour retrieval for zero-shot dense prediction (DUNIA, Fayad et al., ICML 2025).

DUNIA's zero-shot classifier (section 4.1.2, appendix H.6): a *retrieval database* of ``L2``-normalised
pixel embeddings (keys) from the training split paired with labels (values); every query pixel embedding is
``L2``-normalised, its ``k`` nearest keys by cosine similarity are retrieved (``k`` = 1, 5 or 50 in Table 1)
and the label is assigned by *distance-weighted voting* (classes) or a distance-weighted mean (regression).

The paper names distance-weighted voting without giving its formula; we use the classic inverse-distance
weighting (Dudani, 1976) on the cosine distance ``d_j = 1 - cos(q, k_j)`` in ``[0, 2]``::

    w_j   = (d_j + eps) ** -p                       (p = ``weight_power``, 1 by default)
    class = argmax_c  sum_{j <= k} w_j [y_j = c]    (ties -> lowest class id)
    value = sum_{j <= k} w_j y_j / sum_{j <= k} w_j

``eps`` keeps an exact match (``d = 0``) finite: it then dominates the vote, as the nearest neighbour should.

Search (:func:`cosine_topk`) is exact, memory-bounded and does not depend on ``torch.get_float32_matmul_precision()``
(``import terratorch`` sets ``"medium"``). It runs in two passes over query chunks and database blocks:

1. **Candidate pass, reduced precision.** Queries and keys are rounded to bfloat16 (``q~``, ``k~``; float16 on CUDA
   devices without bfloat16, float32 on CPUs without fast bfloat16 products) and ``s~ = q~ . k~`` is computed for a
   ``[keys, queries]`` tile with one matrix product (exact bfloat16 x bfloat16 products accumulated in float32, the
   result rounded to bfloat16: about three times faster than a float32 product on AVX512-BF16/AMX CPUs, and it halves
   the tile's memory). Keys are cut into groups of ``g ~ sqrt(N / k)`` consecutive keys (sub-groups of 8); the group
   maxima are taken in the *integer order of the bit patterns*, which for these sign-magnitude formats is the float
   order on non-negative values (and every maximum is an element of its group).
2. **Exact re-rank.** The candidates are re-scored in float64 from the float32 vectors (products of float32 values are
   exact in float64, a ``D``-term sum errs by ``~D 2^-53``), and the top-k of the candidates is the result.

*Why no true neighbour is missed.* Every similarity of the candidate pass satisfies
``|s - s~| <= e(s~) = c1 |s~| + c0`` with ``c1 = u / (1 - u)`` (``u``: unit roundoff of the output format, ``2^-8``
for bfloat16) and, per query, ``c0 = ||q|| max||k - k~|| + ||q - q~|| max||k~|| + 2 (D + 1) 2^-24 ||q~|| max||k~||``
plus subnormal terms (below ``1e-37`` for bfloat16): since ``s - q~.k~ = q.(k - k~) + (q - q~).k~``, Cauchy-Schwarz
bounds the input rounding; ``D`` products summed in float32, in any order, err by at most
``gamma_{D+1} sum|q~_i k~_i| <= gamma_{D+1} ||q~|| ||k~||``; the final rounding to nearest errs by ``u |.|``. These
are the only assumptions on the product kernel (float32 accumulation, round-to-nearest output; what oneDNN and
cuBLAS do for bfloat16 inputs). The norms are measured (float32 norms inflated by their own worst rounding error), not
assumed. Let ``t`` be the k-th largest group maximum: ``k`` distinct keys have ``s~ >= t``, hence ``s >= t - e(t)``,
so the exact k-th similarity ``s_k >= L = t - e(t)`` (and, from the second database block on, ``L`` also is at least
the k-th exact similarity found so far). A key with ``s >= s_k`` has ``s~ + e(s~) >= s >= L``, and as
``s~ + e(s~)`` increases with ``s~``, ``s~ >= tau`` where ``tau`` solves ``tau + c1 |tau| + c0 = L`` (lowered by a
margin for the float64 arithmetic and rounded down to the candidate format). The candidates are all keys with
``s~ >= tau``: the groups, then sub-groups, whose maximum is ``>= tau``, then their elements ``>= tau``. Ties at the
k-th similarity are kept (``>=``), so the re-ranked top-k equals the float64 brute force up to exact ties. In the
first block at least ``k`` keys pass (the ``k`` group maxima ``>= t > tau``); later blocks may pass fewer, as the
``k`` found earlier already bound them. Queries whose ``tau <= 0`` (the integer order is exact above
0 only) or with more than ``max(2048, 8 k)`` candidates (massive ties) are searched exactly instead: a float64
product with the whole block. On CUDA, cuBLAS's reduced-precision split-K reductions are switched off for the
search (the bound assumes float32 accumulation); on MPS (no float64) the re-rank runs in float32.

The bound costs little: for DUNIA-like sizes (``N = 2^18``, ``D = 64``, ``k = 50``) a query keeps about 77
candidates on Gaussian data and about 420 on tightly clustered data (``benchmarks/knn_retrieval.py --data
clustered``). The rounded keys are cached by :class:`KNNDatabase` between searches. On the CPU with several torch
threads, the query chunks are searched in parallel, one single-threaded pipeline per thread (the candidate
extraction and re-rank are many operations on small tensors, whose own parallel regions cost more than they save;
parallel chunks scale instead); the caller's thread count is restored afterwards. The float32 and float64 products run
under :func:`~terratorch_eoplugins.runtime.exact_matmul`, which restores the caller's precision setting afterwards.

:class:`KNNDatabase` holds keys, labels and the *fingerprint* of the model that produced the keys
(:func:`model_fingerprint`); queries from a model with another fingerprint, NaN/Inf embeddings and empty
databases raise ``ValueError``. Databases are saved as NPZ (no pickle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from terratorch_eoplugins.runtime import exact_matmul

__all__ = [
    "KNNDatabase", "cosine_topk", "distance_weights", "knn_predict", "l2_normalize", "model_fingerprint",
    "weighted_mean", "weighted_vote",
]

#: default bound on one similarity tile of the candidate pass (database columns x query rows) during search
DEFAULT_CHUNK_BYTES = 64 * 2**20
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- helpers
def _check_finite(x: Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=-1).sum()) if x.ndim > 1 else int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {bad} embedding(s) contain NaN or Inf; the model produced non-finite "
                         "embeddings (check the input image for NaN/no-data values)")


def l2_normalize(x: Tensor, name: str = "embeddings", eps: float = 1e-12) -> Tensor:
    """``x / ||x||_2`` over the last dimension in float32; raises for NaN/Inf or all-zero vectors."""
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    x = x.detach().float()
    _check_finite(x, name)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = int((norm <= eps).sum())
    if zero:
        raise ValueError(f"{name}: {zero} embedding(s) have zero norm, so no cosine similarity is defined")
    return x / norm


def _group_size(n: int, k: int) -> int:
    """Power-of-two group width near ``sqrt(N / k)``, which balances the group maxima and the candidate groups."""
    return 2 ** max(0, int(round(math.log2(max(1.0, math.sqrt(n / max(k, 1)))))))


def _candidate_dtype(device: torch.device) -> torch.dtype:
    """Fast reduced-precision format of the candidate pass on ``device`` (float32 where none is fast)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:  # oneDNN bf16 kernels (AVX512-BF16 / AMX); without them bf16 products are slower than float32
            if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):
            pass
    return torch.float32


def _rerank_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


@contextlib.contextmanager
def _float32_accumulation(device: torch.device) -> Iterator[None]:
    """Forbid cuBLAS's reduced-precision (bf16/fp16) split-K reductions inside the block; restore afterwards."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (``None``: unchanged), then restore the caller's count."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _norm_bound(x: Tensor) -> Tensor:
    """Upper bounds of the row L2 norms: float32 norms inflated by their worst rounding error, ``(D + 2) 2^-23``
    relative (a sum of ``D`` squares and a square root), in the re-rank precision."""
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).to(_rerank_dtype(x.device))
    return norms * (1 + (x.shape[1] + 2) * 2.0 ** -23)


def _round_inputs(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x`` rounded to ``dtype`` and upper bounds of the norms of the rounding errors ``||x - x~||`` (the float32
    subtraction is exact: Sterbenz). float16 subnormals are set to zero here, so that hardware flushing them changes
    nothing; bfloat16 and float32 subnormals (below 1.2e-38) are covered by a term of the bound instead."""
    xr = x.to(dtype)
    if dtype == x.dtype:
        return xr, torch.zeros(x.shape[0], dtype=_rerank_dtype(x.device), device=x.device)
    if dtype == torch.float16:
        xr.masked_fill_(xr.abs() < torch.finfo(dtype).tiny, 0)
    return xr, _norm_bound(torch.sub(x, xr))


class _KeyBlock:
    """One database block: float32 keys, their rounded copy for the candidate pass and the error-bound constants."""

    def __init__(self, keys: Tensor, start: int, dtype: torch.dtype) -> None:
        self.keys, self.start, self.n, self.dtype = keys, start, keys.shape[0], dtype
        self.approx, err = _round_inputs(keys, dtype)
        self.max_err = float(err.max())                               # max ||k - k~||
        self.max_norm_approx = float(_norm_bound(self.approx).max())  # max ||k~||
        self.max_norm = float(_norm_bound(keys).max())                # max ||k||


class _Bound:
    """Error model of one candidate similarity ``s~ = round_out(sum_i q~_i k~_i)`` against ``s = q . k``.

    ``|s - s~| <= c1 |s~| + c0`` with ``c1 = u / (1 - u)`` (``u``: unit roundoff of the output format) and, per query,
    ``c0 = ||q|| max||k - k~|| + ||q - q~|| max||k~||``  (input rounding)
    ``     + gamma ||q~|| max||k~||``  (``D`` products summed in float32, ``gamma = 2 (D + 1) 2^-24``)
    ``     + sqrt(D) tiny_in (||q~|| + max||k~||) + tiny_out``  (subnormals flushed by the hardware).
    """

    def __init__(self, dtype: torch.dtype, dim: int) -> None:
        fi, f32 = torch.finfo(dtype), torch.finfo(torch.float32)
        u = fi.eps / 2
        self.c1 = u / (1 - u)
        self.gamma = 2 * (dim + 1) * 2.0 ** -24
        self.flush = 0.0 if dtype == torch.float16 else math.sqrt(dim) * fi.tiny
        self.tiny = fi.tiny + (dim + 1) * f32.tiny  # output underflow, flushed products and partial sums

    def c0(self, q_norm: Tensor, q_err: Tensor, qa_norm: Tensor, blk: _KeyBlock) -> Tensor:
        """``c0`` of queries with norms ``q_norm``, rounding-error norms ``q_err`` and ``||q~|| = qa_norm``."""
        return (q_norm * blk.max_err + q_err * blk.max_norm_approx + self.gamma * qa_norm * blk.max_norm_approx
                + self.flush * (qa_norm + blk.max_norm_approx) + self.tiny)


def _exact_topk(q: Tensor, keys: Tensor, k: int, max_bytes: int) -> tuple[Tensor, Tensor]:
    """Reference path: top-k of ``q @ keys.T`` computed in float64, in key blocks under ``max_bytes``."""
    dt = _rerank_dtype(q.device)
    q64 = q.to(dt)
    step = max(k, max_bytes // (8 * max(1, q.shape[0])))
    best_v = best_i = None
    for b in range(0, keys.shape[0], step):
        s = torch.mm(q64, keys[b:b + step].to(dt).t())
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        i = i + b
        best_v, best_i = (v, i) if best_v is None else _merge(best_v, best_i, v, i, k)
    return best_v, best_i  # type: ignore[return-value]


def _merge(av: Tensor, ai: Tensor, bv: Tensor, bi: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact merge of two candidate lists per row into the sorted top-k."""
    v, i = torch.cat([av, bv], dim=1), torch.cat([ai, bi], dim=1)
    v, pos = torch.topk(v, min(k, v.shape[1]), dim=1)
    return v, i.gather(1, pos)


def cosine_topk(queries: Tensor, keys: Tensor, k: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                normalized: bool = False, group: int | None = None, candidate_dtype: torch.dtype | None = None,
                key_cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """Exact cosine top-k of every query among ``keys``: ``(similarities [Q, k], indices [Q, k])``, descending.

    The neighbour sets are those of the float64 similarities of the (float32) normalised vectors, whatever
    ``torch.get_float32_matmul_precision()`` says (see the module docstring for the algorithm and its proof).

    Args:
        queries: ``[Q, D]`` query embeddings.
        keys: ``[N, D]`` database keys.
        k: neighbours per query (``1 <= k <= N``).
        max_chunk_bytes: bound on one candidate-pass similarity block; queries (and, for huge databases, keys)
            are processed in blocks under it, and block results are merged exactly.
        normalized: both inputs are already L2-normalised float32 (skip the normalisation and checks).
        group: group width of the group-maximum filter (``None``: ``~sqrt(N / k)``; 1: no grouping).
        candidate_dtype: format of the candidate pass (``None``: bfloat16 where the device has fast bfloat16
            products, float16 on CUDA without them, else float32); any choice returns the same exact neighbours.
        key_cache: a dict kept by the caller together with ``keys`` (e.g. by :class:`KNNDatabase`, which empties it
            when its keys change): the rounded key blocks are stored there and reused by later calls with the same
            keys tensor (in-place changes are noticed, except for inference-mode tensors).
    """
    if not normalized:
        queries = l2_normalize(queries, "queries")
        keys = l2_normalize(keys, "keys")
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be [Q, D] and [N, D] "
                         "with the same D")
    n, q_total = keys.shape[0], queries.shape[0]
    if n == 0:
        raise ValueError("the retrieval database is empty: add labelled embeddings before searching")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (database size), got {k}")
    if group is not None and group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    cdt = candidate_dtype or _candidate_dtype(queries.device)
    if cdt not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"candidate_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {cdt}")
    queries, keys = queries.float(), keys.float()
    out_v = queries.new_empty(q_total, k)
    out_i = torch.empty(q_total, k, dtype=torch.long, device=queries.device)
    if q_total == 0:
        return out_v, out_i
    esize = torch.finfo(cdt).bits // 8
    # database blocks: as wide as possible while keeping at least 16 rows per block under the byte bound
    db_block = min(n, max(k, max_chunk_bytes // (esize * 16)))
    g = group if group is not None else _group_size(db_block, k)
    padded = math.ceil(db_block / g) * g
    rows = max(1, min(q_total, max_chunk_bytes // (esize * padded)))
    buf = torch.empty(rows, padded, dtype=cdt, device=queries.device)
    version = None if keys.is_inference() else keys._version  # inference tensors have no version counter
    cache_key = (keys.data_ptr(), version, tuple(keys.shape), str(keys.device), cdt, db_block)
    blocks = key_cache.get(cache_key) if key_cache is not None else None
    if blocks is None:
        blocks = [_KeyBlock(keys[b:b + db_block], b, cdt) for b in range(0, n, db_block)]
        if key_cache is not None:
            key_cache.clear()
            key_cache[cache_key] = blocks
    bound = _Bound(cdt, keys.shape[1])
    # re-rank chunks: the candidates of several tiles are re-ranked together (fewer, larger operations)
    super_rows = min(q_total, max(rows, 1024 // rows * rows))
    # the products run at "highest": float32 candidate passes and the float64 fallback stay exact under "medium"
    # With one chunk (or one thread) the candidate extraction and re-rank run on a quarter of the threads (one for
    # up to 7): many operations on small tensors, whose parallel regions cost more than they save.
    threads = torch.get_num_threads() if queries.device.type == "cpu" else None
    starts = list(range(0, q_total, super_rows))
    # CPU: the query chunks run in parallel, one single-threaded pipeline per thread (the candidate extraction is
    # many small operations that do not scale inside one chunk, so chunks, not operations, are what to parallelise)
    workers = 1 if threads is None else min(threads, len(starts))
    if workers > 1:
        chunk_lock = threading.Lock()
        pending = iter(starts)
        bufs = [buf] + [torch.empty_like(buf) for _ in range(workers - 1)]

        def work(w: int) -> None:
            while True:
                with chunk_lock:
                    s = next(pending, None)
                if s is None:
                    return
                v, i = _search_chunk(queries[s:s + super_rows], blocks, k, g, bufs[w], bound, max_chunk_bytes, 1)
                out_v[s:s + v.shape[0]] = v.to(out_v.dtype)
                out_i[s:s + v.shape[0]] = i

        with exact_matmul(), _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work, w) for w in range(workers)]:
                f.result()  # re-raises a worker's exception
        return out_v, out_i
    post_threads = None if threads is None else max(1, threads // 4)
    with exact_matmul(), _float32_accumulation(queries.device), _intra_op_threads(post_threads):
        for s in starts:
            v, i = _search_chunk(queries[s:s + super_rows], blocks, k, g, buf, bound, max_chunk_bytes, threads)
            out_v[s:s + v.shape[0]] = v.to(out_v.dtype)
            out_i[s:s + v.shape[0]] = i
    return out_v, out_i


def _search_chunk(qq: Tensor, blocks: list[_KeyBlock], k: int, g: int, buf: Tensor, bound: _Bound,
                  max_bytes: int, threads: int | None) -> tuple[Tensor, Tensor]:
    """Exact top-k (re-rank precision values, descending) of one query chunk over every database block.

    The candidate pass runs in sub-chunks of at most ``buf.numel() // padded block width`` queries, one
    ``[keys, queries]`` similarity tile each; the candidates of all sub-chunks are re-ranked together.
    """
    r_all, dev, cdt = qq.shape[0], qq.device, buf.dtype
    rdt = _rerank_dtype(dev)
    u_r = torch.finfo(rdt).eps / 2  # unit roundoff of the re-rank (and threshold) arithmetic
    qa_all, q_err_all = _round_inputs(qq, cdt)
    q_norm_all, qa_norm_all = _norm_bound(qq), _norm_bound(qa_all)
    q64 = qq.to(rdt)
    int_view = torch.int16 if buf.element_size() == 2 else torch.int32
    int_min, int_max = torch.iinfo(int_view).min, torch.iinfo(int_view).max
    g1 = max(d for d in range(1, 9) if g % d == 0)  # two-level group maxima: g = g1 * g2
    g2 = g // g1
    cap = max(2048, 8 * k)  # candidate groups / candidates per query beyond which the exact search is cheaper
    best_v = best_i = None
    for blk in blocks:
        kk = min(k, blk.n)
        groups = math.ceil(blk.n / g)
        padded = groups * g
        sub = max(1, min(r_all, buf.numel() // padded))
        rows_l: list[Tensor] = []
        cols_l: list[Tensor] = []
        slow = torch.zeros(r_all, dtype=torch.bool, device=dev)
        # group-maxima buffers, reused by every tile (fresh large tensors cost page faults on the CPU)
        m1_buf = torch.empty(groups * g2 * min(sub, r_all), dtype=int_view, device=dev) if g1 > 1 else None
        m2_buf = torch.empty(groups * min(sub, r_all), dtype=int_view, device=dev) if g2 > 1 else None
        for s in range(0, r_all, sub):
            qa = qa_all[s:s + sub]
            r = qa.shape[0]
            tile = buf.view(-1)[:padded * r].view(padded, r)  # [keys, queries]: the faster product layout
            tint = tile.view(int_view)
            # Group maxima in the integer order of the bit patterns (sign-magnitude formats): the float order on
            # non-negative values, the only ones kept below, and every maximum is an element of its group.
            m1, m2 = tint, tint  # [groups * g2, r], [groups, r]
            with _intra_op_threads(threads):  # the heavy part: the product and the first group maxima
                torch.mm(blk.approx, qa.t(), out=tile[:blk.n])
                if blk.n < padded:  # padding: the bit pattern of -0.0, the smallest integer of the view
                    tint[blk.n:] = int_min
                if m1_buf is not None:
                    m1 = m2 = torch.amax(tint.view(groups * g2, g1, r), dim=1,
                                         out=m1_buf[:groups * g2 * r].view(-1, r))
            if m2_buf is not None:
                m2 = torch.amax(m1.view(groups, g2, r), dim=1, out=m2_buf[:groups * r].view(-1, r))
            src = m2 if groups >= kk else tint[:blk.n]  # fewer groups than neighbours: the elements themselves
            kth = torch.topk(src, kk, dim=0, sorted=False).values.amin(dim=0).view(cdt).to(rdt)
            # lower bound of the exact kk-th similarity: kk distinct elements have s~ >= kth, so s >= kth - e(kth)
            c0 = bound.c0(q_norm_all[s:s + r], q_err_all[s:s + r], qa_norm_all[s:s + r], blk)
            low = kth - bound.c1 * kth.abs() - c0
            if best_v is not None and best_v.shape[1] == k:  # earlier blocks already hold k exact similarities
                low = torch.maximum(low, best_v[s:s + r, -1]
                                    - 4 * q64.shape[1] * u_r * q_norm_all[s:s + r] * blk.max_norm)
            # smallest s~ whose upper bound s~ + c1 |s~| + c0 reaches `low`, lowered by a margin for this arithmetic
            m = low - c0
            tau = torch.where(m >= 0, m / (1 + bound.c1), m / (1 - bound.c1))
            tau = tau - max(1e-9, 256 * u_r) * (1 + tau.abs() + c0)
            fast = tau > 0  # the integer-order maxima are exact above 0
            # the smallest value of the candidate format >= tau, as a bit pattern (int_max: no candidate); tau is
            # clamped to >= 0, where the next value up is the next bit pattern
            t = tau.clamp_min(0).to(cdt)
            t_int = t.view(int_view)
            t_int = torch.where(t.to(rdt) < tau, t_int + 1, t_int).masked_fill(~fast, int_max)
            # candidate groups: maximum >= t (row-major: the rows come out sorted); at each level, queries with
            # more than `cap` survivors (massive ties) leave for the exact search, which bounds the memory used
            mask = m2.t() >= t_int.unsqueeze(1)
            many = mask.sum(dim=1) > cap
            if bool(many.any()):
                mask &= ~many.unsqueeze(1)
                fast &= ~many
            ri, gi = mask.nonzero(as_tuple=True)
            for source, width_ in ((m1, g2), (tint, g1)):  # sub-groups (maximum >= t), then elements (>= t)
                if width_ == 1:
                    continue
                idx = ((gi * width_).unsqueeze(1) + torch.arange(width_, device=dev)) * r + ri.unsqueeze(1)
                pj, j = (torch.take(source, idx) >= t_int[ri].unsqueeze(1)).nonzero(as_tuple=True)
                ri, gi = ri[pj], gi[pj] * width_ + j
                many = torch.bincount(ri, minlength=r) > cap
                if bool(many.any()):
                    keep = ~many[ri]
                    ri, gi = ri[keep], gi[keep]
                    fast &= ~many
            rows_l.append(ri + s)
            cols_l.append(gi)
            slow[s:s + r] = ~fast
        row, col = torch.cat(rows_l), torch.cat(cols_l)
        counts = torch.bincount(row, minlength=r_all)
        slow |= counts > cap  # threshold <= 0, or too many candidates (massive ties): exact search
        if bool(slow.any()):
            keep = ~slow.index_select(0, row)
            row, col = row[keep], col[keep]
            counts = counts.masked_fill(slow, 0)
        # exact re-rank in a [rows, width] layout: float64 products of float32 values are exact, their sums nearly
        width = max(kk, int(counts.max()))
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(row.shape[0], device=dev) - starts.index_select(0, row)
        pi = torch.full((r_all, width), -1, dtype=torch.long, device=dev)
        pi[row, pos] = col
        v = torch.empty(r_all, kk, dtype=rdt, device=dev)
        i = torch.empty(r_all, kk, dtype=torch.long, device=dev)
        step = max(1, min(max_bytes // 4, 1 << 21) // (width * q64.shape[1] * 8))  # cache-sized key gathers
        for a in range(0, r_all, step):
            pa = pi[a:a + step]
            cand = blk.keys.index_select(0, pa.clamp_min(0).view(-1)).view(pa.shape[0], width, -1).to(rdt)
            pv = torch.bmm(cand, q64[a:a + step].unsqueeze(2)).squeeze(2).masked_fill_(pa < 0, -math.inf)
            va, p = torch.topk(pv, kk, dim=1)
            v[a:a + step], i[a:a + step] = va, pa.gather(1, p)
        slow_rows = torch.nonzero(slow).flatten()
        if slow_rows.numel():  # exact float64 search of these rows
            per = max(1, max_bytes // (8 * max(blk.n, 1)))
            for a in range(0, slow_rows.numel(), per):
                sr = slow_rows[a:a + per]
                with _intra_op_threads(threads):
                    sv, si = _exact_topk(qq[sr], blk.keys, kk, max_bytes)
                v[sr], i[sr] = sv, si
        if blk.start:
            i = torch.where(i >= 0, i + blk.start, i)
        best_v, best_i = (v, i) if best_v is None else _merge(best_v, best_i, v, i, k)
    if bool((best_i < 0).any()):  # cannot happen: every row has >= k candidates (see the module docstring)
        raise RuntimeError("internal error in cosine_topk: a query received fewer than k candidates")
    return best_v, best_i  # type: ignore[return-value]


def distance_weights(similarities: Tensor, eps: float = 1e-6, power: float = 1.0) -> Tensor:
    """Inverse cosine-distance weights ``w = (1 - s + eps) ** -power`` (distance clamped at 0)."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    dist = (1.0 - similarities.float()).clamp_min(0.0)
    return (dist + eps).pow(-power)


def weighted_vote(similarities: Tensor, labels: Tensor, num_classes: int, eps: float = 1e-6,
                  power: float = 1.0) -> tuple[Tensor, Tensor]:
    """Distance-weighted voting: ``(class [Q], normalised class scores [Q, C])`` from neighbour ``labels [Q, k]``."""
    w = distance_weights(similarities, eps, power)
    scores = torch.zeros(labels.shape[0], num_classes, dtype=w.dtype, device=w.device)
    scores.scatter_add_(1, labels.long(), w)
    scores = scores / scores.sum(dim=1, keepdim=True)
    return scores.argmax(dim=1), scores


def weighted_mean(similarities: Tensor, values: Tensor, eps: float = 1e-6, power: float = 1.0) -> Tensor:
    """Distance-weighted mean ``sum_j w_j y_j / sum_j w_j`` of neighbour ``values [Q, k]`` or ``[Q, k, V]``."""
    w = distance_weights(similarities, eps, power)
    if values.ndim == 3:
        w = w.unsqueeze(2)
    return (w * values.float()).sum(dim=1) / w.sum(dim=1)


def knn_predict(similarities: Tensor, labels: Tensor, task: Literal["classification", "regression"],
                num_classes: int | None = None, eps: float = 1e-6, power: float = 1.0) -> Tensor:
    """Class (vote) or value (weighted mean) from the sorted neighbours' similarities and labels."""
    if task == "classification":
        if num_classes is None:
            raise ValueError("num_classes is required for classification")
        return weighted_vote(similarities, labels, num_classes, eps, power)[0]
    return weighted_mean(similarities, labels, eps, power)


def model_fingerprint(model: nn.Module, extra: str = "") -> str:
    """SHA-256 over a model's class, parameter/buffer names, shapes, dtypes and values (and ``extra``).

    Two models give the same fingerprint iff they compute the same function with the same weights (up to
    hash collisions); ``extra`` distinguishes e.g. the embedding branch (``"vertical"`` / ``"horizontal"``).
    """
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}|{extra}".encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- database
class KNNDatabase:
    """Retrieval database: L2-normalised keys ``[N, D]`` with class ids ``[N]`` or regression values ``[N, V]``.

    Args:
        dim: embedding dimension ``D``.
        task: ``"classification"`` (int labels in ``[0, num_classes)``) or ``"regression"`` (float values).
        num_classes: number of classes (classification only).
        fingerprint: :func:`model_fingerprint` of the model that produced the keys (``""``: unchecked).
        value_names: names of the regression value columns (e.g. ``["rh98"]``).
        eps, weight_power: distance-weighting constants (see the module docstring).
    """

    def __init__(self, dim: int, task: Literal["classification", "regression"] = "classification",
                 num_classes: int | None = None, fingerprint: str = "", value_names: Sequence[str] | None = None,
                 eps: float = 1e-6, weight_power: float = 1.0) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if task == "classification" and (num_classes is None or num_classes < 1):
            raise ValueError(f"classification needs num_classes >= 1, got {num_classes}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.dim, self.task, self.num_classes = int(dim), task, None if num_classes is None else int(num_classes)
        self.fingerprint = str(fingerprint)
        self.value_names = list(value_names) if value_names is not None else None
        self.eps, self.weight_power = float(eps), float(weight_power)
        self._key_parts: list[Tensor] = []
        self._label_parts: list[Tensor] = []
        self._keys: Tensor | None = None
        self._labels: Tensor | None = None
        self._device_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._search_cache: dict[str, dict] = {}  # per device: the rounded key blocks of the candidate pass

    # ---------------------------------------------------------------------------- content
    def __len__(self) -> int:
        return sum(p.shape[0] for p in self._key_parts) if self._keys is None else self._keys.shape[0]

    def clear(self) -> None:
        """Remove every entry (keeps the configuration and fingerprint)."""
        self._key_parts, self._label_parts, self._keys, self._labels = [], [], None, None
        self._device_cache, self._search_cache = {}, {}

    def _consolidate(self) -> None:
        if self._keys is None:
            self._keys = torch.cat(self._key_parts) if self._key_parts else torch.empty(0, self.dim)
            dtype = torch.long if self.task == "classification" else torch.float32
            shape = (0,) if self.task == "classification" else (0, len(self.value_names or [0]))
            self._labels = torch.cat(self._label_parts) if self._label_parts else torch.empty(shape, dtype=dtype)
            self._key_parts, self._label_parts = [self._keys], [self._labels]

    @property
    def keys(self) -> Tensor:
        """``[N, D]`` L2-normalised float32 keys."""
        self._consolidate()
        return self._keys  # type: ignore[return-value]

    @property
    def labels(self) -> Tensor:
        """``[N]`` int64 class ids or ``[N, V]`` float32 values."""
        self._consolidate()
        return self._labels  # type: ignore[return-value]

    def add(self, embeddings: Tensor, labels: Tensor, fingerprint: str | None = None) -> int:
        """Add ``embeddings [N, D]`` (normalised here) with ``labels`` ``[N]`` (or ``[N, V]``); returns N.

        ``fingerprint`` (when given) must match the database's, so one database never mixes models.
        """
        self.check_fingerprint(fingerprint, "embeddings added to the database")
        keys = l2_normalize(embeddings, "database embeddings")
        if keys.shape[1] != self.dim:
            raise ValueError(f"database embeddings have D={keys.shape[1]}, the database was built for D={self.dim}")
        labels = labels.detach().cpu()
        if labels.shape[0] != keys.shape[0]:
            raise ValueError(f"{keys.shape[0]} embeddings but {labels.shape[0]} labels")
        if self.task == "classification":
            if labels.ndim != 1 or labels.is_floating_point() and not torch.equal(labels, labels.round()):
                raise ValueError(f"classification labels must be integer class ids [N], got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
            labels = labels.long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"class ids must be in [0, {self.num_classes}), got [{int(labels.min())}, "
                                 f"{int(labels.max())}] (drop ignored pixels before adding)")
        else:
            labels = labels.float()
            labels = labels.unsqueeze(1) if labels.ndim == 1 else labels
            nv = len(self.value_names) if self.value_names is not None else labels.shape[1]
            if labels.ndim != 2 or labels.shape[1] != nv:
                raise ValueError(f"regression values must be [N] or [N, {nv}], got {tuple(labels.shape)}")
            if not torch.isfinite(labels).all():
                raise ValueError("regression values contain NaN or Inf (drop unlabelled pixels before adding)")
            if self.value_names is None:
                self.value_names = [f"value{i}" for i in range(nv)]
        self._consolidate()
        self._key_parts.append(keys.cpu())
        self._label_parts.append(labels)
        self._keys = self._labels = None
        self._device_cache, self._search_cache = {}, {}
        return keys.shape[0]

    def check_fingerprint(self, fingerprint: str | None, what: str = "queries") -> None:
        """Raise when ``fingerprint`` is given, the database has one, and they differ."""
        if fingerprint is not None and self.fingerprint and fingerprint != self.fingerprint:
            raise ValueError(f"{what} come from a different model (fingerprint {fingerprint[:12]}...) than the one "
                             f"that built the retrieval database ({self.fingerprint[:12]}...): rebuild the database "
                             "with this model, or load the model the database was built with")

    # ---------------------------------------------------------------------------- statistics
    def label_mean(self) -> Tensor:
        """Mean regression value per column (the mean-predictor baseline)."""
        if self.task != "regression":
            raise ValueError("label_mean is defined for regression databases")
        self._require_entries()
        return self.labels.double().mean(0).float()

    def majority_class(self) -> int:
        """Most frequent class id (the majority-class baseline)."""
        if self.task != "classification":
            raise ValueError("majority_class is defined for classification databases")
        self._require_entries()
        return int(torch.bincount(self.labels, minlength=self.num_classes).argmax())

    def _require_entries(self) -> None:
        if len(self) == 0:
            raise ValueError("the retrieval database is empty: build it from the training split first "
                             "(e.g. `terratorch fit`), or load a saved one; no labelled pixel was added so far")

    # ---------------------------------------------------------------------------- search
    def search(self, queries: Tensor, k: int, fingerprint: str | None = None,
               max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[Tensor, Tensor]:
        """``(similarities [Q, k], indices [Q, k])`` of the ``k`` most cosine-similar keys (descending)."""
        self._require_entries()
        self.check_fingerprint(fingerprint)
        q = l2_normalize(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have D={q.shape[1]} but the database keys have D={self.dim} "
                             "(embeddings of another model or branch?)")
        if k > len(self):
            raise ValueError(f"k={k} exceeds the database size {len(self)}")
        cache = self._search_cache.setdefault(str(q.device), {})
        return cosine_topk(q, self._on(q.device)[0], k, max_chunk_bytes=max_chunk_bytes, normalized=True,
                           key_cache=cache)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Keys and labels on ``device`` (the database lives on the CPU; copies are cached per device)."""
        if device.type == "cpu":
            return self.keys, self.labels
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (self.keys.to(device), self.labels.to(device))
        return self._device_cache[key]

    def predict(self, queries: Tensor, k: int | Sequence[int] = 50, fingerprint: str | None = None,
                max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor | dict[int, Tensor]:
        """Predictions for ``queries [Q, D]``: classes ``[Q]`` or values ``[Q, V]``.

        A sequence of ``k`` values searches once with the largest and returns ``{k: prediction}`` (the top-k
        lists are sorted, so smaller ``k`` use their prefix); a ``k`` above the database size uses every entry.
        Queries are processed in memory-bounded chunks.
        """
        ks = [int(k)] if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        if not ks or min(ks) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kmax = max(ks)
        sims, idx = self.search(queries, min(kmax, len(self)), fingerprint, max_chunk_bytes)
        nb = self._on(idx.device)[1][idx]
        out = {}
        for kk in ks:
            kk_eff = min(kk, sims.shape[1])
            out[kk] = knn_predict(sims[:, :kk_eff], nb[:, :kk_eff], self.task, self.num_classes, self.eps,
                                  self.weight_power)
        return out[ks[0]] if isinstance(k, (int, np.integer)) else out

    def predict_map(self, embeddings: Tensor, k: int | Sequence[int] = 50, fingerprint: str | None = None,
                    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    pixels_per_chunk: int = 1 << 18) -> Tensor | dict[int, Tensor]:
        """Dense predictions for an embedding map ``[B, D, H, W]``: ``[B, H, W]`` classes or ``[B, V, H, W]``.

        Pixels are classified in chunks of ``pixels_per_chunk`` (memory-bounded maps over large images).
        """
        if not isinstance(embeddings, Tensor) or embeddings.ndim != 4:
            raise ValueError(f"predict_map expects embeddings [B, D, H, W], got "
                             f"{tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)}")
        b, d, h, w = embeddings.shape
        flat = embeddings.detach().permute(0, 2, 3, 1).reshape(-1, d)
        ks = [int(k)] if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        parts: dict[int, list[Tensor]] = {kk: [] for kk in ks}
        for s in range(0, flat.shape[0], pixels_per_chunk):
            pred = self.predict(flat[s:s + pixels_per_chunk], ks, fingerprint, max_chunk_bytes)
            for kk in ks:
                parts[kk].append(pred[kk])
        maps = {}
        for kk in ks:
            p = torch.cat(parts[kk])
            maps[kk] = p.view(b, h, w) if self.task == "classification" else p.view(b, h, w, -1).permute(0, 3, 1, 2)
        return maps[ks[0]] if isinstance(k, (int, np.integer)) else maps

    # ---------------------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable configuration stored with the arrays."""
        return {"format": "terratorch_eoplugins.KNNDatabase", "version": _FORMAT_VERSION, "dim": self.dim,
                "task": self.task, "num_classes": self.num_classes, "fingerprint": self.fingerprint,
                "value_names": self.value_names, "eps": self.eps, "weight_power": self.weight_power}

    def state(self) -> dict[str, Any]:
        """Arrays + metadata (for Lightning checkpoints)."""
        return {"keys": self.keys.clone(), "labels": self.labels.clone(), "metadata": self.metadata()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> KNNDatabase:
        """Inverse of :meth:`state`."""
        meta = dict(state["metadata"])
        db = cls(meta["dim"], meta["task"], meta["num_classes"], meta["fingerprint"], meta["value_names"],
                 meta["eps"], meta["weight_power"])
        keys, labels = torch.as_tensor(state["keys"]).float(), torch.as_tensor(state["labels"])
        if keys.ndim != 2 or keys.shape[1] != db.dim or labels.shape[0] != keys.shape[0]:
            raise ValueError(f"inconsistent database state: keys {tuple(keys.shape)}, labels {tuple(labels.shape)}, "
                             f"dim {db.dim}")
        db._key_parts = [keys]
        db._label_parts = [labels.long() if db.task == "classification" else labels.float()]
        return db

    def save(self, path: str | Path) -> Path:
        """Write ``keys``, ``labels`` and the JSON metadata to an ``.npz`` file (no pickle)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            np.savez(fh, keys=self.keys.numpy(), labels=self.labels.numpy(),
                     metadata=np.array(json.dumps(self.metadata())))
        return p

    @classmethod
    def load(cls, path: str | Path) -> KNNDatabase:
        """Read a database written by :meth:`save`."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"retrieval database not found: {str(p)!r}")
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [n for n in ("keys", "labels", "metadata") if n not in z.files]
                if missing:
                    raise ValueError(f"{p}: not a KNN database (missing arrays {missing})")
                meta = json.loads(str(z["metadata"]))
                keys, labels = torch.from_numpy(z["keys"].copy()), torch.from_numpy(z["labels"].copy())
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            raise ValueError(f"{p}: cannot be read as a KNN database NPZ ({err})") from None
        if meta.get("format") != "terratorch_eoplugins.KNNDatabase":
            raise ValueError(f"{p}: metadata does not describe a terratorch_eoplugins KNN database")
        try:
            return cls.from_state({"keys": keys, "labels": labels, "metadata": meta})
        except (KeyError, ValueError) as err:
            raise ValueError(f"{p}: {err}") from None

    def __repr__(self) -> str:
        return (f"KNNDatabase(n={len(self)}, dim={self.dim}, task={self.task!r}, num_classes={self.num_classes}, "
                f"fingerprint={self.fingerprint[:12]!r})")

