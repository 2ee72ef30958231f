"""Benchmark: exact vs IVF-PQ vs PCA+IVF-SQ vs HNSW faiss indexes for a catalogue of unit vectors of the model's size.

For each catalogue size: build time, memory per vector (bytes of the serialised index / N, codes, ids, graph
links and coarse centroids included), query latency p50/p99 at batch 1 (single thread, `--latency-queries`
queries one by one), and recall@10 against exact search (mean |approx top-10 & exact top-10| / 10 over
`--queries` queries). Approximate indexes are swept over their search-time knob (nprobe, efSearch).

`--factory` indexes (faiss index_factory strings, "{nlist}" replaced by ~4 sqrt(N), a power of 2) are also
swept over nprobe, then run once more at the smallest nprobe whose recall@10 reaches `--tune-recall` on a
separate sample of tuning queries (other photos, other seed): that row ("tuned") is the honest operating point,
its nprobe chosen without looking at the measurement queries. The default, "PCA64,IVF{nlist},SQ8", projects
onto the 64 principal directions of a training sample (whitening off), assigns to IVF cells on that space and
stores each vector as 64 one-byte scalar-quantised residual components (+ its 8-byte id).

Measured with the command below (faiss 1.15.1, 2 cores shared with ~4 other processes; exact p50 95.9 ms at 1M):
PCA64,IVF4096,SQ8, nprobe 256 chosen on the tuning queries: 73 bytes per vector, recall@10 0.962, p50 0.79 ms
= 121x exact, built in 92 s: the three 1M targets (recall >= 0.95, >= 20x, <= 128 B) are met. IVF1024,PQ64
(0.82 at nprobe 64) and IVF-PQ64+32 with PQ re-ranking (0.89) miss the recall; HNSW16,Flat reaches it (100k) at 1.2
KB per vector. A conservative variant keeping more directions (second run, `--sizes 1000000 --pq-bytes --pqr
--hnsw-max-n 0 --factory "PCA112,IVF{nlist},SQ8" "PCA128,IVF{nlist},SQ6"`, exact p50 58.6 ms): PCA112,IVF4096,SQ8
122 B, recall@10 0.963 at tuned nprobe 256, 54x, met; PCA128,IVF4096,SQ6 107 B, 0.960 at nprobe 512, only 19.5x.
On 'uniform' data (no structure, 100k) the same index collapses (recall@10 0.01 at every nprobe:
64 of 256 isotropic directions keep a quarter of each inner product's variance); PCA only pays on embeddings whose
variance lies in few directions, which is what the index's measured recall (fashlib.index "ivf-sq") checks.

Synthetic data (`--data`):
  catalogue  products with several photos each: product centres in a `--latent`-dimensional subspace of R^dim,
             photos = centre + within-product noise, L2-normalised; queries are new photos of known products.
             Trained embeddings have such low intrinsic dimension; this is the realistic case.
  uniform    iid Gaussian directions: no structure at all, the worst case for every compressed index.

Usage (the run reported in the README, 2 shared CPU cores, ~18 min; HNSW skipped at 1M, its build alone takes
tens of minutes there):
    nice -n 10 python3 benchmarks/bench_index.py --sizes 100000 1000000 --hnsw-max-n 100000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import faiss
import numpy as np

TARGET_RECALL, TARGET_SPEEDUP, TARGET_BYTES = 0.95, 20.0, 128


def normalise(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def catalogue_vectors(items: np.ndarray, centres: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Unit vectors of photos of products `items`: product centre (rows of `centres`, latent space) + noise,
    mapped into R^dim by a fixed orthonormal basis, plus a little isotropic noise."""
    latent = centres.shape[1]
    basis = np.linalg.qr(np.random.default_rng(1234).standard_normal((dim, latent)))[0].astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((len(items), dim), dtype=np.float32)
    for start in range(0, len(items), 100_000):
        part = items[start : start + 100_000]
        z = centres[part] + 0.35 * rng.standard_normal((len(part), latent), dtype=np.float32)
        x = z @ basis.T + 0.02 * rng.standard_normal((len(part), dim), dtype=np.float32)
        out[start : start + len(part)] = normalise(x)
    return out


def uniform_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return normalise(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))


def memory_per_vector(index: faiss.Index, n: int) -> float:
    """Bytes of the serialised index per stored vector (what it holds in memory, up to allocator slack)."""
    return len(faiss.serialize_index(index)) / n


