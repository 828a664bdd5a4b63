"""Search your own images with a trained model: the images under --query DIR are each ranked against
those under --gallery DIR (subfolders too, any image type PIL reads; no dataset layout needed).

    python tools/search.py --checkpoint runs/sci/best.pt --query my/queries --gallery my/gallery --top 10
    python tools/search.py --checkpoint runs/sci/best.pt --query q --gallery g --labels ids.csv --save-features s.npz
    python tools/search.py --features s.npz --top 5                 # the lists again, no model needed

writes search.csv (query,rank,gallery_path,distance) and the sheets search_*.png to --out-dir; with
--labels (header path,pid[,camid][,clothes]) also the metrics (general, and cc and sc with clothes
labels), results.json (key "evaluate") and, with --visualize/--tsne, the ranked lists, CMC curve and t-SNE
(evaluate.py --visualize, tools/figures.py --tsne). In a
features file the search is one protocol named "search" (evaluate.SEARCH), its labels only when they
were given (see evaluate.save_features).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# run as `python tools/search.py`: import the project's modules, not this folder's (tools/profile.py is
# not the standard library's profile)
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import rerank as reranking  # noqa: E402
from evaluate import SEARCH, extract_features  # noqa: E402
from metrics import DEFAULT_CHUNK, SETTINGS, _cosine_distance, _unit_features, protocol_masks  # noqa: E402
from rerank import RerankConfig, _Reranked  # noqa: E402
from utils import UserError, check_stop, default_workers, write_atomic  # noqa: E402

SEARCH_TOP = 10                 # --top: gallery images listed per query
SHEET_QUERIES = 8               # queries per search_*.png sheet
LABELS_HEADER = "line 1 must be the header path,pid[,camid][,clothes] (any order)"


def folder_images(folder: str | Path, flag: str) -> list[str]:
    """Absolute paths of the images under `folder` and its subfolders (datasets.list_images: by extension,
    the formats PIL reads), sorted; hidden files and folders are left out, other files ignored (and counted)."""
    import os

    from datasets import list_images

    if not Path(folder).is_dir():
        raise UserError(f"{flag} {folder} is not a folder; pass a folder of images (subfolders are searched too)")
    found, others = list_images(str(folder), recursive=True)
    if others:
        print(f"{flag} {folder}: ignored {len(others)} files that are not images by their extension "
              f"(e.g. {others[0]})")
    if not found:
        raise UserError(f"{flag} {folder} holds no images (searched its subfolders too, for the extensions PIL "
                        f"reads: .jpg, .png, .bmp, .webp, .tif, ...); point it at a folder of images")
    return sorted(os.path.abspath(p) for p in found)


def read_labels(csv_path: str | Path, paths: list[str]) -> tuple[dict, bool, bool]:
    """--labels: ({absolute path: (line, pid, camid or None, clothes text or None)}, whether a camid column
    and a clothes column are given). Header `path,pid[,camid][,clothes]`; paths relative to the CSV's
    folder or absolute; every image of `paths` needs a row (UserError naming the first without one).
    Read by the custom dataset's reader, datasets.read_label_csv; here every bad row is an error."""
    from datasets import read_label_csv

    where = f"--labels {csv_path}"
    if not Path(csv_path).is_file():
        raise UserError(f"{where}: no such file; give a CSV with the header path,pid[,camid][,clothes] and one row "
                        f"per query and gallery image")

    def refuse(message: str, reason: str) -> None:
        raise UserError(message)

    def empty_clothes(where: str, path: str, pid: int, value: dict[str, str]) -> tuple[str, str] | None:
        if "clothes" in value and not value["clothes"]:
            return f"{where} has an empty clothes label; fill in every column of every row", "empty clothes label"
        return None

    found, columns = read_label_csv(str(csv_path), where, "", ("path", "pid"), LABELS_HEADER, refuse, empty_clothes)
    rows = {path: (line, pid, camid, clothes) for line, path, pid, camid, clothes in found}
    check_labelled(csv_path, rows, paths)
    return rows, "camid" in columns, "clothes" in columns


