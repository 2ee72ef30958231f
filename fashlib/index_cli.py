"""Command line of fashlib.index: build, update, query and serve an index of a catalogue of photos.

python3 -m fashlib.index build FOLDER --model MODEL --out INDEX
python3 -m fashlib.index update INDEX
python3 -m fashlib.index query INDEX PHOTO [PHOTO ...] --k 10 [--json] [--html FILE]
python3 -m fashlib.index serve INDEX [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import index as catalogue
from .models import PretrainedWeightsError
from .saved_model import SavedModelError

MODEL_HELP = (
    "a saved model folder (fashlib.saved_model.save_embedder; chapter 05 writes "
    "runs/book/05_recall_at_k_results/model) or a timm backbone name with offline weights, e.g. "
    "tf_efficientnet_lite0 (frozen ImageNet features)"
)


STALE_MARK = "(changed since indexed: run update)"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a number of results, a batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m fashlib.index",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index every photo of a folder (recursive) or a CSV table with a 'path' column")
    b.add_argument("source", metavar="FOLDER", help="catalogue folder (.jpg .jpeg .png .webp, recursive) or CSV")
    b.add_argument("--model", required=True, help=MODEL_HELP)
    b.add_argument("--out", required=True, help="index folder to write (created or replaced)")
    b.add_argument(
        "--exact-max",
        type=int,
        default=catalogue.EXACT_MAX,
        help="exact search up to this many photos, an approximate index above (default %(default)s)",
    )
    b.add_argument(
        "--approx",
        choices=sorted(catalogue.APPROX_OPTIONS),
        default="hnsw",
        help="approximate index above --exact-max (default %(default)s)",
    )
    b.add_argument("--batch-size", type=positive_int, default=16, help="photos per forward pass (default %(default)s)")
    u = sub.add_parser("update", help="embed new or changed photos only, drop deleted ones")
    u.add_argument("index", metavar="INDEX", help="index folder written by build")
    u.add_argument("--model", default=None, help="check against this model (default: the one in the manifest)")
    u.add_argument(
        "--source",
        metavar="FOLDER",
        default=None,
        help="the catalogue folder or CSV (default: the one it was built from; give the new place of a "
        "moved catalogue)",
    )
    u.add_argument("--batch-size", type=positive_int, default=16, help="photos per forward pass (default %(default)s)")
    q = sub.add_parser("query", help="the k most similar catalogue photos of each query photo")
    q.add_argument("index", metavar="INDEX", help="index folder written by build")
    q.add_argument("photos", metavar="PHOTO", nargs="+", help="query photo files")
    q.add_argument("--k", type=positive_int, default=10, help="results per photo (default %(default)s)")
    q.add_argument("--model", default=None, help="check against this model (default: the one in the manifest)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument(
        "--html",
        metavar="FILE",
        default=None,
        help="also write a self-contained HTML contact sheet (base64 thumbnails) to FILE",
    )
    s = sub.add_parser("serve", help="a local web page: drop a photo, see the top-k catalogue photos")
    s.add_argument("index", metavar="INDEX", help="index folder written by build")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    s.add_argument("--k", type=positive_int, default=10, help="results per photo (default %(default)s)")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (default %(default)s)")
    s.add_argument("--model", default=None, help="check against this model (default: the one in the manifest)")
    return p


def summary(idx: catalogue.CatalogueIndex) -> str:
    m = idx.manifest
    info = m["index"]
    recall = "" if info["type"] == "flat" else f", recall@10 vs exact {info['recall_at_10']:.3f}"
    skipped = m["skipped"]
    lines = [
        f"index {idx.folder}: {len(idx)} photos of {m['source']['root']}, model {m['model']['description']}, "
        f"{info['type']} search{recall}"
    ]
    if skipped:
        lines.append(
            f"skipped {len(skipped)} files: "
            + "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:10])
            + (" ..." if len(skipped) > 10 else "")
            + f" (all listed in {idx.folder / catalogue.MANIFEST})"
        )
    if len(idx) == 0:
        lines.append(f"warning: no photo of {m['source']['root']} could be indexed (.jpg .jpeg .png .webp, recursive)")
    return "\n".join(lines)


def table(photos: Sequence[str], results: Sequence[Sequence[dict]]) -> str:
    lines = [f"{'photo':<30} {'rank':>4} {'score':>7}  path"]
    for photo, hits in zip(photos, results):
        lines += [
            f"{Path(photo).name[-30:]:<30} {h['rank']:>4} {h['score']:>7.4f}  {h['path']}"
            + (f"  {STALE_MARK}" if h.get("stale") else "")
            for h in hits
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "build":
            start = time.perf_counter()
            idx = catalogue.build(
                args.source,
                args.model,
                args.out,
                exact_max=args.exact_max,
                approx=args.approx,
                batch_size=args.batch_size,
            )
            print(summary(idx) + f"\nbuilt in {time.perf_counter() - start:.1f} s")
        elif args.command == "update":
            idx, report = catalogue.update(args.index, args.model, args.source, batch_size=args.batch_size)
            print(summary(idx) + "\n" + ", ".join(f"{k} {v}" for k, v in report.items()))
        elif args.command == "query":
            idx = catalogue.open_index(args.index, args.model)
            results = idx.query(args.photos, k=args.k)
            print(
                json.dumps([{"photo": p, "results": r} for p, r in zip(args.photos, results)], indent=1)
                if args.json
                else table(args.photos, results)
            )
            stale = sorted({h["path"] for hits in results for h in hits if h["stale"]})
            if stale:
                print(
                    f"warning: {len(stale)} results changed or were deleted since the index was built, so their "
                    f"scores are the old photos': {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}; run "
                    f"python3 -m fashlib.index update {args.index}",
                    file=sys.stderr,
                )
            if args.html:
                from .serve import contact_sheet

                Path(args.html).write_text(contact_sheet(idx, args.photos, results))
                print(f"contact sheet written to {args.html}", file=sys.stderr)
        else:
            from .serve import create_app

            idx = catalogue.open_index(args.index, args.model)
            print(summary(idx) + f"\nserving on http://{args.host}:{args.port}/ (Ctrl+C stops)")
            create_app(idx, k=args.k, max_upload_mb=args.max_upload_mb).run(host=args.host, port=args.port)
    except (
        catalogue.CatalogueIndexError,
        PretrainedWeightsError,
        SavedModelError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