def latencies_ms(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """(p50, p99) in ms of single-query searches on one thread."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        index.search(queries[:1], k)  # warm-up
        for q in queries:
            t0 = time.perf_counter()
            index.search(q[None, :], k)
            times.append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found in the approximate top-k (recall@k against exact search)."""
    return float(np.mean([len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact)]) / exact.shape[1])


def build_ivfpq(gallery: np.ndarray, m: int, nlist: int, train_size: int, seed: int, opq: bool) -> faiss.Index:
    """[OPQ rotation +] IVF (nlist cells) + PQ with m bytes per vector, trained on a random sample."""
    dim = gallery.shape[1]
    spec = f"IVF{nlist},PQ{m}"
    if opq:
        spec = f"OPQ{m}_{m * -(-dim // m)}," + spec
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if opq:
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        rotation.niter, rotation.max_train_points = 10, 20_000  # defaults (50 iterations, 65k points): ~1 h here
    faiss.downcast_index(faiss.extract_index_ivf(index)).pq.cp.max_points_per_centroid = 128
    sample = np.random.default_rng(seed).choice(len(gallery), size=min(train_size, len(gallery)), replace=False)
    index.train(gallery[np.sort(sample)])
    index.add(gallery)
    return index


def build_ivfpqr(gallery: np.ndarray, spec: str, nlist: int, train_size: int, seed: int) -> faiss.Index:
    """IVF + PQ (m1 bytes) whose candidates are re-ranked with a second PQ (m2 bytes) of the residual error:
    faiss IndexIVFPQR, `spec` "m1+m2", m1 + m2 bytes per vector plus its 8-byte id. It exists for the L2
    metric only, which ranks unit vectors exactly as the inner product does (|q - x|^2 = 2 - 2 q.x)."""
    index = faiss.index_factory(gallery.shape[1], f"IVF{nlist},PQ{spec}", faiss.METRIC_L2)
    for pq in (faiss.downcast_index(index).pq, faiss.downcast_index(index).refine_pq):
        pq.cp.max_points_per_centroid = 128
    sample = np.random.default_rng(seed).choice(len(gallery), size=min(train_size, len(gallery)), replace=False)
    index.train(gallery[np.sort(sample)])
    index.add(gallery)
    faiss.downcast_index(index).k_factor = 8  # re-rank 8 k candidates
    return index


def factory_nlist(n: int) -> int:
    """IVF cells for a "{nlist}" factory string: ~4 sqrt(N) rounded to a power of 2 (1M -> 4096, 100k -> 1024)."""
    return int(2 ** round(np.log2(4 * np.sqrt(n))))


def build_factory(gallery: np.ndarray, spec: str, train_size: int, seed: int) -> faiss.Index:
    """faiss.index_factory(dim, spec, L2), trained on a random sample of `train_size` rows, filled.

    L2 ranks unit vectors as the inner product does (|q - x|^2 = 2 - 2 q.x) and, unlike it, is unchanged by the
    mean that a PCA step subtracts (with the inner product, (q - m).(x - m) favours rows far from the mean m)."""
    index = faiss.index_factory(gallery.shape[1], spec, faiss.METRIC_L2)
    sample = np.random.default_rng(seed).choice(len(gallery), size=min(train_size, len(gallery)), replace=False)
    index.train(gallery[np.sort(sample)])
    index.add(gallery)
    return index


def tune_nprobe(index: faiss.Index, knobs: list[int], tune_q: np.ndarray, tune_exact: np.ndarray, target: float) -> int:
    """Smallest nprobe of `knobs` whose recall@k on the tuning queries reaches `target` (else the largest)."""
    params = faiss.ParameterSpace()
    for value in sorted(knobs):
        params.set_index_parameter(index, "nprobe", value)
        if overlap(index.search(tune_q, tune_exact.shape[1])[1], tune_exact) >= target:
            return value
    return max(knobs)


