"""The `custom` dataset (users' own CSV files): labels and protocols with and without clothes,
each validation error (naming the file and line), the --stats CLI, and both training stages on a
custom dataset without clothes labels (the clothes-adversarial loss off)."""
import json
import os
import re

import pytest
from PIL import Image

import datasets as D
import train_stage1
import train_stage2
from utils import UserError

HEADER = "path,pid,camid,clothes"
# (path relative to the root, pid, camid, clothes): two training identities, and a test set on which
# every protocol has a valid query (pid 7: same clothes from camera 1, other clothes from camera 2)
ROWS = {
    "train": [("img/t1.png", "10", "0", "red"), ("img/t2.png", "10", "1", "red"), ("img/t3.png", "10", "2", "blue"),
              ("img/t4.png", "3", "0", "x"), ("img/t5.png", "3", "1", "y")],
    "query": [("img/q1.png", "7", "0", "a"), ("img/q2.png", "8", "1", "a")],
    "gallery": [("img/g1.png", "7", "1", "a"), ("img/g2.png", "7", "2", "b"), ("img/g3.png", "8", "0", "b"),
                ("img/g4.png", "9", "0", "c")],
}


def img(path):
    """A tiny 8x4 (h x w) image."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 8), (10, 20, 30)).save(path)


def write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in [header] + [",".join(r) for r in rows]))


def make(root, rows=None, header=HEADER, clothes=True, images=True):
    """The CSV files under root (rows as ROWS; clothes=False drops the clothes column) and their images."""
    rows = {split: [r if clothes else r[:3] for r in recs] for split, recs in (rows or ROWS).items()}
    header = header if clothes else "path,pid,camid"
    os.makedirs(root, exist_ok=True)
    for split, recs in rows.items():
        write_csv(os.path.join(root, f"{split}.csv"), header, recs)
        for r in recs if images else ():
            img(os.path.join(root, r[0]))
    return str(root)


def with_rows(split, rows):
    return {**ROWS, split: rows}


def error(root, **options) -> str:
    with pytest.raises(UserError) as exc:
        D.build_dataset("custom", str(root), **options)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("custom: ")
    return message


def csv_line(root, split, line) -> str:
    return f"{os.path.join(os.path.abspath(root), split + '.csv')} line {line}"


# ---- labels and protocols ----------------------------------------------------------------------

def test_round_trip_with_clothes(tmp_path):
    ds = D.build_dataset("custom", make(tmp_path))
    assert ds.name == "custom" and ds.has_clothes and ds.dir == str(tmp_path)
    # training pids 3, 10 -> 0, 1; clothes keys (pid, clothes) in sorted order: (3,x) (3,y) (10,blue) (10,red)
    assert [it[1:] for it in ds.train] == [(1, 0, 3), (1, 1, 3), (1, 2, 2), (0, 0, 0), (0, 1, 1)]
    assert (ds.num_train_pids, ds.num_train_clothes) == (2, 4)
    assert ds.pid2clothes.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    # test pids stay raw; query and gallery share one clothes mapping: (7,a) (7,b) (8,a) (8,b) (9,c)
    assert [it[1:] for it in ds.query] == [(7, 0, 0), (8, 1, 2)]
    assert [it[1:] for it in ds.gallery] == [(7, 1, 0), (7, 2, 1), (8, 0, 3), (9, 0, 4)]
    for split, items in (("train", ds.train), ("query", ds.query), ("gallery", ds.gallery)):
        assert [it[0] for it in items] == [str(tmp_path / r[0]) for r in ROWS[split]]  # CSV order, absolute
        assert all(os.path.isabs(it[0]) and os.path.isfile(it[0]) for it in items)
    assert [(s, m) for s, _, _, m in ds.protocols] == [("general", "general"), ("cc", "cc"), ("sc", "sc")]
    assert all(q is ds.query and g is ds.gallery for _, q, g, _ in ds.protocols)
    assert "cc (2 q / 4 g" in ds.statistics()


def test_clothes_names_are_the_users_labels(tmp_path):
    ds = D.build_dataset("custom", make(tmp_path))
    names = ds.clothes_names()  # test clothes ids -> the clothes column's text, for the figures
    assert [names[it[3]] for it in ds.query + ds.gallery] == [r[3] for r in ROWS["query"] + ROWS["gallery"]]
    assert D.build_dataset("custom", make(tmp_path / "plain", clothes=False)).clothes_names() is None


def test_round_trip_without_clothes(tmp_path):
    ds = D.build_dataset("custom", make(tmp_path, clothes=False))
    assert not ds.has_clothes
    assert [it[1:] for it in ds.train] == [(1, 0, 1), (1, 1, 1), (1, 2, 1), (0, 0, 0), (0, 1, 0)]  # clothes = pid
    assert ds.num_train_clothes == ds.num_train_pids == 2
    assert [it[3] for it in ds.query + ds.gallery] == [it[1] for it in ds.query + ds.gallery]
    assert [s for s, *_ in ds.protocols] == ["general"]
    assert "|         - |" in ds.statistics()  # no clothes count


def test_absolute_paths_header_order_and_blank_lines(tmp_path):
    """Absolute paths, columns in another order, an empty clothes column = no labels, a BOM, blank lines."""
    make(tmp_path / "images_only", clothes=False)  # the images live elsewhere
    root = tmp_path / "csvs"
    root.mkdir()
    for split, recs in ROWS.items():
        lines = ["\ufeffpid,camid,path,clothes"] + [f"{pid},{cam},{tmp_path / 'images_only' / path}," for path, pid, cam, _ in recs]
        (root / f"{split}.csv").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    ds = D.build_dataset("custom", str(root))
    assert not ds.has_clothes and ds.train[0][0] == str(tmp_path / "images_only" / "img" / "t1.png")
    assert [it[1] for it in ds.train] == [1, 1, 1, 0, 0]


def test_protocol_without_a_valid_query_is_left_out(tmp_path, caplog):
    """No query meets its identity in other clothes: cc would make evaluation fail after training."""
    gallery = [("img/g1.png", "7", "1", "a"), ("img/g3.png", "8", "0", "a")]
    ds = D.build_dataset("custom", make(tmp_path, with_rows("gallery", gallery)))
    assert [s for s, *_ in ds.protocols] == ["general", "sc"]
    assert "the cc protocol is left out" in caplog.text


def test_queries_without_a_match_from_another_camera_are_counted(tmp_path, caplog):
    gallery = ROWS["gallery"] + [("img/g5.png", "6", "1", "a")]
    query = ROWS["query"] + [("img/q3.png", "6", "1", "b")]
    D.build_dataset("custom", make(tmp_path, {**ROWS, "query": query, "gallery": gallery}))
    assert "1 of 3 queries have no gallery image of their identity from another camera" in caplog.text
    assert f"{tmp_path / 'query.csv'} line 4" in caplog.text


# ---- validation: one error each, naming the file and line ----------------------------------------

def test_missing_csv(tmp_path):
    make(tmp_path)
    os.remove(tmp_path / "gallery.csv")
    with pytest.raises(UserError, match=re.escape(f"custom: missing {tmp_path / 'gallery.csv'}")) as e:
        D.build_dataset("custom", str(tmp_path))
    assert "\n" not in str(e.value) and "train.csv, query.csv and gallery.csv" in str(e.value)


def test_missing_header(tmp_path):
    make(tmp_path, header="img/t0.png,10,0,red")
    message = error(tmp_path)
    assert f"{csv_line(tmp_path, 'train', 1)} is not a header" in message and "path,pid,camid" in message


def test_empty_file(tmp_path):
    make(tmp_path)
    (tmp_path / "query.csv").write_text("")
    assert f"{csv_line(tmp_path, 'query', 1)} is not a header (the file is empty)" in error(tmp_path)


def test_missing_column(tmp_path):
    make(tmp_path, header="path,pid,cam,clothes")
    message = error(tmp_path)
    assert f"{csv_line(tmp_path, 'train', 1)}: the header lacks the column(s) 'camid'" in message
    make(tmp_path, header="path,pid,camid,cloths")  # a typo would silently turn CAL off
    assert "has unknown column(s) 'cloths'" in error(tmp_path)


def test_wrong_number_of_values(tmp_path):
    make(tmp_path, with_rows("train", ROWS["train"] + [("img/t6.png", "3", "1")]))
    assert f"{csv_line(tmp_path, 'train', 7)} has 3 values but the header names 4 columns" in error(tmp_path)


def test_missing_image(tmp_path):
    make(tmp_path)
    os.remove(tmp_path / "img" / "g2.png")
    message = error(tmp_path)
    assert f"{csv_line(tmp_path, 'gallery', 3)}: image img/g2.png does not exist (resolved to " \
           f"{tmp_path / 'img' / 'g2.png'})" in message
    assert message.endswith("Fix or remove it.")  # build_dataset's callers (the training scripts) have no --skip-bad
    with pytest.raises(UserError, match=r"Fix or remove it, or pass --skip-bad to skip such rows\.$"):
        D.build_dataset("custom", str(tmp_path), skip_hint="--skip-bad")


def test_pid_not_an_integer(tmp_path):
    make(tmp_path, with_rows("query", [ROWS["query"][0], ("img/q2.png", "p8", "1", "a")]))
    message = error(tmp_path)
    assert f"{csv_line(tmp_path, 'query', 3)}: pid 'p8' is not an integer" in message
    assert message.endswith("Fix or remove it.") and "skip" not in message
    with pytest.raises(UserError, match=r"or pass skip_bad=True to skip such rows\.$"):  # the class used directly
        D.Custom(str(tmp_path))


def test_latin1_byte_names_its_line(tmp_path):
    make(tmp_path)
    with open(tmp_path / "train.csv", "ab") as f:
        f.write(b"img/t1.png,10,0,caf\xe9\n")  # line 7: Latin-1, not UTF-8
    assert f"{csv_line(tmp_path, 'train', 7)} is not UTF-8 text (byte 0xe9 at column 20)" in error(tmp_path)
    make(tmp_path)
    with open(tmp_path / "query.csv", "wb") as f:  # line 2 of a file with a byte-order mark
        f.write(b"\xef\xbb\xbf" + HEADER.encode() + b"\nimg/q1.png,7,0,\xe0\n")
    assert f"{csv_line(tmp_path, 'query', 2)} is not UTF-8" in error(tmp_path)


def test_negative_pids_are_gallery_distractors(tmp_path):
    gallery = ROWS["gallery"] + [("img/g5.png", "-1", "0", "c"), ("img/g6.png", "-1", "2", "a")]
    ds = D.build_dataset("custom", make(tmp_path, with_rows("gallery", gallery)))
    assert [it[1] for it in ds.gallery] == [7, 7, 8, 9, -1, -1]  # kept, never a query's identity
    assert "gallery distractors (pid < 0, never a correct match): 2 images" in ds.statistics()
    for split, line in (("query", 3), ("train", 2)):
        rows = list(ROWS[split])
        rows[line - 2] = (rows[line - 2][0], "-1", *rows[line - 2][2:])
        message = error(make(tmp_path / split, with_rows(split, rows)))
        assert f"{csv_line(tmp_path / split, split, line)}: pid -1 is negative, which marks a distractor" in message


def test_every_image_is_decoded_up_front(tmp_path, capsys):
    root = make(tmp_path)
    (tmp_path / "img" / "g2.png").write_bytes(b"")  # empty
    (tmp_path / "img" / "g4.png").write_text("not an image\n")  # text named .png
    good = (tmp_path / "img" / "t2.png").read_bytes()
    (tmp_path / "img" / "t2.png").write_bytes(good[:len(good) // 2])  # truncated
    message = error(root)
    assert message.startswith("custom: 3 of 11 images cannot be read: ")
    for split, line, name in (("train", 3, "t2"), ("gallery", 3, "g2"), ("gallery", 5, "g4")):
        assert f"{csv_line(root, split, line)} ({tmp_path / 'img' / name}.png): " in message
    assert D.main(["--stats", "custom", "--root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: custom: 3 of 11 images cannot be read")
    assert f"{csv_line(root, 'gallery', 5)}" in err
    assert D.build_dataset("custom", root, check_images=False).gallery  # the check can be left to the caller


def test_a_truncated_jpeg_is_found(tmp_path):
    root = make(tmp_path)
    Image.new("RGB", (64, 128), (200, 30, 30)).save(tmp_path / "img" / "big.jpg", quality=95)
    data = (tmp_path / "img" / "big.jpg").read_bytes()
    (tmp_path / "img" / "big.jpg").write_bytes(data[:len(data) - 200])  # the header opens, the pixels do not
    write_csv(tmp_path / "gallery.csv", HEADER, ROWS["gallery"] + [("img/big.jpg", "9", "1", "c")])
    message = error(root)
    assert f"{csv_line(root, 'gallery', 6)} ({tmp_path / 'img' / 'big.jpg'}): " in message and "runcated" in message


def test_camid_not_an_integer(tmp_path):
    make(tmp_path, with_rows("train", [("img/t1.png", "10", "cam0", "red")] + ROWS["train"][1:]))
    assert f"{csv_line(tmp_path, 'train', 2)}: camid 'cam0' is not an integer" in error(tmp_path)


def test_clothes_in_some_rows_only(tmp_path):
    make(tmp_path, with_rows("train", ROWS["train"][:3] + [("img/t4.png", "3", "0", "")] + ROWS["train"][4:]))
    message = error(tmp_path)
    assert f"{csv_line(tmp_path, 'train', 5)} has no clothes label but {csv_line(tmp_path, 'train', 2)} has one" in message
    # a file without the column, the others with it
    make(tmp_path)
    write_csv(tmp_path / "gallery.csv", "path,pid,camid", [r[:3] for r in ROWS["gallery"]])
    assert f"{csv_line(tmp_path, 'gallery', 2)} has no clothes label" in error(tmp_path)


def test_one_camera_only(tmp_path):
    rows = {split: [(p, pid, "4", c) for p, pid, _, c in recs] for split, recs in ROWS.items()}
    message = error(make(tmp_path, rows))
    assert "query and gallery splits hold one camera only (camid 4" in message
    assert str(tmp_path / "query.csv") in message and str(tmp_path / "gallery.csv") in message


def test_no_query_matches_from_another_camera(tmp_path):
    query = [("img/q1.png", "7", "1", "a"), ("img/q2.png", "8", "0", "a")]  # each on its gallery's camera
    gallery = [("img/g1.png", "7", "1", "a"), ("img/g3.png", "8", "0", "b")]
    message = error(make(tmp_path, {**ROWS, "query": query, "gallery": gallery}))
    assert f"no query has a gallery image of its identity from another camera (e.g. {csv_line(tmp_path, 'query', 2)}" in message


def test_query_identities_absent_from_gallery(tmp_path):
    query = ROWS["query"] + [(f"img/q{i}.png", str(100 + i), "0", "a") for i in range(3, 10)]
    message = error(make(tmp_path, with_rows("query", query)))
    assert "7 query identities never appear in the gallery: pid 103, 104, 105, 106, 107, ..." in message
    assert f"first at {csv_line(tmp_path, 'query', 4)}" in message and "remove their rows" in message


def test_empty_split(tmp_path):
    make(tmp_path, with_rows("train", []))
    message = error(tmp_path)
    assert f"the train split is empty: {tmp_path / 'train.csv'} has no rows after its header (line 1)" in message


def test_duplicated_row(tmp_path):
    make(tmp_path, with_rows("gallery", ROWS["gallery"] + [ROWS["gallery"][1]]))
    assert f"{csv_line(tmp_path, 'gallery', 6)} repeats the image of line 3 (img/g2.png)" in error(tmp_path)


def test_skip_bad_skips_bad_rows(tmp_path, caplog):
    make(tmp_path, with_rows("train", ROWS["train"] + [("img/t1.png", "10", "0", "red"), ("img/none.png", "3", "0", "x")]))
    os.remove(tmp_path / "img" / "none.png")
    ds = D.build_dataset("custom", str(tmp_path), skip_bad=True)
    assert len(ds.train) == 5 and ds.skipped == {"train": 2}
    assert "skipped 2 bad train entries (1 missing image, 1 repeated image)" in caplog.text


# ---- command line and training -------------------------------------------------------------------

def test_stats_cli(tmp_path, capsys):
    root = make(tmp_path / "mine", clothes=False)
    assert D.main(["--stats", "custom", "--root", root]) == 0
    out = capsys.readouterr().out
    assert f"=> custom from {root}" in out and "protocols: general (2 q / 4 g, general masks)" in out
    os.remove(tmp_path / "mine" / "img" / "t3.png")
    assert D.main(["--stats", "custom", "--root", root]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: custom: {csv_line(root, 'train', 4)}: image img/t3.png does not exist")
    assert err.rstrip().endswith("Fix or remove it, or pass --skip-bad to skip such rows.")  # its own flag
    assert D.main(["--stats", "custom", "--root", root, "--skip-bad"]) == 0


@pytest.fixture
def custom_root(data_root, tmp_path) -> str:
    """The small synthetic benchmark as CSV files without clothes labels, absolute paths."""
    pattern = re.compile(r"^(\d+)_\d+_c(\d+)_\d+\.png$")
    for split, folder in (("train", "train"), ("query", "query"), ("gallery", "test")):
        src = os.path.join(data_root, "SYNTH_CC", folder)
        rows = [(os.path.join(src, n), *pattern.match(n).groups()) for n in sorted(os.listdir(src)) if n.endswith(".png")]
        write_csv(tmp_path / f"{split}.csv", "path,pid,camid", rows)
    return str(tmp_path)


def test_training_without_clothes_labels(custom_root, tmp_path):
    common = ["--dataset", "custom", "--root", custom_root, "--arch", "tiny", "--img-size", "64", "32",
              "--device", "cpu", "--workers", "0", "--seed", "5", "--log-every", "1000", "--epochs", "1",
              "--warmup-epochs", "1", "--batch-size", "16"]
    out = tmp_path / "run"
    assert train_stage1.main(common + ["--output-dir", str(out)]) == 0
    assert train_stage2.main(common + ["--output-dir", str(out), "--num-instances", "4", "--cal-start", "0",
                                       "--milestones", "1", "--eval-every", "1"]) == 0
    assert json.loads((out / "args_stage2.json").read_text())["dataset"] == "custom"
    assert "custom has no clothes labels: the clothes-adversarial loss is disabled" in (out / "stage2.log").read_text()
    history = [json.loads(line) for line in (out / "metrics_stage2.jsonl").read_text().splitlines()]
    assert len(history) == 1 and "cal" not in history[0]  # --cal-start 0, yet no adversarial loss
    assert set(history[0]["metrics"]) == {"general"}
