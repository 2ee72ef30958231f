"""Benchmark: faiss exact inner-product search vs numpy brute force, and HNSW / IVF speed and recall.

Synthetic clustered unit vectors (a mixture of class centres plus noise, closer to real embeddings
than iid Gaussian noise, on which every ANN index struggles). Times are wall-clock seconds with the
index build reported separately from the search. Usage:
    python3 benchmarks/bench_search.py [--sizes 10000 100000] [--dim 256] [--queries 1000] [--k 50]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from fashlib import metrics


def clustered(n: int, dim: int, centres: np.ndarray, seed: int) -> np.ndarray:
    """n unit vectors around randomly chosen rows of ``centres``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))  # norm ~0.6 vs ~1 centres
    x = centres[rng.integers(0, len(centres), n)] + noise
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def numpy_topk(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: matrix product, argpartition for the top k, argsort inside the top k."""
    sims = query @ gallery.T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(sims, part, 1)
    order = np.argsort(-part_scores, axis=1)
    return np.take_along_axis(part_scores, order, 1), np.take_along_axis(part, order, 1)


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(best wall time over ``repeat`` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, out


def overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found by the approximate top-k."""
    return float(np.mean([len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact)]) / exact.shape[1])


def run(sizes: list[int], dim: int, n_queries: int, k: int, seed: int = 0) -> list[dict]:
    """Time every method on every gallery size (200 clusters); returns one row per (size, method)."""
    centres = np.random.default_rng(seed).standard_normal((200, dim)).astype(np.float32) / np.sqrt(dim)
    rows = []
    for n in sizes:
        gallery = clustered(n, dim, centres, seed + 1)
        query = clustered(n_queries, dim, centres, seed + 2)
        t_np, (_, idx_np) = timed(numpy_topk, query, gallery, k, repeat=2)
        build, index = timed(metrics.build_index, gallery, "flat", k=k)
        t_flat, (_, exact) = timed(index.search, query, k, repeat=2)
        rows.append(
            dict(n=n, method="numpy matmul+argpartition", build=0.0, search=t_np, recall=overlap(idx_np, exact))
        )
        rows.append(dict(n=n, method="faiss IndexFlatIP", build=build, search=t_flat, recall=1.0))
        nlist = int(4 * np.sqrt(n))
        for nprobe in (8, 32):
            build, index = timed(metrics.build_index, gallery, "ivf", k=k, nlist=nlist, nprobe=nprobe)
            t, (_, idx) = timed(index.search, query, k, repeat=2)
            rows.append(
                dict(
                    n=n,
                    method=f"IVFFlat nlist={nlist} nprobe={nprobe}",
                    build=build,
                    search=t,
                    recall=overlap(idx, exact),
                )
            )
        build, index = timed(metrics.build_index, gallery, "hnsw", k=k, M=16, efConstruction=40)
        for ef in (64, 128):
            index.hnsw.efSearch = ef
            t, (_, idx) = timed(index.search, query, k, repeat=2)
            rows.append(
                dict(n=n, method=f"HNSWFlat M=16 efSearch={ef}", build=build, search=t, recall=overlap(idx, exact))
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args()
    print(
        f"dim={args.dim} queries={args.queries} k={args.k} faiss={faiss.__version__} "
        f"threads={faiss.omp_get_max_threads()}"
    )
    print(f"{'gallery':>8} {'method':<34} {'build s':>8} {'search s':>9} {'q/s':>9} {'recall@k':>9}")
    for r in run(args.sizes, args.dim, args.queries, args.k):
        print(
            f"{r['n']:>8} {r['method']:<34} {r['build']:>8.2f} {r['search']:>9.3f} "
            f"{args.queries / r['search']:>9.0f} {r['recall']:>9.3f}"
        )


if __name__ == "__main__":
    main()