def build_hnsw(gallery: np.ndarray, m: int, ef_construction: int) -> faiss.Index:
    index = faiss.IndexHNSWFlat(gallery.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(gallery)
    return index


def sweep(
    name: str,
    index: faiss.Index,
    build_s: float,
    set_knob: Callable[[int], None],
    knobs: list[int],
    knob_name: str,
    query: np.ndarray,
    exact: np.ndarray,
    lat_q: np.ndarray,
    k: int,
    n: int,
    exact_p50: float,
) -> list[dict]:
    rows, mem = [], memory_per_vector(index, n)
    for value in knobs:
        set_knob(value)
        _, idx = index.search(query, k)
        p50, p99 = latencies_ms(index, lat_q, k)
        rows.append(
            dict(
                n=n,
                method=f"{name} {knob_name}={value}",
                build_s=build_s,
                bytes_per_vector=mem,
                p50_ms=p50,
                p99_ms=p99,
                speedup=exact_p50 / p50,
                recall_at_10=overlap(idx, exact),
            )
        )
    return rows


def run_factories(
    gallery: np.ndarray,
    query: np.ndarray,
    exact: np.ndarray,
    lat_q: np.ndarray,
    exact_p50: float,
    tuning: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
) -> list[dict]:
    """Each `--factory` index: an nprobe sweep, then the nprobe chosen on the tuning queries (row "tuned")."""
    rows, n = [], len(gallery)
    params = faiss.ParameterSpace()
    for template in args.factory:
        nlist = factory_nlist(n)
        spec = template.replace("{nlist}", str(nlist))
        t0 = time.perf_counter()
        index = build_factory(gallery, spec, max(args.train_size, 39 * nlist), args.seed)
        build = time.perf_counter() - t0
        set_nprobe = lambda v, index=index: params.set_index_parameter(index, "nprobe", v)
        rows += sweep(
            spec, index, build, set_nprobe, args.factory_nprobes, "nprobe", query, exact, lat_q, args.k, n, exact_p50
        )
        best = tune_nprobe(index, args.factory_nprobes, *tuning, args.tune_recall)
        rows += sweep(
            f"{spec} tuned", index, build, set_nprobe, [best], "nprobe", query, exact, lat_q, args.k, n, exact_p50
        )
        print("\n".join(json.dumps(r) for r in rows[-len(args.factory_nprobes) - 1 :]), flush=True)
        del index
    return rows


def make_data(n: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery (n, dim), measurement queries (--queries, dim), tuning queries (--tune-queries, dim)), float32
    unit rows; catalogue queries are new photos of random gallery products, tuning ones too (other seeds)."""
    dim = args.dim
    if args.data == "uniform":
        return (
            uniform_vectors(n, dim, args.seed + 1),
            uniform_vectors(args.queries, dim, args.seed + 2),
            uniform_vectors(args.tune_queries, dim, args.seed + 4),
        )
    n_items = max(1, n // args.photos)
    centres = np.random.default_rng(7).standard_normal((n_items, args.latent), dtype=np.float32)
    items = np.random.default_rng(args.seed).integers(0, n_items, n)
    gallery = catalogue_vectors(items, centres, dim, args.seed + 1)
    query = catalogue_vectors(
        items[np.random.default_rng(args.seed + 3).integers(0, n, args.queries)], centres, dim, args.seed + 2
    )
    tune = catalogue_vectors(
        items[np.random.default_rng(args.seed + 5).integers(0, n, args.tune_queries)], centres, dim, args.seed + 4
    )
    return gallery, query, tune


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    """Every index on one catalogue size; one row per (index, search knob)."""
    k, dim = args.k, args.dim
    gallery, query, tune_q = make_data(n, args)
    lat_q = query[: args.latency_queries]
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(gallery)
    build = time.perf_counter() - t0
    _, exact = flat.search(query, k)
    tuning = (tune_q, flat.search(tune_q, k)[1])
    p50, p99 = latencies_ms(flat, lat_q, k)
    rows = [
        dict(
            n=n,
            method="exact IndexFlatIP",
            build_s=build,
            bytes_per_vector=memory_per_vector(flat, n),
            p50_ms=p50,
            p99_ms=p99,
            speedup=1.0,
            recall_at_10=1.0,
        )
    ]
    print(json.dumps(rows[-1]), flush=True)
    del flat
    nlist = args.nlist or int(2 ** round(np.log2(np.sqrt(n))))
    train = max(args.train_size, 39 * nlist)
    ivf_indexes = [
        (
            f"{'OPQ+' if args.opq else ''}IVF{nlist},PQ{m}",
            lambda m=m: build_ivfpq(gallery, m, nlist, train, args.seed, args.opq),
        )
        for m in args.pq_bytes
    ] + [
        (f"IVF{nlist},PQ{spec} (PQ re-ranking)", lambda spec=spec: build_ivfpqr(gallery, spec, nlist, train, args.seed))
        for spec in args.pqr
    ]
    for name, make in ivf_indexes:  # built one at a time, swept over nprobe, then freed
        t0 = time.perf_counter()
        index = make()
        build = time.perf_counter() - t0
        ivf = faiss.extract_index_ivf(index)
        set_nprobe = lambda v, ivf=ivf: setattr(ivf, "nprobe", v)  # noqa: E731
        rows += sweep(name, index, build, set_nprobe, args.nprobes, "nprobe", query, exact, lat_q, k, n, p50)
        print("\n".join(json.dumps(r) for r in rows[-len(args.nprobes) :]), flush=True)
        del index
    rows += run_factories(gallery, query, exact, lat_q, p50, tuning, args)
    if n <= args.hnsw_max_n:
        t0 = time.perf_counter()
        index = build_hnsw(gallery, args.hnsw_m, args.ef_construction)
        build = time.perf_counter() - t0
        rows += sweep(
            f"HNSW{args.hnsw_m},Flat",
            index,
            build,
            lambda v: setattr(index.hnsw, "efSearch", v),
            args.ef_search,
            "efSearch",
            query,
            exact,
            lat_q,
            k,
            n,
            p50,
        )
        print("\n".join(json.dumps(r) for r in rows[-len(args.ef_search) :]), flush=True)
    return rows


def meets_targets(row: dict) -> bool:
    return (
        row["recall_at_10"] >= TARGET_RECALL
        and row["speedup"] >= TARGET_SPEEDUP
        and row["bytes_per_vector"] <= TARGET_BYTES
    )


def print_table(rows: list[dict]) -> None:
    print("\n| N | index | build s | bytes/vector | p50 ms | p99 ms | speed-up vs exact | recall@10 | targets |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['method']} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {r['p50_ms']:.3f} "
            f"| {r['p99_ms']:.3f} | {r['speedup']:.1f}x | {r['recall_at_10']:.3f} | "
            f"{'met' if meets_targets(r) else ''} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="catalogue sizes")
    parser.add_argument("--dim", type=int, default=256, help="embedding size (the book's model: 256)")
    parser.add_argument("--data", choices=["catalogue", "uniform"], default="catalogue", help="synthetic generator")
    parser.add_argument("--latent", type=int, default=32, help="catalogue data: intrinsic dimension")
    parser.add_argument("--photos", type=int, default=5, help="catalogue data: photos per product")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@10")
    parser.add_argument("--latency-queries", type=int, default=200, help="single queries timed for p50/p99")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--pq-bytes", type=int, nargs="*", default=[64], help="PQ code bytes per vector")
    parser.add_argument(
        "--pqr",
        nargs="*",
        default=["64+32"],
        help="IVF-PQ with PQ re-ranking (IndexIVFPQR), code bytes m1+m2 per vector",
    )
    parser.add_argument(
        "--factory",
        nargs="*",
        default=["PCA64,IVF{nlist},SQ8"],
        help='faiss index_factory strings, L2 metric; "{nlist}" = ~4 sqrt(N), a power of 2',
    )
    parser.add_argument("--factory-nprobes", type=int, nargs="+", default=[64, 128, 256, 384, 512])
    parser.add_argument("--tune-queries", type=int, default=500, help="separate queries that choose nprobe")
    parser.add_argument(
        "--tune-recall", type=float, default=0.96, help="recall@10 the tuned nprobe must reach on the tuning queries"
    )
    parser.add_argument("--opq", action="store_true", help="learn an OPQ rotation before IVF-PQ (slow to train)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default ~sqrt(N), a power of 2)")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--train-size", type=int, default=50_000, help="OPQ/IVF/PQ training sample")
    parser.add_argument(
        "--hnsw-max-n",
        type=int,
        default=10**9,
        help="skip HNSW above this size (its 1M build takes tens of minutes on 2 shared cores)",
    )
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads (latency: 1 thread), data={args.data}, "
        f"dim={args.dim}, k={args.k}",
        flush=True,
    )
    rows = [row for n in args.sizes for row in run_size(n, args)]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
