"""tools/search.py, the folder search (--query/--gallery [--labels] [--skip-bad] [--save-features]) on folders
made from the small synthetic benchmark, with an untrained tiny checkpoint; and the matplotlib figures
(ranked lists, CMC curve) inspected as figures rather than pixels. CPU, seconds."""
from __future__ import annotations

import csv
import json
import multiprocessing
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import rerank as reranking
from rerank import RerankConfig
from tools import search
from test_visualize import tiny_checkpoint

PNG_MAGIC = b"\x89PNG"
COMMON = ["--workers", "0", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_labels(name: str) -> tuple[int, int, str]:
    """(pid, camid, clothes) of a benchmark file {pid}_{outfit}_c{cam}_{frame}.png, as the LTCC parser reads it."""
    pid, outfit, cam, _ = Path(name).stem.split("_")
    return int(pid), int(cam[1:]) - 1, outfit


@pytest.fixture(scope="module")
def world(data_root, tmp_path_factory) -> dict:
    """The benchmark's query and test (gallery) images copied unchanged into nested folders (id7/outfit1/...),
    a labels CSV (paths relative to it) and a tiny checkpoint whose dataset is that benchmark. The nesting
    keeps the dataset's (sorted) order: an untrained model's distances are nearly all equal, so a batch
    in another order could turn float rounding into different rankings."""
    base = tmp_path_factory.mktemp("search")
    src = Path(data_root) / "SYNTH_CC"
    rows = []
    for split, folder in (("query", "q"), ("test", "g")):
        for f in sorted((src / split).iterdir()):
            pid, cam, outfit = synthetic_labels(f.name)
            dst = base / folder / f"id{pid:03d}" / f"outfit{outfit}"
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / f.name)
            rows.append((str((dst / f.name).relative_to(base)), pid, cam, outfit))
    with open(base / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "pid", "camid", "clothes"), *rows])
    return {"base": base, "q": base / "q", "g": base / "g", "labels": base / "labels.csv", "rows": rows,
            "ckpt": tiny_checkpoint(base / "run" / "best.pt", data_root)}


