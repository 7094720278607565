"""Zero-shot KNN retrieval benchmark: :class:`~terratorch_eoplugins.nn.knn.KNNDatabase` vs faiss ``IndexFlatIP``.

DUNIA's zero-shot classifier (appendix H.6, Table H6) classifies every pixel of a map by exact cosine
top-k retrieval in a database of L2-normalised pixel embeddings followed by distance-weighted voting. This
script times classifying ``--queries`` pixels (default 1M) against a ``--database``-entry database (default
256K = 2^18) with ``--k`` neighbours (default 50) and ``D = --dim`` (64, DUNIA's ``D_p``), in one process on the
same data and thread count:

* ``ours``: ``KNNDatabase.search`` + voting on ``--device`` (default ``cpu``): a bfloat16 candidate pass (one
  ``[keys, queries]`` matrix product per tile, two-level group maxima in the integer order of the bit patterns)
  whose candidate threshold comes from a proven bound on the bfloat16 error, then an exact float64 re-rank of
  the candidates (module docstring of :mod:`terratorch_eoplugins.nn.knn`: why no neighbour is missed); the
  result is the exact top-k whatever ``torch.get_float32_matmul_precision()`` says, which this script sets to
  ``--matmul-precision`` (default ``medium``, what ``import terratorch`` sets);
* ``faiss``: ``faiss.IndexFlatIP.search`` on the CPU (exact float32 inner-product search, its BLAS + heap path) on
  the same normalised vectors, followed by the same voting.

Both implementations receive the same already-normalised float32 data; the database's rounded keys are prepared
outside the timed search (faiss's ``index.add`` too). Each pass is timed ``--repeats`` times alternately (best
time reported). Printed: search and total wall-clock seconds per implementation and the process CPU seconds they
used (all threads; on a shared machine CPU time is the steadier measure), the ratios faiss / ours (> 1 means ours
is faster), and neighbour agreement: the share of queries whose K-neighbour *sets* are identical, the share of
identical ordered index lists, and for every differing query whether the difference is a tie (the float64
similarities of the differing neighbours all lie within ``--tie-tol`` of the K-th similarity, so both answers are
correct top-K lists; faiss ranks by float32 similarities, ours by float64 ones).

    python benchmarks/knn_retrieval.py --queries 65536 --threads 2   # quick run (~3 min on 2 busy cores)
    python benchmarks/knn_retrieval.py                               # 1M queries x 256K database, K = 50
    python benchmarks/knn_retrieval.py --device cuda                 # ours on the GPU, faiss on the CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from terratorch_eoplugins.nn.knn import KNNDatabase, weighted_vote


def _unit(n: int, d: int, gen: torch.Generator, clustered: bool) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    if clustered:  # embedding-like data: 256 cluster centres + noise
        centres = torch.randn(256, d, generator=torch.Generator().manual_seed(123))
        x = centres[torch.randint(0, 256, (n,), generator=gen)] + 0.3 * x
    return torch.nn.functional.normalize(x, dim=1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=1 << 20, help="query pixels (default 1M)")
    ap.add_argument("--database", type=int, default=1 << 18, help="database entries (default 256K)")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension (DUNIA D_p = 64)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--classes", type=int, default=19, help="classes of the database labels")
    ap.add_argument("--threads", type=int, default=2, help="threads for both torch and faiss")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--chunk-mb", type=float, default=64, help="bound of one similarity block (MiB)")
    ap.add_argument("--data", choices=["gaussian", "clustered"], default="gaussian")
    ap.add_argument("--tie-tol", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device of our search (faiss always runs on the CPU)")
    ap.add_argument("--matmul-precision", default="medium", choices=["highest", "high", "medium"],
                    help="torch float32 matmul precision in force (the result must not depend on it)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    import faiss

    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    faiss.omp_set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    keys = _unit(args.database, args.dim, gen, args.data == "clustered")
    queries = _unit(args.queries, args.dim, gen, args.data == "clustered")
    labels = torch.randint(0, args.classes, (args.database,), generator=gen)
    db = KNNDatabase(args.dim, "classification", num_classes=args.classes)
    db.add(keys, labels)
    index = faiss.IndexFlatIP(args.dim)
    index.add(keys.numpy())
    chunk_bytes = int(args.chunk_mb * 2**20)
    q_dev, labels_dev = queries.to(device), db.labels.to(device)
    db.search(q_dev[:1], args.k, max_chunk_bytes=chunk_bytes)  # prepares (and caches) the rounded keys
    print(f"queries={args.queries} database={args.database} dim={args.dim} k={args.k} threads={args.threads} "
          f"data={args.data} device={device} matmul_precision={args.matmul_precision} torch={torch.__version__} "
          f"faiss={faiss.__version__}", flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = {f"{impl}_{what}": float("inf") for impl in ("ours", "faiss") for what in ("search", "total", "cpu")}
    for rep in range(args.repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        sims_o, idx_o = db.search(q_dev, args.k, max_chunk_bytes=chunk_bytes)
        sync()
        t1 = time.perf_counter()
        pred_o = weighted_vote(sims_o, labels_dev[idx_o], args.classes, db.eps, db.weight_power)[0]
        sims_o, idx_o, pred_o = sims_o.cpu(), idx_o.cpu(), pred_o.cpu()
        t2, c2 = time.perf_counter(), time.process_time()
        best["ours_cpu"] = min(best["ours_cpu"], c2 - c0)
        best["ours_search"] = min(best["ours_search"], t1 - t0)
        best["ours_total"] = min(best["ours_total"], t2 - t0)
        print(f"[{rep}] ours : search {t1 - t0:8.2f} s  total {t2 - t0:8.2f} s  cpu {c2 - c0:8.2f} s", flush=True)
        c0, t0 = time.process_time(), time.perf_counter()
        sims_f, idx_f = index.search(queries.numpy(), args.k)
        t1 = time.perf_counter()
        sims_f, idx_f = torch.from_numpy(sims_f), torch.from_numpy(idx_f)
        pred_f = weighted_vote(sims_f, db.labels[idx_f], args.classes, db.eps, db.weight_power)[0]
        t2, c2 = time.perf_counter(), time.process_time()
        best["faiss_cpu"] = min(best["faiss_cpu"], c2 - c0)
        best["faiss_search"] = min(best["faiss_search"], t1 - t0)
        best["faiss_total"] = min(best["faiss_total"], t2 - t0)
        print(f"[{rep}] faiss: search {t1 - t0:8.2f} s  total {t2 - t0:8.2f} s  cpu {c2 - c0:8.2f} s", flush=True)

    # ------------------------------------------------------------------ agreement
    same_order = (idx_o == idx_f).all(dim=1)
    so, _ = idx_o.sort(dim=1)
    sf, _ = idx_f.sort(dim=1)
    same_set = (so == sf).all(dim=1)
    differ = torch.nonzero(~same_set).flatten()
    ties = 0
    for qi in differ.tolist():
        a, b = set(idx_o[qi].tolist()), set(idx_f[qi].tolist())
        only = torch.tensor(sorted(a ^ b))
        q64 = queries[qi].double()
        s_only = keys[only].double() @ q64
        kth = (keys[idx_o[qi]].double() @ q64).min()
        ties += bool(((s_only - kth).abs() <= args.tie_tol).all())
    res = {
        "queries": args.queries, "database": args.database, "dim": args.dim, "k": args.k, "threads": args.threads,
        "data": args.data, "device": str(device), "matmul_precision": args.matmul_precision,
        **{k: round(v, 3) for k, v in best.items()},
        "ratio_search_faiss_over_ours": round(best["faiss_search"] / best["ours_search"], 2),
        "ratio_total_faiss_over_ours": round(best["faiss_total"] / best["ours_total"], 2),
        "ratio_cpu_faiss_over_ours": round(best["faiss_cpu"] / best["ours_cpu"], 2),
        "same_neighbour_set": float(same_set.double().mean()),
        "same_ordered_indices": float(same_order.double().mean()),
        "differing_queries": int(differ.numel()), "differing_explained_by_ties": ties,
        "same_predicted_class": float((pred_o == pred_f).double().mean()),
        "max_abs_similarity_difference": float((sims_o - sims_f).abs().max()),
    }
    print(f"\n{'':8s}{'search s':>10s}{'total s':>10s}{'cpu s':>10s}")
    for impl in ("ours", "faiss"):
        print(f"{impl:8s}{best[impl + '_search']:10.2f}{best[impl + '_total']:10.2f}{best[impl + '_cpu']:10.2f}")
    print(f"ratio faiss/ours: search {res['ratio_search_faiss_over_ours']}x, "
          f"total {res['ratio_total_faiss_over_ours']}x, cpu {res['ratio_cpu_faiss_over_ours']}x (> 1: ours faster)")
    print(f"same neighbour set: {100 * res['same_neighbour_set']:.4f}% of queries; same ordered indices: "
          f"{100 * res['same_ordered_indices']:.4f}%; differing queries: {res['differing_queries']} "
          f"({res['differing_explained_by_ties']} explained by ties within {args.tie_tol:g}); "
          f"same predicted class: {100 * res['same_predicted_class']:.4f}%; "
          f"max |similarity difference|: {res['max_abs_similarity_difference']:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
