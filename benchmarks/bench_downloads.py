"""Downloads of 200 images under 100 ms per-request latency: nvmeta (Snakemake) vs nilearn's fetch_neurovault_ids.

Side by side in one run, against the same fixture server (:class:`nvmeta.testing.server.FixtureServer`,
``latency=0.1``: every request, redirects included, waits 100 ms before the reply) serving a synthetic
snapshot (``benchmarks/synth_snapshot.py``: 200 images in 18 collections of 1-30 images, or in
collections of ``--collection-size`` images, 50 distinct files of 0.3-2.3 MB reused through hard links):

- **nvmeta** (``--select terms``, default): ``python -m snakemake --cores 2 --configfile bench.yaml
  results/analyses/bench/selection.tsv`` (the query: terms with ``max_images: 100000``, every collection
  listed), then the same command with the 200 ``results/images/{id}/metadata.json`` as targets, in a
  fresh copy of the workflow, with the default profile (``profiles/default``) and the default
  politeness bound ``neurovault.max_connections: 2`` (the ``nv_connections`` resource: at most 2
  downloads at once). Requests of both runs are counted: the downloads reuse the records the
  listing returned (``results/records/``), so each costs one request, its file. With
  ``--select ids``: explicit ``image_ids``, the same two runs (the query asks for the first id's
  record of each collection, then lists that collection for the others; the downloads reuse the
  records). ``--select ids-downloads``: explicit ``image_ids``, the downloads only (the query is not
  run, so each download asks for its record). Snakemake start-up and DAG
  building are included.
- **nilearn**: ``nilearn.datasets.fetch_neurovault_ids(image_ids=ids, data_dir=tmp)`` in this process, with
  ``_NEUROVAULT_BASE_URL`` (and the collections/images URLs derived from it at import) pointed at the
  fixture server. nilearn downloads one request at a time (image record, collection record once per
  collection, file; its URLs lack the trailing slash so the API answers each with a 301 first).

Both are checked: every image's map is on disk and every request reached the fixture server (counted
there, per client). The order of the two runs alternates between repeats.

Usage: ``python benchmarks/bench_downloads.py [--n-images 200] [--latency 0.1] [--repeat 1]
[--select terms|ids|ids-downloads] [--collection-size K]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_snapshot import load_note, make_snapshot, make_workdir, snakemake  # noqa: E402


def run_nvmeta(srv, root: Path, ids: list[int], tmp: Path, tag: str, select: str = "terms") -> dict:
    """nvmeta: ``select="terms"``: the query (terms, every collection listed) then the downloads,
    requests of both counted (the downloads reuse the listing's records); ``"ids"``: the same with
    explicit ``image_ids``; ``"ids-downloads"``: explicit ``image_ids``, downloads only (each asks
    for its record)."""
    analysis = {"image_ids": ids} if select.startswith("ids") else {"max_images": 100_000}
    wf = make_workdir(
        tmp / f"wf_{tag}_{select}",
        {
            "neurovault": {"url": srv.url, "mode": "download_new"},
            "template": {"mask": "mni152_2mm"},
            "analyses": {"bench": analysis},
        },
    )
    targets = [f"results/images/{i}/metadata.json" for i in ids]
    srv.reset_log()
    secs = 0.0
    if select in ("terms", "ids"):
        secs, _ = snakemake(wf, "results/analyses/bench/selection.tsv", cores=2)
        sel = (wf / "results/analyses/bench/selection.tsv").read_text().splitlines()[1:]
        got = sorted(int(line.split("\t", 1)[0]) for line in sel)
        if got != sorted(ids):
            raise RuntimeError(f"the query selected {len(got)} of {len(ids)} images")
    n_query = len(srv.requests)
    secs_dl, _ = snakemake(wf, *targets, cores=2)
    secs += secs_dl
    n_req = len(srv.requests)
    n_record = sum(1 for p in srv.requests[n_query:] if p.startswith("/api/"))
    max_in_flight = srv.max_in_flight
    ok = 0
    for i in ids:
        meta = json.loads((wf / "results" / "images" / str(i) / "metadata.json").read_text())
        ok += (
            meta["nvmeta"]["status"] == "ok" and (wf / "results" / "images" / str(i) / "map.nii.gz").is_file()
        )
    return {
        "seconds": secs,
        "requests": n_req,
        "query_requests": n_query,
        "download_api_requests": n_record,
        "ok": ok,
        "max_in_flight": max_in_flight,
    }


def run_nilearn(srv, ids: list[int], tmp: Path, tag: str) -> dict:
    from nilearn.datasets import neurovault as nv

    base = srv.url
    nv._NEUROVAULT_BASE_URL = base
    nv._NEUROVAULT_COLLECTIONS_URL = base + "collections/"
    nv._NEUROVAULT_IMAGES_URL = base + "images/"
    data_dir = tmp / f"nilearn_{tag}"
    data_dir.mkdir()
    srv.reset_log()
    t0 = time.perf_counter()
    res = nv.fetch_neurovault_ids(image_ids=ids, data_dir=str(data_dir), verbose=0)
    secs = time.perf_counter() - t0
    files = [Path(f) for f in res["images"]]
    ok = sum(f.is_file() and f.stat().st_size > 0 and str(f).startswith(str(data_dir)) for f in files)
    got = sorted(int(m["id"]) for m in res["images_meta"])
    if got != sorted(ids):
        raise RuntimeError(f"nilearn fetched {len(got)} of {len(ids)} images")
    return {"seconds": secs, "requests": len(srv.requests), "ok": ok, "max_in_flight": srv.max_in_flight}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument(
        "--select",
        choices=("terms", "ids", "ids-downloads"),
        default="terms",
        help="nvmeta selects by terms (query + downloads counted; default), by explicit image_ids (the same), "
        "or by explicit image_ids without the query (downloads only)",
    )
    p.add_argument(
        "--collection-size",
        type=int,
        default=None,
        help="images per collection (default: 1-30 drawn per collection, 18 collections at 200 images); "
        "a larger size means fewer collections, hence fewer listing pages",
    )
    args = p.parse_args()

    from nvmeta.testing.server import FixtureServer

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        snap = make_snapshot(
            tmp / "snapshot", args.n_images, pool=50, seed=0, collection_size=args.collection_size
        )
        ids = snap["image_ids"]
        total_mb = sum(r["file_size"] for r in snap["images"]) / 1e6
        print(
            f"{len(ids)} images in {len(snap['collection_ids'])} collections, {total_mb:.0f} MB of maps; "
            f"latency {args.latency * 1000:.0f} ms per request; nvmeta max_connections 2; {load_note()}"
        )
        rows = []
        with FixtureServer(tmp / "snapshot", latency=args.latency) as srv:
            for r in range(args.repeat):
                order = ["nvmeta", "nilearn"] if r % 2 == 0 else ["nilearn", "nvmeta"]
                res = {}
                for which in order:
                    if which == "nvmeta":
                        res[which] = run_nvmeta(srv, tmp / "snapshot", ids, tmp, f"{r}", args.select)
                    else:
                        res[which] = run_nilearn(srv, ids, tmp, f"{r}")
                    d = res[which]
                    extra = (
                        f" [query {d['query_requests']}, downloads {d['requests'] - d['query_requests']} of "
                        f"which {d['download_api_requests']} API]"
                        if which == "nvmeta"
                        else ""
                    )
                    print(
                        f"  run {r + 1} {which:8s} {d['seconds']:7.1f} s  {d['requests']:4d} requests "
                        f"({d['requests'] / len(ids):.3f} per image){extra} "
                        f"(max {d['max_in_flight']} in flight)  {d['ok']}/{len(ids)} maps on disk"
                    )
                    if d["ok"] != len(ids):
                        raise RuntimeError(f"{which}: only {d['ok']} of {len(ids)} maps downloaded")
                rows.append(res)
        t_nv = statistics.median(r["nvmeta"]["seconds"] for r in rows)
        t_nl = statistics.median(r["nilearn"]["seconds"] for r in rows)
        what = {
            "terms": "query (terms) + downloads",
            "ids": "query (explicit ids) + downloads",
            "ids-downloads": "downloads (explicit ids, query excluded)",
        }[args.select]
        print(
            f"{len(ids)} images at {args.latency * 1000:.0f} ms latency: nvmeta {what} {t_nv:.1f} s "
            f"({rows[0]['nvmeta']['requests']} requests, {rows[0]['nvmeta']['requests'] / len(ids):.3f} per "
            f"image), nilearn fetch_neurovault_ids {t_nl:.1f} s "
            f"({rows[0]['nilearn']['requests']} requests): nvmeta is {t_nl / t_nv:.2f}x faster "
            f"(time ratio nvmeta/nilearn {t_nv / t_nl:.2f}); {load_note()}"
        )


if __name__ == "__main__":
    main()