def small_folders(world: dict, root: Path) -> tuple[Path, Path]:
    """4 queries (PNG, and JPEG in a subfolder) and 20 gallery images (PNG, JPEG, WebP, nested)."""
    q, g = root / "q", root / "g"
    queries = sorted(world["q"].rglob("*.png"))[::6][:4]
    gallery = sorted(world["g"].rglob("*.png"))[::5][:20]
    for i, f in enumerate(queries):
        (q / ("sub" if i % 2 else "")).mkdir(parents=True, exist_ok=True)
        img = Image.open(f)
        img.save(q / ("sub" if i % 2 else "") / (f.stem + (".jpg" if i % 2 else ".png")))
    for i, f in enumerate(gallery):
        folder = g / f"part{i % 3}" / ("inner" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").save(folder / (f.stem + (".png", ".jpg", ".webp")[i % 3]))
    (g / "notes.txt").write_text("not an image, and not an image extension: ignored")
    return q, g


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- search without labels ---------------------------------------------------------------

def test_search_writes_the_top_k_of_every_query_in_order(world, tmp_path, capsys):
    q, g = small_folders(world, tmp_path)
    out, feats = tmp_path / "out", tmp_path / "s.npz"
    assert search.main(["--checkpoint", str(world["ckpt"]), "--query", str(q), "--gallery", str(g), "--top", "3",
                          "--out-dir", str(out), "--save-features", str(feats), *COMMON]) == 0
    captured = capsys.readouterr()
    assert "ignored 1 files that are not images" in captured.out
    assert "gallery features: 20 images [####################] 1/1 batches" in captured.err  # utils.Progress
    rows = read_csv(out / "search.csv")
    assert list(rows[0]) == ["query", "rank", "gallery_path", "distance"]
    queries = sorted(str(p.resolve()) for p in q.rglob("*.*"))
    gallery = sorted(str(p.resolve()) for p in g.rglob("*.*") if p.suffix != ".txt")
    assert [r["query"] for r in rows] == [p for p in queries for _ in range(3)]  # sorted queries, K rows each
    # the rows are search_ranking's (unit-tested below) of the saved features: nearest first, K per query
    with np.load(feats) as z:
        assert sorted(z.files) == ["mask_settings", "protocols", "search_gallery_feats", "search_gallery_paths",
                                   "search_query_feats", "search_query_paths"]  # no labels: no label keys
        assert z["protocols"].tolist() == ["search"] and z["search_query_paths"].tolist() == queries
        assert z["search_gallery_paths"].tolist() == gallery and z["search_query_feats"].dtype == np.float32
        idx, dist = search.search_ranking(z["search_query_feats"], z["search_gallery_feats"], 3)
    for i, query in enumerate(queries):
        mine = rows[3 * i:3 * i + 3]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3]
        assert [r["gallery_path"] for r in mine] == [gallery[j] for j in idx[i]]
        d = [float(r["distance"]) for r in mine]
        assert d == sorted(d) and d == pytest.approx(dist[i], rel=1e-5, abs=1e-9)
    assert (out / "search_1.png").read_bytes()[:4] == PNG_MAGIC and not (out / "results.json").exists()

    # the features file alone: the same search again (no model), and numpy reads it without evaluate.py
    again = tmp_path / "again"
    assert search.main(["--features", str(feats), "--top", "3", "--out-dir", str(again), "--device", "cpu"]) == 0
    assert read_csv(again / "search.csv") == rows and (again / "search_1.png").is_file()
    # metrics need identities: refused for an unlabelled file, before anything is written
    assert search.main(["--features", str(feats), "--visualize", "2", "--out-dir", str(tmp_path / "x")]) == 2
    assert "the images' identities" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_search_ranking_is_the_metrics_order_with_ties_and_rerank():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(5, 8, generator=gen), torch.randn(12, 8, generator=gen)
    g[7] = g[2]  # a tie: gallery order decides
    idx, dist = search.search_ranking(q, g, top=4, chunk=2)
    full = 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    for i in range(5):
        order = np.argsort(full[i].numpy(), kind="stable")[:4]
        assert idx[i].tolist() == order.tolist() and np.allclose(dist[i], full[i].numpy()[order], atol=1e-6)
        if 7 in idx[i]:
            assert 2 in idx[i] and idx[i].tolist().index(2) < idx[i].tolist().index(7)
    assert search.search_ranking(q, g, top=50)[0].shape == (5, 12)  # K = min(top, G)
    # --rerank: the re-ranked distances of rerank.rerank, in the same order
    idx, dist = search.search_ranking(q, g, top=3, rerank=RerankConfig(k1=4, k2=2, lambda_value=0.3))
    d = reranking.rerank(q, g, k1=4, k2=2, lambda_value=0.3).numpy()
    for i in range(5):
        assert idx[i].tolist() == np.argsort(d[i], kind="stable")[:3].tolist()
        assert np.allclose(dist[i], d[i][idx[i]])


# ---- unreadable files, empty folders, conflicting flags --------------------------------------

