"""Parsers on small fake trees in each real layout, bad inputs, the image and mask checks, and the synthetic
benchmark (determinism, manifest rule, protocol validity, CLI) and the colour-histogram check."""
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import benchmarks.colour_histogram as CH
import datasets as D
import metrics
import synthetic as S
from utils import UserError


def img(path, colour=(10, 20, 30)):
    """A tiny 8x4 (h x w) image."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 8), colour).save(path)


def tree(root, rel_paths):
    for rel in rel_paths:
        img(os.path.join(root, rel))
    return str(root)


def base(item):
    return os.path.basename(item[0])


# ---- LTCC --------------------------------------------------------------------------------

LTCC_FILES = ["train/001_1_c1_000001.png", "train/001_1_c2_000002.png", "train/001_2_c3_000003.png",
              "train/005_1_c1_000004.png", "train/005_3_c2_000005.png",
              "query/010_1_c1_000001.png", "query/011_1_c2_000002.png",
              "test/010_1_c2_000003.png", "test/010_2_c3_000004.png", "test/011_2_c1_000005.png",
              "test/012_1_c1_000006.png"]


@pytest.fixture
def ltcc_root(tmp_path):
    tree(tmp_path / "LTCC_ReID", LTCC_FILES)
    return str(tmp_path)


def test_ltcc_labels(ltcc_root):
    ds = D.build_dataset("ltcc", ltcc_root)
    assert ds.name == "ltcc" and ds.has_clothes
    assert [base(it) for it in ds.train] == sorted(base(it) for it in ds.train)  # deterministic order
    # cameras from 0 (c1 -> 0), as CAL's parser
    assert [it[1:] for it in ds.train] == [(0, 0, 0), (0, 1, 0), (0, 2, 1), (1, 0, 2), (1, 1, 3)]
    assert (ds.num_train_pids, ds.num_train_clothes) == (2, 4)
    assert ds.pid2clothes.dtype == np.float32
    assert ds.pid2clothes.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    # test pids are raw; query and gallery share one clothes mapping: 010_1 011_1 / 010_2 011_2 012_1
    assert [it[1:] for it in ds.query] == [(10, 0, 0), (11, 1, 2)]
    assert [it[1:] for it in ds.gallery] == [(10, 1, 0), (10, 2, 1), (11, 0, 3), (12, 0, 4)]
    assert [(s, m) for s, _, _, m in ds.protocols] == [("general", "general"), ("cc", "cc"), ("sc", "sc")]
    assert all(q is ds.query and g is ds.gallery for _, q, g, _ in ds.protocols)
    stats = ds.statistics()
    assert "train" in stats and "gallery" in stats and "cc (2 q / 4 g" in stats


def test_ltcc_tricky_root_and_dataset_folder(ltcc_root, tmp_path):
    tricky = tmp_path / "999_9_c9_999999" / "my_cc_c1"
    tree(tricky / "LTCC_ReID", LTCC_FILES)
    ref = D.build_dataset("ltcc", ltcc_root)
    for root in (str(tricky), str(tricky / "LTCC_ReID"), os.path.join(ltcc_root, "LTCC_ReID")):
        ds = D.build_dataset("ltcc", root)
        for split in ("train", "query", "gallery"):
            assert [it[1:] for it in getattr(ds, split)] == [it[1:] for it in getattr(ref, split)]


# ---- PRCC --------------------------------------------------------------------------------

def test_prcc(tmp_path):
    tree(tmp_path / "prcc" / "rgb", [
        "train/001/A_1.jpg", "train/001/B_2.jpg", "train/001/C_3.jpg", "train/003/A_1.jpg", "train/003/C_1.jpg",
        "val/002/A_1.jpg",
        "test/A/010/a.jpg", "test/A/011/a.jpg", "test/B/010/b.jpg", "test/C/010/c.jpg", "test/C/011/c.jpg"])
    ds = D.build_dataset("prcc", str(tmp_path))
    assert len(ds.train) == 5 and ds.num_train_pids == 2  # val not used
    assert [it[1:] for it in ds.train] == [(0, 0, 0), (0, 1, 0), (0, 2, 1), (1, 0, 2), (1, 2, 3)]  # A, B share clothes
    assert ds.pid2clothes.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert {it[2] for it in ds.gallery} == {0} and {it[2] for it in ds.query_same} == {1} and {it[2] for it in ds.query_diff} == {2}
    assert ds.query == ds.query_same + ds.query_diff
    g010 = next(it for it in ds.gallery if it[1] == 10)
    assert ds.query_same[0][3] == g010[3]  # camera B: same outfit as camera A
    assert ds.query_diff[0][1] == 10 and ds.query_diff[0][3] != g010[3]  # camera C: the other outfit
    assert [(s, q, g, m) for s, q, g, m in ds.protocols] == [("sc", ds.query_same, ds.gallery, "general"),
                                                             ("cc", ds.query_diff, ds.gallery, "general")]
    assert "query_diff" in ds.statistics()


# ---- VC-Clothes --------------------------------------------------------------------------

VC_FILES = ["train/0001-01-01-01.jpg", "train/0001-02-02-01.jpg", "train/0002-03-01-01.jpg",
            "query/0010-02-01-01.jpg", "query/0010-03-02-01.jpg", "query/0010-04-02-01.jpg", "query/0011-01-01-01.jpg",
            "gallery/0010-03-01-02.jpg", "gallery/0010-02-01-02.jpg", "gallery/0010-04-02-03.jpg",
            "gallery/0011-02-01-02.jpg", "gallery/0011-03-03-01.jpg"]


def test_vcclothes(tmp_path):
    tree(tmp_path / "VC-Clothes", VC_FILES)
    ds = D.build_dataset("vcclothes", str(tmp_path))
    # clothes keys are "0001"+"01", "0001"+"02", "0002"+"01"
    assert [it[1:] for it in ds.train] == [(0, 0, 0), (0, 1, 1), (1, 2, 2)]  # cameras from 0
    keys = {base(it): it[3] for it in ds.query + ds.gallery}
    assert keys["0010-02-01-01.jpg"] == keys["0010-03-01-02.jpg"] != keys["0010-03-02-01.jpg"] == keys["0010-04-02-03.jpg"]
    assert len({keys["0010-02-01-01.jpg"], keys["0011-01-01-01.jpg"]}) == 2  # clothes "01" of two people differ
    names = [p[0] for p in ds.protocols]
    assert names == ["general", "sc", "cc"] and all(p[3] == "general" for p in ds.protocols)
    _, q_sc, g_sc, _ = ds.protocols[1]
    _, q_cc, g_cc, _ = ds.protocols[2]
    assert {it[2] for it in q_sc + g_sc} == {1, 2} and len(q_sc) == 2 and len(g_sc) == 4  # raw cameras 2, 3
    assert {it[2] for it in q_cc + g_cc} == {2, 3} and len(q_cc) == 2 and len(g_cc) == 3  # raw cameras 3, 4
    for name, mode, cams in (("vcclothes_sc", "sc", {1, 2}), ("vcclothes_cc", "cc", {2, 3})):
        sub = D.build_dataset(name, str(tmp_path))
        assert {it[2] for it in sub.query + sub.gallery} == cams and len(sub.train) == 3
        assert sub.protocols == [(mode, sub.query, sub.gallery, "general")]
        # as CAL's sc/cc variants: clothes numbered over the camera subset only
        assert sorted({it[3] for it in sub.query + sub.gallery}) == list(range(len({it[3] for it in sub.query + sub.gallery})))


# ---- Market-1501, MSMT17, Celeb-reID, DeepChange -----------------------------------------

def test_market1501(tmp_path, caplog):
    root = tmp_path / "Market-1501-v15.09.15"
    tree(root, ["bounding_box_train/0002_c1s1_000451_01.jpg", "bounding_box_train/0002_c2s1_000551_01.jpg",
                "bounding_box_train/0007_c3s1_000001_01.jpg", "bounding_box_train/-1_c1s1_000401_03.jpg",
                "bounding_box_train/0000_c1s1_000001_01.jpg",
                "query/0003_c1s1_000001_00.jpg", "query/0005_c2s1_000001_00.jpg",
                "bounding_box_test/0003_c2s1_000002_01.jpg", "bounding_box_test/-1_c3s1_000003_01.jpg",
                "bounding_box_test/0000_c4s1_000004_01.jpg", "bounding_box_test/0005_c3s1_000005_01.jpg"])
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds = D.build_dataset("market1501", str(tmp_path))
    assert "Thumbs.db" in caplog.text and "dropped 2 train" in caplog.text  # nothing dropped silently
    assert not ds.has_clothes
    assert [it[1:] for it in ds.train] == [(0, 0, 0), (0, 1, 0), (1, 2, 1)]  # clothes id = pid, cameras from 0
    assert ds.pid2clothes.tolist() == [[1, 0], [0, 1]]
    assert sorted(it[1] for it in ds.gallery) == [-1, 0, 3, 5]
    assert sorted(it[1] for it in ds.query) == [3, 5] and all(it[3] == it[1] for it in ds.query + ds.gallery)
    assert [p[0] for p in ds.protocols] == ["general"]


def test_msmt17(tmp_path):
    root = tmp_path / "MSMT17_V1"
    files = {"list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303noon_0016_0.jpg 0"],
             "list_val.txt": ["0001/0001_000_03_0303morning_0020_1.jpg 1"],
             "list_query.txt": ["0100/0100_000_07_0303afternoon_0001_0.jpg 100"],
             "list_gallery.txt": ["0100/0100_001_02_0303morning_0002_0.jpg 100", "0101/0101_000_07_0303morning_0003_0.jpg 101"]}
    for name, lines in files.items():
        sub = "train" if name in ("list_train.txt", "list_val.txt") else "test"
        tree(root / sub, [ln.split()[0] for ln in lines])
        (root / name).write_text("\n".join(lines) + "\n")
    ds = D.build_dataset("msmt17", str(tmp_path))
    assert [it[1:] for it in ds.train] == [(0, 0, 0), (0, 4, 0), (1, 2, 1)]  # train + val, cam = 3rd field - 1
    assert [it[1:] for it in ds.query] == [(100, 6, 100)]
    assert [it[1:3] for it in ds.gallery] == [(100, 1), (101, 6)] and not ds.has_clothes
    (root / "list_query.txt").write_text("0100/missing_000_07_x_0001_0.jpg 100\n")
    with pytest.raises(UserError, match="missing_000_07"):
        D.build_dataset("msmt17", str(tmp_path))
    (root / "list_query.txt").write_text("0100/0100_000_07_0303afternoon_0001_0.jpg 100\nnot a valid line\n")
    with pytest.raises(UserError, match="line 2 of .*list_query.txt"):
        D.build_dataset("msmt17", str(tmp_path))
    ds = D.build_dataset("msmt17", str(tmp_path), skip_bad=True)
    assert len(ds.query) == 1 and ds.skipped == {"list_query.txt": 1}
    # an image that cannot be decoded is named with its list line, before anything trains
    (root / "test" / "0101" / "0101_000_07_0303morning_0003_0.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"1 of 6 images cannot be read: line 2 of .*list_gallery.txt \(.*0101_000_07"):
        D.build_dataset("msmt17", str(tmp_path), skip_bad=True)


def test_celebreid(tmp_path):
    tree(tmp_path / "Celeb-reID", ["train/1_1_0.jpg", "train/1_2_0.jpg", "train/3_1_0.jpg",
                                   "query/10_1_0.jpg", "gallery/10_2_0.jpg", "gallery/11_1_0.jpg"])
    ds = D.build_dataset("celebreid", str(tmp_path))
    assert [it[1:] for it in ds.train] == [(0, 0, 0), (0, 1, 0), (1, 2, 1)]
    assert [it[1:] for it in ds.query] == [(10, 3, 10)]
    assert [it[1:] for it in ds.gallery] == [(10, 4, 10), (11, 5, 11)]  # every image its own camera


def test_deepchange(tmp_path):
    root = tmp_path / "DeepChangeDataset"
    lists = {"train-set": ["P0001_C01_D01_0001.jpg,5", "P0001_C02_D02_0002.jpg,6", "P0004_C01_D01_0003.jpg,7"],
             "test-set-query": ["P0100_C03_D05_0001.jpg,11"],
             "test-set-gallery": ["P0100_C03_D05_0002.jpg,12", "P0100_C04_D07_0003.jpg,13", "P0101_C01_D05_0004.jpg,14"]}
    for split, lines in lists.items():
        tree(root / split, [ln.split(",")[0] for ln in lines])
        (root / f"{split}-bbox.txt").write_text("\n".join(lines) + "\n")
    ds = D.build_dataset("deepchange", str(tmp_path))
    assert [it[1:] for it in ds.train] == [(0, 5, 0), (0, 6, 1), (1, 7, 2)]  # camid := tracklet id
    q, g = ds.query[0], ds.gallery
    assert q[1:3] == (100, 11) and q[3] == g[0][3] != g[1][3] and g[2][3] != q[3]


# ---- bad input ---------------------------------------------------------------------------

def test_unknown_name_and_option(ltcc_root):
    with pytest.raises(UserError, match="valid names: .*ltcc.*synthetic"):
        D.build_dataset("ltcc2", ltcc_root)
    with pytest.raises(UserError, match="seed"):
        D.build_dataset("ltcc", ltcc_root, seed=1)


def test_missing_root_and_split(ltcc_root, tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist") as e:
        D.build_dataset("ltcc", str(tmp_path / "nowhere"))
    assert "LTCC_ReID/train" in str(e.value)  # the layout sketch
    with pytest.raises(UserError, match="prcc.*not found"):
        D.build_dataset("prcc", ltcc_root)
    for f in os.listdir(os.path.join(ltcc_root, "LTCC_ReID", "query")):
        os.remove(os.path.join(ltcc_root, "LTCC_ReID", "query", f))
    with pytest.raises(UserError, match="query split is empty"):
        D.build_dataset("ltcc", ltcc_root)
    os.rmdir(os.path.join(ltcc_root, "LTCC_ReID", "query"))
    with pytest.raises(UserError, match=r"missing .*LTCC_ReID/query\b") as e:
        D.build_dataset("ltcc", ltcc_root)
    assert "Expected layout" in str(e.value) and "\n" not in str(e.value).split("Expected")[0].strip()


def test_bad_file_name(ltcc_root, caplog):
    img(os.path.join(ltcc_root, "LTCC_ReID", "train", "holiday_photo.png"))
    with pytest.raises(UserError, match=r"holiday_photo.png does not match the ltcc naming pattern. Fix or remove it.$"):
        D.build_dataset("ltcc", ltcc_root)  # as the training scripts call it: they have no --skip-bad
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds = D.build_dataset("ltcc", ltcc_root, skip_bad=True)
    assert len(ds.train) == 5 and ds.skipped == {"train": 1}
    assert "skipped 1 bad train" in caplog.text and "skipped bad files: train 1" in ds.statistics()


def test_an_image_is_any_file_pillow_reads(ltcc_root, tmp_path, caplog):
    """One rule (image_extensions) for dataset folders and tools/search.py's folders; other entries, hidden
    ones aside, are ignored with a warning."""
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp"} <= D.image_extensions() and ".pdf" not in D.image_extensions()
    train = os.path.join(ltcc_root, "LTCC_ReID", "train")
    Image.new("RGB", (4, 8)).save(os.path.join(train, "007_1_c1_000009.webp"))
    for name in ("Thumbs.db", ".DS_Store"):
        open(os.path.join(train, name), "wb").close()
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds = D.build_dataset("ltcc", ltcc_root)
    assert "007_1_c1_000009.webp" in {base(it) for it in ds.train}
    assert "ignored 1 entries that are not images" in caplog.text and "(e.g. Thumbs.db)" in caplog.text
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 8)).save(tmp_path / "deep" / "sub" / "b.JPG")
    (tmp_path / "deep" / "a.txt").write_text("notes")
    images, others = D.list_images(str(tmp_path / "deep"), recursive=True)
    assert images == [str(tmp_path / "deep" / "sub" / "b.JPG")] and others == [str(tmp_path / "deep" / "a.txt")]


def test_every_image_is_decoded_up_front(ltcc_root, capsys):
    folder = os.path.join(ltcc_root, "LTCC_ReID")
    with open(os.path.join(folder, "query", "011_1_c2_000002.png"), "w") as f:
        f.write("a text file named .png")
    open(os.path.join(folder, "test", "012_1_c1_000006.png"), "wb").close()  # 0 bytes
    with pytest.raises(UserError, match=r"^ltcc: 2 of 11 images cannot be read: .*query/011_1_c2_000002.png: .*; "
                                        r".*test/012_1_c1_000006.png: .*Replace or remove these files before training$"):
        D.build_dataset("ltcc", ltcc_root)
    assert D.main(["--stats", "ltcc", "--root", ltcc_root]) == 2
    assert "2 of 11 images cannot be read" in capsys.readouterr().err


def test_cli(ltcc_root, tmp_path, capsys):
    assert D.main(["--stats", "ltcc", "--root", ltcc_root]) == 0
    assert "# images" in capsys.readouterr().out
    assert D.main(["--stats", "ltcc", "--root", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ltcc: root folder")
    with pytest.raises(SystemExit) as exc:  # the benchmark's parameter flags moved to python -m synthetic
        D.main(["--stats", "ltcc", "--root", ltcc_root, "--seed", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --seed 3" in capsys.readouterr().err


# ---- synthetic benchmark -----------------------------------------------------------------

SMALL = dict(seed=0, num_train_ids=6, num_test_ids=6, img_size=(64, 32))
TINY = dict(seed=1, num_train_ids=2, num_test_ids=2, outfits=2, cameras=3, img_size=(64, 32))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return D.build_dataset("synthetic", str(tmp_path_factory.mktemp("synth")), **SMALL)


def read_tree(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_synthetic_is_deterministic(tmp_path):
    a = S.generate_synthetic(str(tmp_path / "a"), S.SyntheticConfig(**TINY), workers=1)
    b = S.generate_synthetic(str(tmp_path / "b"), S.SyntheticConfig(**TINY), workers=2)  # other work split
    ta, tb = read_tree(a), read_tree(b)
    assert len(ta) > 20 and ta == tb
    c = S.generate_synthetic(str(tmp_path / "c"), S.SyntheticConfig(**{**TINY, "seed": 2}))
    assert read_tree(c) != ta
    assert sorted(os.listdir(tmp_path / "a")) == ["SYNTH_CC"]  # no temporary folders left behind


def test_synthetic_manifest_rule(tmp_path, caplog):
    root = str(tmp_path)
    target = S.generate_synthetic(root, S.SyntheticConfig(**TINY))
    manifest = json.load(open(os.path.join(target, "manifest.json")))
    assert manifest["version"] == S.SYNTH_VERSION and manifest["params"]["seed"] == TINY["seed"]
    marker = os.path.join(target, "train", "marker.txt")
    open(marker, "w").close()
    ds = D.build_dataset("synthetic", root, **TINY)  # same parameters: reused as is
    assert os.path.exists(marker) and ds.dir == target
    D.build_dataset("synthetic", target, **TINY)  # the dataset folder itself works too
    assert os.path.exists(marker)
    manifest["version"] = -1
    json.dump(manifest, open(os.path.join(target, "manifest.json"), "w"))
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds = D.build_dataset("synthetic", root)  # other generator version: regenerated with its own parameters
    assert not os.path.exists(marker) and ds.config == S.SyntheticConfig(**TINY)
    assert f"regenerating {target}: generator version -1 -> {S.SYNTH_VERSION}" in caplog.messages
    open(marker, "w").close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds = D.build_dataset("synthetic", root, **{**TINY, "cameras": 4})  # other parameters: regenerated
    assert not os.path.exists(marker) and {it[2] for it in ds.gallery} == {0, 1, 2, 3}  # cameras from 0
    assert f"regenerating {target}: cameras 3 -> 4" in caplog.messages
    os.remove(os.path.join(target, "manifest.json"))
    for params in (TINY, {}):  # not made by this generator: refused, with or without parameters
        with pytest.raises(UserError, match="no readable manifest"):
            D.build_dataset("synthetic", root, **params)
    with pytest.raises(UserError, match="outfits must be >= 2"):
        S.SyntheticConfig(outfits=1)


def test_synthetic_layout_and_protocols(small):
    assert small.name == "synthetic" and small.num_train_pids == 6 and small.has_clothes
    assert len({it[1] for it in small.query}) == 6 and {it[1] for it in small.query} == {it[1] for it in small.gallery}
    assert {it[1] for it in small.gallery} == set(range(7, 13))  # raw test ids follow the 6 training ids
    assert Image.open(small.train[0][0]).size == (32, 64)
    g = np.array([it[1:] for it in small.gallery])
    for q in small.query:  # every query is valid in all three protocols
        for mode in ("general", "cc", "sc"):
            good, _ = metrics.protocol_masks(q[1], q[2], q[3], g[:, 0], g[:, 1], g[:, 2], mode)
            assert good.any(), (q, mode)
    assert [p[0] for p in small.protocols] == ["general", "cc", "sc"]
    assert set(small.boxes) == {os.path.relpath(it[0], small.dir) for it in small.train + small.query + small.gallery}


def naive_map(feats, query, gallery, mask):
    """mAP % the slow obvious way (full stable sort per query, CAL's AP), for checking the benchmark."""
    g = np.array([it[1:] for it in gallery])
    gf = np.stack([feats[it[0]] for it in gallery])
    aps = []
    for q in query:
        good, junk = metrics.protocol_masks(q[1], q[2], q[3], g[:, 0], g[:, 1], g[:, 2], mask)
        order = np.argsort(1.0 - gf @ feats[q[0]], kind="stable")
        ranks = np.flatnonzero(good[order][~junk[order]]) + 1
        if len(ranks):
            aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    return 100.0 * np.mean(aps)


def test_synthetic_clothes_shortcut(small):
    whole = CH.colour_histogram_baseline(small)
    head = CH.colour_histogram_baseline(small, "head")
    assert whole["sc"] > whole["cc"] + 20  # matching clothes colours works only when clothes stay
    assert head["cc"] > whole["cc"] + 10  # identity cues (hair, skin, glasses) are in the head
    for region, res in (("whole", whole), ("head", head)):  # rank_metrics = the obvious computation
        feats = CH.histograms(small, region)
        assert res == pytest.approx({n: naive_map(feats, q, g, m) for n, q, g, m in small.protocols}, abs=1e-9)
    with pytest.raises(UserError, match="needs person boxes"):
        CH.colour_histogram_baseline(type("NoBoxes", (), {"name": "ltcc"})(), "head")


def test_colour_histogram_cli(small, capsys):
    assert CH.main(["--root", os.path.dirname(small.dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" mAP")[0] for ln in lines] == ["colour-histogram (whole)", "colour-histogram (head)"]
    assert all(re.search(r"general \d+\.\d, cc \d+\.\d, sc \d+\.\d$", ln) for ln in lines)
    assert CH.main(["--root", os.path.dirname(small.dir), "--dataset", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_datasets_imports_synthetic_only_for_the_synthetic_dataset():
    code = "import sys; sys.path.insert(0, '.'); import datasets; assert 'synthetic' not in sys.modules, 'synthetic imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_synthetic_does_not_import_datasets():
    code = "import sys; sys.path.insert(0, '.'); import synthetic; assert 'datasets' not in sys.modules, 'datasets imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_synthetic_preview(small, tmp_path, capsys):
    out = tmp_path / "preview.png"
    assert S.main(["--root", os.path.dirname(small.dir), "--preview", str(out), "--seed", "0", "--train-ids", "6",
                   "--test-ids", "6", "--img-size", "64", "32"]) == 0
    assert Image.open(out).size[1] == 2 * 64 * 6 + S.preview._panel_height(64, 2)  # the grid, then masks and captions


def test_synthetic_cli_bad_input(tmp_path, capsys):
    for argv, msg in ((["--seed", "3"], "parameters (seed) are given but nothing uses them"),
                      ([], "nothing to do"),
                      (["--preview", str(tmp_path / "p.png")], "--preview needs --root"),
                      (["--make", str(tmp_path), "--root", str(tmp_path)], "--make OUT is the root"),
                      (["--make", str(tmp_path), "--outfits", "1"], "outfits must be >= 2")):
        assert S.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {msg}") or msg in err, (argv, err)
        assert err.count("\n") == 1, err


CUSTOM = ["--train-ids", "6", "--test-ids", "4", "--img-size", "64", "32"]


def test_cli_reads_the_benchmark_that_is_there(tmp_path, capsys, caplog):
    """The bug: `--stats synthetic --root X` replaced X's custom benchmark with the default one."""
    root = str(tmp_path / "X")
    assert S.main(["--make", root, *CUSTOM]) == 0
    target = os.path.join(root, "SYNTH_CC")
    before = read_tree(target)
    mtime = os.stat(os.path.join(target, "manifest.json")).st_mtime_ns
    n_train = len(os.listdir(os.path.join(target, "train")))
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="datasets"):
        assert D.main(["--stats", "synthetic", "--root", root]) == 0
        assert S.main(["--preview", str(tmp_path / "p.png"), "--root", root]) == 0
        assert CH.main(["--root", root]) == 0
    assert re.search(rf"train +\| +6 \| +{n_train} \|", capsys.readouterr().out)
    assert read_tree(target) == before and os.stat(os.path.join(target, "manifest.json")).st_mtime_ns == mtime
    assert not any(m.startswith(("regenerating", "no synthetic", "synthetic: generated")) for m in caplog.messages)
    assert Image.open(tmp_path / "p.png").size[1] == 2 * 64 * 4 + S.preview._panel_height(64, 2)  # the 4 custom test identities
    assert S.main(["--make", root, *CUSTOM]) == 0  # the same flags again: kept as well
    assert os.stat(os.path.join(target, "manifest.json")).st_mtime_ns == mtime


@pytest.mark.parametrize("how", ["make", "preview"])
def test_cli_explicit_parameters_regenerate_and_say_so(tmp_path, caplog, how):
    root = str(tmp_path / "b")
    target = S.generate_synthetic(root, S.SyntheticConfig(**TINY))
    flags = ["--seed", "1", "--train-ids", "3", "--test-ids", "2", "--outfits", "2", "--cameras", "3", "--img-size", "64", "48"]
    argv = ["--make", root, *flags] if how == "make" else ["--preview", str(tmp_path / "p.png"), "--root", root, *flags]
    with caplog.at_level(logging.INFO, logger="datasets"):
        assert S.main(argv) == 0
    assert f"regenerating {target}: num_train_ids 2 -> 3, img_size [64, 32] -> [64, 48]" in caplog.messages
    assert {k: S.existing_params(root)[k] for k in ("num_train_ids", "img_size")} == {"num_train_ids": 3, "img_size": (64, 48)}
    assert sorted(os.listdir(root)) == ["SYNTH_CC"]  # written to a temporary folder, renamed, old one removed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasets"):
        assert S.main(argv) == 0  # now the same: kept
        assert D.main(["--stats", "synthetic", "--root", root]) == 0  # a reader: kept as well
    assert not any(m.startswith("regenerating") for m in caplog.messages)


@dataclasses.dataclass(frozen=True)
class TinyDefaults(S.SyntheticConfig):
    """The real default benchmark takes seconds to draw: the same code path with tiny defaults."""
    seed: int = 1
    num_train_ids: int = 2
    num_test_ids: int = 2
    outfits: int = 2
    cameras: int = 3
    img_size: tuple[int, int] = (64, 32)


@pytest.mark.parametrize("how", ["stats", "preview"])
def test_cli_without_a_benchmark_generates_the_default_and_says_so(tmp_path, caplog, monkeypatch, how):
    monkeypatch.setattr(S.benchmark, "SyntheticConfig", TinyDefaults)  # config_for reads it there
    root = str(tmp_path / "empty")
    with caplog.at_level(logging.INFO, logger="datasets"):
        if how == "stats":
            assert D.main(["--stats", "synthetic", "--root", root]) == 0
        else:
            assert S.main(["--preview", str(tmp_path / "p.png"), "--root", root]) == 0
    assert (f"no synthetic benchmark under {root}: generating the default one (seed 1, num_train_ids 2, num_test_ids 2, "
            f"outfits 2, cameras 3, img_size [64, 32], shared_outfits 0.15)") in caplog.messages
    assert S.existing_params(root) == dataclasses.asdict(TinyDefaults())