def check_labelled(csv_path: str | Path, rows: dict, paths: list[str]) -> None:
    """UserError naming the first of `paths` without a row in read_labels' `rows`."""
    import os

    missing = next((p for p in paths if p not in rows), None)
    if missing is not None:
        raise UserError(f"--labels {csv_path} has no row for {missing}; label every query and gallery image (paths "
                        f"relative to {os.path.dirname(os.path.abspath(csv_path))} or absolute)")


def _add_labels(query: dict, gallery: dict, rows: dict, has_clothes: bool) -> None:
    """pids, camids and clothes ids (one mapping of the (pid, clothes text) keys over both splits, as the
    custom dataset's) of the splits' paths, from read_labels. Without a camid column queries are camera 0
    and gallery images camera 1, except that an image in both splits has a camera of its own (2, 3, ...)
    in both: its match with itself is junk, its matches with the other images count."""
    keys = sorted({(rows[p][1], rows[p][3]) for split in (query, gallery) for p in split["paths"]})
    clothes_id = {key: i for i, key in enumerate(keys)}
    own = {p: 2 + i for i, p in enumerate(sorted(set(query["paths"]) & set(gallery["paths"])))}
    for split, default_cam in ((query, 0), (gallery, 1)):
        mine = [rows[p] for p in split["paths"]]
        split["pids"] = np.array([r[1] for r in mine], dtype=np.int64)
        split["camids"] = np.array([own.get(p, default_cam) if r[2] is None else r[2]
                                    for p, r in zip(split["paths"], mine)], dtype=np.int64)
        split["clothes"] = np.array([clothes_id[(r[1], r[3])] for r in mine], dtype=np.int64) if has_clothes else None
        split["clothes_names"] = np.array([r[3] for r in mine]) if has_clothes else None  # the CSV's own labels


class _FolderImages(torch.utils.data.Dataset):
    """A folder search's images with the test transform: (image, index, 0, 0); with skip_bad, a file
    that cannot be read gives (zeros, index, 1, 0) (the camid slot flags it through extract_features),
    else it is an error naming the file."""

    def __init__(self, paths: list[str], transform, img_size: tuple[int, int], skip_bad: bool):
        self.paths, self.transform, self.img_size, self.skip_bad = paths, transform, img_size, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from loaders import open_rgb

        try:
            img = open_rgb(self.paths[index])
        except UserError as exc:
            if not self.skip_bad:
                raise UserError(f"{exc}, or pass --skip-bad to skip unreadable files") from None
            return torch.zeros(3, *self.img_size), index, 1, 0
        return self.transform(img), index, 0, 0


def folder_search(model: torch.nn.Module, config, args: argparse.Namespace, device: torch.device) -> dict:
    """--query/--gallery: the search protocol {name SEARCH, mask "general", query, gallery} of the images
    under the two folders, each split {feats, paths} plus, with --labels, {pids, camids, clothes} (clothes
    None without a clothes column). Unreadable files are an error, or skipped and counted with --skip-bad."""
    from loaders import WorkerLoader, build_transforms

    found = {"query": folder_images(args.query, "--query"), "gallery": folder_images(args.gallery, "--gallery")}
    # with --skip-bad only the readable images need labels: checked once they are known
    rows, has_camid, has_clothes = read_labels(args.labels, [] if args.skip_bad else found["query"] + found["gallery"]) \
        if args.labels else (None, False, False)
    shared = len(set(found["query"]) & set(found["gallery"]))
    if shared:
        print(f"note: {shared} images are in both --query and --gallery; each such query is also ranked against "
              f"itself (distance 0)")
    img_size = tuple(config.img_size)
    transform = build_transforms(img_size, False, (config.pixel_mean, config.pixel_std))
    splits, skipped = {}, {}
    for part, paths in found.items():
        loader = WorkerLoader(_FolderImages(paths, transform, img_size, args.skip_bad), batch_size=args.batch_size,
                              shuffle=False, num_workers=args.workers, pin_memory=torch.cuda.is_available())
        feats, _, bad, _ = extract_features(model, loader, device, flip=args.flip, distributed=False,
                                            progress=f"{part} features")
        ok = bad == 0
        skipped[part] = [p for p, k in zip(paths, ok) if not k]
        if not ok.any():
            raise UserError(f"none of the {len(paths)} images under --{part} {getattr(args, part)} can be read; "
                            f"check the files")
        splits[part] = {"feats": feats[torch.from_numpy(ok)], "paths": [p for p, k in zip(paths, ok) if k]}
    if skipped["query"] or skipped["gallery"]:
        first = (skipped["query"] + skipped["gallery"])[0]
        print(f"skipped {len(skipped['query']) + len(skipped['gallery'])} unreadable files ({len(skipped['query'])} "
              f"query, {len(skipped['gallery'])} gallery; --skip-bad), e.g. {first}")
    if rows is not None:
        check_labelled(args.labels, rows, splits["query"]["paths"] + splits["gallery"]["paths"])
        _add_labels(splits["query"], splits["gallery"], rows, has_clothes)
        if not has_camid:
            print("labels: no camid column, so queries count as camera 0 and gallery images as camera 1 (every gallery "
                  "image of a query's identity is a correct match), except that an image in both folders has a "
                  "camera of its own, so its match with itself is junk (not counted)")
    return {"name": SEARCH, "mask": "general", **splits}