def test_unreadable_files_are_named_or_skipped_and_counted(world, tmp_path, capsys):
    q, g = small_folders(world, tmp_path)
    (g / "a_broken.png").write_bytes(b"this is not a PNG")
    data = next(g.rglob("*.jpg")).read_bytes()
    (g / "z_truncated.jpg").write_bytes(data[:len(data) // 2])
    argv = ["--checkpoint", str(world["ckpt"]), "--query", str(q), "--gallery", str(g), "--top", "2",
            "--out-dir", str(tmp_path / "out"), *COMMON]
    assert search.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the query's progress line, then the error
    assert err[-1].startswith("error: cannot read image ") and "a_broken.png" in err[-1] and "--skip-bad" in err[-1]
    assert not err[-1].startswith("error: cannot read image " + str(g / "z_"))  # the first bad file in order
    # from a loader worker too, whose process is gone when the error comes back (not left to block the exit)
    assert search.main(argv + ["--workers", "1"]) == 2
    assert "a_broken.png" in capsys.readouterr().err and not multiprocessing.active_children()
    assert search.main(argv + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 unreadable files (0 query, 2 gallery; --skip-bad)" in out
    listed = {r["gallery_path"] for r in read_csv(tmp_path / "out" / "search.csv")}
    assert listed and not any("broken" in p or "truncated" in p for p in listed)


def test_skip_bad_needs_labels_for_the_readable_files_only(world, tmp_path, capsys):
    q, g = small_folders(world, tmp_path)
    (g / "a_broken.png").write_bytes(b"this is not a PNG")
    labels = tmp_path / "labels.csv"
    images = sorted(p for p in (*q.rglob("*"), *g.rglob("*")) if p.suffix in (".png", ".jpg", ".webp")
                    and p.name != "a_broken.png")
    labels.write_text("path,pid,camid\n" + "".join(f"{p},{synthetic_labels(p.name)[0]},{synthetic_labels(p.name)[1]}\n"
                                                   for p in images))
    argv = ["--checkpoint", str(world["ckpt"]), "--query", str(q), "--gallery", str(g), "--labels", str(labels),
            "--top", "2", "--out-dir", str(tmp_path / "out"), *COMMON]
    assert search.main(argv + ["--skip-bad"]) == 0
    assert "skipped 1 unreadable files" in capsys.readouterr().out
    assert search.main(argv) == 2  # without --skip-bad: every image needs a row, checked before any work
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no row for" in err[0] and "a_broken.png" in err[0]


@pytest.mark.parametrize("value,ok", [("+5", True), ("-1", True), ("7", True), ("\u00b2", False), ("1.5", False),
                                      ("x", False)])
def test_label_integers_parse_as_the_custom_dataset_does(tmp_path, value, ok):
    import datasets

    img = tmp_path / "a.png"
    (tmp_path / "l.csv").write_text(f"path,pid,camid\na.png,{value},0\n", encoding="utf-8")
    assert (datasets.parse_int(value) is not None) == ok
    if ok:
        rows, _, _ = search.read_labels(tmp_path / "l.csv", [str(img)])
        assert rows[str(img)][1:3] == (int(value), 0)
    else:
        with pytest.raises(evaluate.UserError, match=r"line 2: pid .* is not an integer") as e:
            search.read_labels(tmp_path / "l.csv", [str(img)])
        assert "\n" not in str(e.value)


def test_labels_are_read_by_the_custom_datasets_reader(tmp_path):
    """datasets.read_label_csv reads --labels: its line-exact errors, and the search's own rules."""
    img = tmp_path / "a.png"
    cases = [(b"path,pid\na.png,1\nb.png,caf\xe9\n", "line 3 is not UTF-8 text (byte 0xe9 at column 10)"),
             (b"path,pid,clothes\na.png,1,\n", "line 2 has an empty clothes label; fill in every column of every row"),
             (b"path,pid\na.png,1\na.png,2\n", "line 3 repeats the image of line 2 (a.png); list each image once"),
             (b"path,pid,camid\na.png,1\n", "line 2 has 2 values but the header names 3 columns")]
    for data, message in cases:
        (tmp_path / "l.csv").write_bytes(data)
        with pytest.raises(evaluate.UserError, match=re.escape(f"--labels {tmp_path / 'l.csv'} {message}")):
            search.read_labels(tmp_path / "l.csv", [str(img)])
    (tmp_path / "l.csv").write_bytes(b"\xef\xbb\xbfPath,PID,clothes\na.png,+3,red\n")  # byte-order mark, any case
    assert search.read_labels(tmp_path / "l.csv", [str(img)]) == ({str(img): (2, 3, None, "red")}, False, True)


def test_an_image_in_both_folders_does_not_match_itself_without_camids():
    """No camid column: queries camera 0, gallery camera 1, but an image in both folders has one camera
    of its own in both, so it is junk for itself and a correct match for the others."""
    rows = {p: (i + 2, pid, None, None) for i, (p, pid) in enumerate((("/a", 2), ("/b", 1), ("/c", 1), ("/d", 2)))}
    query, gallery = {"paths": ["/a", "/b"]}, {"paths": ["/b", "/c", "/d"]}
    search._add_labels(query, gallery, rows, has_clothes=False)
    assert query["camids"].tolist() == [0, 2] and gallery["camids"].tolist() == [2, 1, 1]
    # /b's nearest gallery image is itself, then /d (another identity), then /c (its own)
    gf = np.array([[1, 0], [0.9, 0.1], [0.95, 0.05]], np.float32)
    qf = np.array([gf[2], gf[0]], np.float32)
    m = evaluate.rank_metrics_from_features(qf[1:], gf, query["pids"][1:], gallery["pids"], query["camids"][1:],
                                            gallery["camids"])
    assert m["cmc"][0] == 0 and m["cmc"][1] == 1
    m = evaluate.rank_metrics_from_features(qf[:1], gf, query["pids"][:1], gallery["pids"], query["camids"][:1],
                                            gallery["camids"])
    assert m["cmc"][0] == 1  # /a: /d, another image of its identity, is found


@pytest.mark.parametrize("extra,message", [
    (["--query", "Q"], "needs both --query DIR and --gallery DIR"),
    (["--labels", "l.csv"], "needs both --query DIR and --gallery DIR"),
    (["--query", "Q", "--gallery", "G", "--visualize", "2"], "the images' identities"),
    (["--query", "Q", "--gallery", "G", "--setting", "cc"], "the images' identities"),
    (["--query", "Q", "--gallery", "G", "--tsne"], "the images' identities"),
])
def test_conflicting_flags_are_refused(extra, message, tmp_path, capsys):
    assert search.main(["--checkpoint", str(tmp_path / "none.pt"), *extra, *COMMON]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra", [["--dataset", "synthetic"], ["--root", "data"], ["--export", "m.pt2"],
                                   ["--heatmaps", "2"], ["--profile"]])
def test_evaluation_flags_are_not_search_flags(extra, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        search.main(["--checkpoint", str(tmp_path / "none.pt"), "--query", "Q", "--gallery", "G", *extra])
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_search_features_with_folders_is_refused(capsys):
    assert search.main(["--features", "f.npz", "--query", "Q", "--gallery", "G"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_evaluate_sends_a_search_file_to_the_tool(labelled_run, tmp_path, capsys):
    assert evaluate.main(["--features", str(labelled_run["out"] / "s.npz"), "--out-dir", str(tmp_path)]) == 2
    assert "tools/search.py --features" in capsys.readouterr().err


def test_empty_or_missing_folders_and_incomplete_labels(world, tmp_path, capsys):
    q, g = small_folders(world, tmp_path)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    base = ["--checkpoint", str(world["ckpt"]), "--out-dir", str(tmp_path / "out"), *COMMON]
    assert search.main(base + ["--query", str(tmp_path / "empty"), "--gallery", str(g)]) == 2
    assert "--query " + str(tmp_path / "empty") + " holds no images" in capsys.readouterr().err
    assert search.main(base + ["--query", str(q), "--gallery", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    first, *rest = sorted(p.resolve() for p in q.rglob("*.*"))
    labels.write_text("path,pid\n" + "".join(f"{p},1\n" for p in rest))
    assert search.main(base + ["--query", str(q), "--gallery", str(g), "--labels", str(labels)]) == 2
    assert f"has no row for {first}" in capsys.readouterr().err
    labels.write_text("path,person\nx.png,1\n")
    assert search.main(base + ["--query", str(q), "--gallery", str(g), "--labels", str(labels)]) == 2
    assert "line 1 must be the header path,pid" in capsys.readouterr().err


# ---- search with labels: the metrics of the same images as a dataset --------------------------

@pytest.fixture(scope="module")
def labelled_run(world, tmp_path_factory) -> dict:
    """The benchmark's test set searched as folders with --labels (and --save-features, --visualize),
    and evaluated as the dataset, with the same checkpoint."""
    out = tmp_path_factory.mktemp("labelled")
    ckpt = str(world["ckpt"])
    assert search.main(["--checkpoint", ckpt, "--query", str(world["q"]), "--gallery", str(world["g"]),
                          "--labels", str(world["labels"]), "--top", "3", "--visualize", "2",
                          "--save-features", str(out / "s.npz"), "--out-dir", str(out / "search"), *COMMON]) == 0
    assert evaluate.main(["--checkpoint", ckpt, "--out-dir", str(out / "dataset"), *COMMON]) == 0
    return {"out": out, **{k: json.loads((out / k / "results.json").read_text())["evaluate"]
                           for k in ("search", "dataset")}}


def test_labels_give_the_metrics_of_the_same_images_as_a_dataset(labelled_run):
    search, dataset = labelled_run["search"], labelled_run["dataset"]
    assert set(search["metrics"]) == {"general", "cc", "sc"}
    for setting, m in dataset["metrics"].items():
        assert search["metrics"][setting] == pytest.approx(m, abs=1e-3), setting
    assert search["query"].endswith("q") and search["labels"].endswith("labels.csv")
    out = labelled_run["out"] / "search"
    for name in ("search_1.png", "search_3.png", "ranked_general.png", "ranked_cc.png", "cmc_curve.png"):
        assert (out / name).read_bytes()[:4] == PNG_MAGIC, name
    assert not (out / "search_4.png").exists()  # 22 queries, 8 per sheet


def test_labelled_features_file_round_trip(labelled_run, world, tmp_path, capsys):
    feats = labelled_run["out"] / "s.npz"
    with np.load(feats) as z:
        for part in ("query", "gallery"):
            assert {f"search_{part}_{k}" for k in ("feats", "paths", "pids", "camids", "clothes")} <= set(z.files)
        by_path = {str((world["base"] / r[0]).resolve()): r for r in world["rows"]}
        for path, pid, cam in zip(z["search_gallery_paths"], z["search_gallery_pids"], z["search_gallery_camids"]):
            assert by_path[str(path)][1:3] == (pid, cam)
        # one clothes id per (identity, outfit), shared by query and gallery
        keys = {(by_path[str(p)][1], by_path[str(p)][3]): c for part in ("query", "gallery")
                for p, c in zip(z[f"search_{part}_paths"], z[f"search_{part}_clothes"])}
        assert len(set(keys.values())) == len(keys)
    assert search.main(["--features", str(feats), "--out-dir", str(tmp_path), "--top", "1", "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())["evaluate"]["metrics"]
    assert again == labelled_run["search"]["metrics"]
    assert search.main(["--features", str(feats), "--setting", "cc", "--out-dir", str(tmp_path / "cc"),
                          "--top", "1", "--device", "cpu"]) == 0
    assert list(json.loads((tmp_path / "cc" / "results.json").read_text())["evaluate"]["metrics"]) == ["cc"]


def test_labels_without_camid_make_queries_camera_0_and_gallery_camera_1(labelled_run, world, tmp_path, capsys):
    labels = tmp_path / "ids.csv"  # pid only, absolute paths, another folder than the images'
    labels.write_text("pid,path\n" + "".join(f"{pid},{(world['base'] / path).resolve()}\n"
                                             for path, pid, _, _ in world["rows"]))
    assert search.main(["--checkpoint", str(world["ckpt"]), "--query", str(world["q"]), "--gallery", str(world["g"]),
                          "--labels", str(labels), "--top", "1", "--save-features", str(tmp_path / "f.npz"),
                          "--out-dir", str(tmp_path), *COMMON]) == 0
    assert "no camid column, so queries count as camera 0 and gallery images as camera 1" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "results.json").read_text())["evaluate"]["metrics"]
    assert list(metrics) == ["general"]  # no clothes column: general only
    with np.load(tmp_path / "f.npz") as z:
        assert (z["search_query_camids"] == 0).all() and (z["search_gallery_camids"] == 1).all()
        assert "search_query_clothes" not in z.files
        ref = evaluate.rank_metrics_from_features(z["search_query_feats"], z["search_gallery_feats"],
                                                  z["search_query_pids"], z["search_gallery_pids"],
                                                  np.zeros(len(z["search_query_pids"]), int),
                                                  np.ones(len(z["search_gallery_pids"]), int))
    assert metrics["general"]["mAP"] == pytest.approx(100 * ref["mAP"], abs=1e-3)
    assert metrics["general"]["rank1"] == pytest.approx(100 * ref["cmc"][0], abs=1e-3)
