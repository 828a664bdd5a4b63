"""masks.py: the LIP/SCHP label table, where a dataset's masks are, the up-front check's one error line,
and the coverage that `python -m datasets --stats --masks` reports."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import datasets as D
import masks as M
from utils import UserError

LTCC_FILES = ["train/001_1_c1_000001.png", "train/001_1_c2_000002.png", "train/005_1_c1_000004.png",
              "query/010_1_c1_000001.png", "test/010_1_c2_000003.png"]
HEIGHT, WIDTH = 8, 4


@pytest.fixture
def ltcc(tmp_path):
    """A small LTCC tree (8x4 images) and a folder for its masks."""
    for name in LTCC_FILES:
        path = tmp_path / "LTCC_ReID" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (WIDTH, HEIGHT), (10, 20, 30)).save(path)
    return D.build_dataset("ltcc", str(tmp_path)), tmp_path / "parsing"


def write_schp(path, labels, palette: bool = True) -> None:
    """A label PNG as SCHP writes it: the labels as pixel values, a palette attached (mode P), or grey (L)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(labels, np.uint8))
    if palette:
        image.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    image.save(path)


def all_masks(folder, labels=None) -> None:
    for name in LTCC_FILES:
        write_schp(folder / name, np.full((HEIGHT, WIDTH), 5) if labels is None else labels)


def test_the_schp_table_maps_lip_labels_to_the_synthetic_parts():
    names = [name for name, _ in M.SCHP_PARTS]
    assert len(names) == 20 and names[:3] == ["background", "hat", "hair"] and names[19] == "right-shoe"
    assert all(part in M.PARTS for _, part in M.SCHP_PARTS)
    clothes = {name for name, part in M.SCHP_PARTS if part in M.CLOTHES_PARTS}
    person = {name for name, part in M.SCHP_PARTS if part in M.PERSON_PARTS}
    assert clothes == {"hat", "glove", "upper-clothes", "dress", "coat", "socks", "pants", "jumpsuits", "scarf", "skirt"}
    assert person == {"hair", "sunglasses", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
                      "right-shoe"}
    assert dict(M.SCHP_PARTS)["background"] == "background"


@pytest.mark.parametrize("palette", [True, False])
def test_schp_masks_are_read_through_the_table(ltcc, palette):
    dataset, folder = ltcc
    all_masks(folder)
    labels = np.arange(20, dtype=np.uint8).repeat(2)[:HEIGHT * WIDTH].reshape(HEIGHT, WIDTH)
    write_schp(folder / LTCC_FILES[0], labels, palette)
    source = M.mask_source(dataset, str(folder))
    parts = source.read(dataset.train[0][0])
    expected = [M.PARTS.index(M.SCHP_PARTS[v][1]) for v in labels.ravel()]
    assert parts.dtype == np.uint8 and parts.ravel().tolist() == expected


def test_where_the_masks_are(ltcc, tmp_path):
    dataset, folder = ltcc
    assert M.mask_source(dataset, None) is None  # a real dataset without --masks has none
    all_masks(folder / "LTCC_ReID")  # --masks may also be the folder holding one named like the dataset's
    source = M.mask_source(dataset, str(folder))
    assert source.masks_dir == str(folder / "LTCC_ReID")
    assert source.path(str(tmp_path / "LTCC_ReID" / "query" / "010_1_c1_000001.png")) == \
        str(folder / "LTCC_ReID" / "query" / "010_1_c1_000001.png")
    with pytest.raises(UserError, match="--masks .*nowhere is not a folder"):
        M.mask_source(dataset, str(tmp_path / "nowhere"))


def test_missing_and_bad_masks_are_one_error_line_naming_each_file(ltcc):
    dataset, folder = ltcc
    all_masks(folder)
    os.remove(folder / LTCC_FILES[1])
    write_schp(folder / LTCC_FILES[2], np.full((HEIGHT, WIDTH), 20))  # LIP has 20 labels: 0-19
    Image.new("RGB", (WIDTH, HEIGHT)).save(folder / LTCC_FILES[3])   # a coloured rendering, not labels
    write_schp(folder / LTCC_FILES[4], np.zeros((HEIGHT * 2, WIDTH * 2)))  # another size than its image
    with pytest.raises(UserError) as e:
        M.mask_source(dataset, str(folder))
    message = str(e.value)
    assert "\n" not in message and message.startswith("ltcc: 4 of 5 part masks are missing or bad: ")
    assert f"part mask {folder / LTCC_FILES[1]} does not exist" in message
    assert f"part mask {folder / LTCC_FILES[2]} holds label 20, outside 0-19" in message
    assert f"part mask {folder / LTCC_FILES[3]} holds RGB pixels, not labels" in message
    assert f"part mask {folder / LTCC_FILES[4]} is 8x16 but its image is 4x8" in message
    assert message.endswith(f"under {folder}, or leave out --masks.")


def test_a_mask_that_goes_missing_after_the_check_names_its_file(ltcc):
    dataset, folder = ltcc
    all_masks(folder)
    source = M.mask_source(dataset, str(folder))
    os.remove(folder / LTCC_FILES[0])
    with pytest.raises(UserError, match=re.escape(f"part mask {folder / LTCC_FILES[0]} does not exist. Give every")):
        source.read(dataset.train[0][0])


def test_datasets_cli_reports_mask_coverage(ltcc, capsys):
    dataset, folder = ltcc
    root = os.path.dirname(dataset.dir)
    all_masks(folder)
    assert D.main(["--stats", "ltcc", "--root", root, "--masks", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "images with a usable one: train 3 of 3, query 1 of 1, gallery 1 of 1" in out
    assert "top 100.0 %" in out  # label 5, upper-clothes
    os.remove(folder / LTCC_FILES[3])
    assert D.main(["--stats", "ltcc", "--root", root, "--masks", str(folder)]) == 2
    captured = capsys.readouterr()
    assert "train 3 of 3, query 0 of 1, gallery 1 of 1" in captured.out
    assert captured.err.startswith("error: ltcc: 1 of 5 part masks are missing or bad: ") and \
        len(captured.err.strip().splitlines()) == 1


def test_the_synthetic_benchmark_brings_its_own_masks(data_root, capsys):
    assert D.main(["--stats", "synthetic", "--root", data_root]) == 0
    out = capsys.readouterr().out
    assert "part masks (the synthetic benchmark's masks): images with a usable one: train " in out
    shares = dict(re.findall(r"(\w+) ([\d.]+) %", out.split("pixels per part:")[1]))
    assert set(shares) == set(M.PARTS) and float(shares["background"]) > 10 and float(shares["top"]) > 5


def test_imports_go_one_way():
    """masks.py needs neither the datasets package nor loaders.py (its --stats CLI imports masks), and loaders.py
    imports masks.py only for its type hints."""
    code = "import sys; sys.path.insert(0, '.'); import masks; assert not {'datasets', 'loaders'} & set(sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code = "import sys; sys.path.insert(0, '.'); import loaders; assert 'masks' not in sys.modules, 'masks imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