def search_protocols(search: dict) -> list[dict]:
    """The protocols a labelled folder search is evaluated under: general, plus cc and sc when it has
    clothes labels and some query can be matched under them (left out with a note, as the custom
    dataset does); [] without labels."""
    q, g = search["query"], search["gallery"]
    if q.get("pids") is None or g.get("pids") is None:
        return []
    names = ["general"]
    if q.get("clothes") is not None and g.get("clothes") is not None:
        qp, qc, qo = (np.asarray(q[k]) for k in ("pids", "camids", "clothes"))
        gp, gc, go = (np.asarray(g[k]) for k in ("pids", "camids", "clothes"))
        for setting, what in (("cc", "in other clothes"), ("sc", "in the same clothes")):
            if any(protocol_masks(qp[i], qc[i], qo[i], gp, gc, go, setting)[0].any() for i in range(len(qp))):
                names.append(setting)
            else:
                print(f"the {setting} protocol is left out: no query has a gallery image of its identity {what} "
                      f"from another camera")
    return [{"name": name, "mask": name, "query": q, "gallery": g} for name in names]


def search_ranking(q_feats, g_feats, top: int, rerank: RerankConfig | None = None,
                   chunk: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The `top` nearest gallery images of each query under the metrics' distance (the cosine distance
    of L2-normalised features, or with `rerank` the re-ranked d*), nearest first, ties in gallery order:
    (gallery indices, distances), both [Q, min(top, G)] (int64, float64)."""
    q, g = _unit_features(q_feats, g_feats)
    k = min(top, len(g))
    reranked = _Reranked(q, g, rerank, chunk) if rerank is not None else None
    indices, distances = [], []
    for s in range(0, len(q), chunk):
        check_stop()
        dist = _cosine_distance(q[s:s + chunk], g) if reranked is None else reranked.block(s, s + chunk)
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        indices.append(order.cpu())
        distances.append(dist.gather(1, order).double().cpu())
    return torch.cat(indices).numpy(), torch.cat(distances).numpy()


def write_search(search: dict, top: int, out_dir: Path, source: str, rerank: RerankConfig | None = None) -> list[Path]:
    """search.csv (query,rank,gallery_path,distance: each query's `top` nearest gallery images, nearest
    first, by search_ranking) and the sheets search_1.png, ... (SHEET_QUERIES queries each: the query,
    then its top images with their distances; with labels framed green / orange / red for same identity
    from another camera / from the same camera / another identity) in out_dir. Returns the files written."""
    import csv

    import visualize

    q, g = search["query"], search["gallery"]
    indices, distances = search_ranking(q["feats"], g["feats"], top, rerank)
    q_paths, g_paths = [str(p) for p in q["paths"]], [str(p) for p in g["paths"]]
    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["query", "rank", "gallery_path", "distance"])
            for i, query in enumerate(q_paths):
                writer.writerows([query, r, g_paths[j], f"{d:.6g}"]
                                 for r, (j, d) in enumerate(zip(indices[i], distances[i]), 1))
    write_atomic(out_dir / "search.csv", write_csv)
    labelled = q.get("pids") is not None and g.get("pids") is not None
    ql, gl = ({k: np.asarray(v) for k, v in d.items() if k in ("pids", "camids", "clothes", "clothes_names")
               and v is not None} for d in (q, g))
    rows = []
    for i, query in enumerate(q_paths):
        if labelled:
            good, junk = protocol_masks(ql["pids"][i], ql["camids"][i], None, gl["pids"], gl["camids"], None, "general")
        matches = []
        for r, (j, d) in enumerate(zip(indices[i], distances[i]), 1):
            kind = "plain" if not labelled else "right" if good[j] else "junk" if junk[j] else "wrong"
            caption = (f"{r}. d {visualize.distance_text(d)}\n{visualize.short_text(Path(g_paths[j]).parent.name, 14)}/"
                       f"\n{visualize.short_text(Path(g_paths[j]).name, 14)}")
            matches.append(visualize.Match(g_paths[j], caption + (f"\nid {gl['pids'][j]}, cam {gl['camids'][j]}"
                                                                  if labelled else ""), kind))
        label = f"query {i + 1}\n{visualize.short_text(Path(query).parent.name, 20)}/\n{visualize.short_text(Path(query).name, 20)}"
        rows.append(visualize.RankedRow(query, label + (f"\n{visualize.who_text(ql, i)}" if labelled else ""), matches))
    sheets = -(-len(rows) // SHEET_QUERIES)
    legend = {"query": "query", "plain": "gallery image (no labels)",
              "right": "same identity, other camera (correct)", "junk": "same identity, same camera (not counted)",
              "wrong": "another identity"}
    written = [out_dir / "search.csv"]
    for s in range(sheets):
        written.append(out_dir / f"search_{s + 1:0{len(str(sheets))}d}.png")
        title = (f"folder search: top {indices.shape[1]} of {len(g_paths)} gallery images"
                 f"{' (re-ranked)' if rerank is not None else ''}, d = distance\nqueries {s * SHEET_QUERIES + 1}-"
                 f"{min((s + 1) * SHEET_QUERIES, len(rows))} of {len(rows)} (sheet {s + 1}/{sheets})\n{source}")
        visualize.ranked_figure(rows[s * SHEET_QUERIES:(s + 1) * SHEET_QUERIES], written[-1], title, legend)
    return written


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="FILE.pt",
                     help="stage-2 checkpoint whose model extracts the features (default: runs/sci/best.pt, where "
                          "train_stage2.py writes by default)")
    src.add_argument("--features", metavar="FILE.npz",
                     help="a folder search's features file (from --save-features): rank again, no model needed")
    p.add_argument("--query", metavar="DIR",
                   help="rank the images under --gallery DIR for each image under this folder (subfolders too, any "
                        "image type PIL reads); writes search.csv (query,rank,gallery_path,distance) and the sheets "
                        "search_*.png (8 queries each) to --out-dir")
    p.add_argument("--gallery", metavar="DIR", help="the folder of images to search in")
    p.add_argument("--top", type=int, default=SEARCH_TOP, metavar="K",
                   help="gallery images listed per query (default: %(default)s)")
    p.add_argument("--labels", metavar="CSV",
                   help="identities of the images, header path,pid[,camid][,clothes] (paths relative to the CSV or "
                        "absolute; every query and gallery image needs a row): adds the metrics (general; cc and sc "
                        "with clothes) and green/red frames. Without camid, queries count as camera 0 and gallery "
                        "images as camera 1")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) files that cannot be read as images instead of stopping")
    p.add_argument("--setting", choices=("all", *SETTINGS), default="all",
                   help="with labels: evaluate only the protocol of this name (default: all)")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="with labels: ranked lists of N queries per protocol and cmc_curve.png, as evaluate.py's")
    p.add_argument("--tsne", action="store_true", help="with labels: a t-SNE of the gallery features as tsne.png")
    p.add_argument("--save-features", metavar="FILE.npz",
                   help="with --checkpoint: also save the search's features (and labels) to this file")
    p.add_argument("--out-dir", help="where search.csv, the sheets and results.json go (default: the folder of the "
                                     "checkpoint or features file)")
    evaluate.add_extraction_args(p)
    reranking.add_rerank_args(p)
    args = p.parse_args(argv)
    if args.visualize < 0 or args.batch_size < 1 or (args.workers or 0) < 0 or args.top < 1:
        p.error("--visualize and --workers must be >= 0, --batch-size and --top >= 1")
    return args


def check_flags(args: argparse.Namespace) -> None:
    """The sources a search takes and the flags that need identities, refused before any work starts."""
    if args.features:
        given = [flag for flag, value in (("--query", args.query), ("--gallery", args.gallery),
                                          ("--labels", args.labels), ("--skip-bad", args.skip_bad),
                                          ("--save-features", args.save_features), ("--flip", args.flip)) if value]
        if given:
            raise UserError(f"--features holds an extracted search; {', '.join(given)} cannot be combined with it: "
                            f"drop them, or search the folders again with --checkpoint")
        return
    if not (args.query and args.gallery):
        raise UserError("a folder search needs both --query DIR and --gallery DIR (each query image is ranked "
                        "against the gallery's images), or --features FILE.npz of an earlier search")
    if not args.labels:
        unlabelled_refusals(args, "pass --labels CSV with the folder search")


def unlabelled_refusals(args: argparse.Namespace, remedy: str) -> None:
    """A folder search without labels has no metrics: refuse the flags that need identities."""
    given = [flag for flag, value in (("--setting", args.setting != "all"), ("--visualize", args.visualize),
                                      ("--tsne", args.tsne)) if value]
    if given:
        raise UserError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} the images' identities; {remedy} (the search alone writes "
                        f"search.csv and search_*.png)")


def _run(argv: list[str] | None) -> int:
    import config
    import utils

    args = parse_args(argv)
    rerank = reranking.rerank_config(args)
    check_flags(args)
    device = utils.select_device(args.device)
    args.workers = default_workers(device.type) if args.workers is None else args.workers
    if args.features:
        protocols, dataset = evaluate.load_features(args.features)
        search = next((p for p in protocols if p["name"] == SEARCH), None)
        if search is None:
            raise UserError(f"{args.features} holds a dataset's protocols, not a folder search; evaluate it with "
                            f"python evaluate.py --features {args.features}")
        out_dir = Path(args.out_dir or Path(args.features).parent)
        label = f"features file {Path(args.features).name}"
    else:
        from registry import load_checkpoint_model

        args.checkpoint = args.checkpoint or f"{config.DEFAULT_OUTPUT_DIR}/best.pt"
        model, ckpt_args, model_config = load_checkpoint_model(args.checkpoint, device)
        args.flip = evaluate.resolve_flip(args.flip, ckpt_args)
        search, dataset = folder_search(model, model_config, args, device), None
        out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
        label = f"{evaluate.checkpoint_label(args.checkpoint, ckpt_args)}; query {args.query}, gallery {args.gallery}"
        if args.save_features:
            evaluate.save_features(args.save_features, [search])
            print(f"wrote {args.save_features}")
    evaluate.to_device([search], device)
    protocols = search_protocols(search)
    if not protocols:  # no labels: nothing to evaluate
        unlabelled_refusals(args, "this features file has none: search again with --labels CSV")
    else:
        protocols = evaluate.select(protocols, args.setting, lambda p: p["name"])
    written = write_search(search, args.top, out_dir, label, rerank)
    print(f"wrote {', '.join(p.name for p in written[:3])}{' ...' if len(written) > 3 else ''} to {out_dir}")
    if not protocols:
        return 0
    extra = {"query": args.query, "gallery": args.gallery, "labels": args.labels} if args.query else {}
    evaluate.report(protocols, out_dir, label, str(args.checkpoint or args.features), dataset, rerank,
                    extra={**extra, **({"flip": args.flip} if args.checkpoint else {})},
                    visualize=args.visualize)
    if args.tsne:
        from tools.figures import gallery_tsne

        gallery_tsne(protocols[0], out_dir / "tsne.png", label)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input becomes one `error: ...` line on stderr and exit status 2, a stop exit status 130."""
    import utils

    return utils.run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
