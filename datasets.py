"""Datasets for cloth-changing person re-identification.

One class per on-disk layout (METHOD.md section 6), all with the same interface:
`.train`, `.query`, `.gallery` are lists of `(path, pid, camid, clothes_id)`; training pids and
clothes are relabelled 0..n-1 in sorted order of the raw keys; test pids keep their raw ids and
query/gallery share one clothes mapping; `.protocols` lists `(setting, query, gallery, mask)`
for evaluation. `build_dataset(name, root)` picks the class from the registry.

Also here: the `synthetic` dataset (its generator is the synthetic package; generated on first use),
the check of every image (`ReIDDataset.check_images`, and `check_files` for other per-image files such
as part masks), the label-CSV reader that tools/search.py shares (`read_label_csv`) and which files are
images (`image_extensions`, `list_images`). How images become batches is loaders.py; part masks are masks.py.

    python datasets.py --stats ltcc --root /data
    python datasets.py --stats synthetic --root data     # the benchmark under data (made by python -m synthetic)
    python datasets.py --stats custom --root mydata      # your own data: mydata/{train,query,gallery}.csv
    python datasets.py --stats ltcc --root /data --masks /data/LTCC_parsing   # + part-mask coverage (masks.py)

Your own labelled data (`--dataset custom --root DIR`): one CSV per split in DIR, `train.csv`,
`query.csv` and `gallery.csv`, one image per row, paths relative to DIR (or absolute); pid and
camid are integers, the optional clothes column is any text (an outfit of that identity):

    path,pid,camid,clothes
    images/0001_c0_a.jpg,1,0,red_coat
    images/0001_c2_b.jpg,1,2,grey_suit
    /data/more/0002_017.jpg,2,3,red_coat

Without the clothes column only the general protocol is evaluated and stage 2 has no clothes-
adversarial loss. A negative pid (Market-1501's -1) marks a gallery distractor: it never matches a
query; train and query rows must not have one. Every row is checked, and every image of every
dataset decoded, before anything trains (class `Custom`, `build_dataset`).
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from PIL import Image

from metrics import protocol_masks
from utils import UserError, check_stop, run_cli

log = logging.getLogger("datasets")

Item = tuple[str, int, int, int]  # (path, pid, camid, clothes_id)
LABEL_COLUMNS = ("path", "pid", "camid", "clothes")  # of a label CSV (read_label_csv)


@functools.cache
def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the image formats Pillow can open: its registered
    extensions whose format has an opener (.pdf, say, is registered for writing only). The one rule for
    what is an image file, in dataset folders and in tools/search.py's folders."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def list_images(folder: str, recursive: bool = False) -> tuple[list[str], list[str]]:
    """(image paths, other entries) of `folder` (and of its subfolders when recursive), each sorted: the
    order must not depend on the filesystem. Hidden entries (.DS_Store & co.) are left out; an image is a
    file whose extension Pillow reads (image_extensions)."""
    if recursive:
        names = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names += [os.path.join(dirpath, n) for n in filenames]
    else:
        names = [os.path.join(folder, n) for n in os.listdir(folder)]
    images, others = [], []
    for path in sorted(names):
        name = os.path.basename(path)
        if not name.startswith("."):
            (images if os.path.splitext(name)[1].lower() in image_extensions() else others).append(path)
    return images, others


# -----------------------------------------------------------------------------
# Parsers: shared machinery

class ReIDDataset:
    """Base class: locates the dataset folder, scans files, relabels, builds the protocols.

    Subclasses set `name`, `folder`, `required` (paths that must exist inside the folder) and
    `layout` (sketch for error messages), and call `self._finish(train, query, gallery)` with raw
    records `(path, raw_pid, camid, clothes_key)`.
    """
    name = ""
    folder = ""
    required: tuple[str, ...] = ()
    layout = ""
    has_clothes = True

    def __init__(self, root: str, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.skipped: dict[str, int] = {}  # split -> number of bad files skipped
        self.skip_reasons: dict[str, dict[str, int]] = {}  # split -> {reason: count}, for the skip report
        self.origins: dict[str, str] = {}  # image path -> the list line it came from (list-file layouts)
        self.dir = self._locate(root)

    # -- locating and scanning -------------------------------------------------------------
    def _layout_help(self) -> str:
        return f"Expected layout:\n{self.layout}\nPass --root as the folder that holds {self.folder}/ (or {self.folder}/ itself)."

    def _locate(self, root: str) -> str:
        if not os.path.isdir(root):
            raise UserError(f"{self.name}: root folder {root} does not exist (or is not a folder).\n{self._layout_help()}")
        nested = os.path.join(root, self.folder)
        for cand in (nested, root):  # the dataset's own folder may be given directly
            if all(os.path.exists(os.path.join(cand, r)) for r in self.required):
                return cand
        # Name the first missing piece of the most plausible candidate.
        base = nested if os.path.isdir(nested) else root
        if base is root and os.path.basename(os.path.normpath(root)) != self.folder \
                and not any(os.path.exists(os.path.join(root, r)) for r in self.required):
            raise UserError(f"{self.name}: dataset folder {nested} not found.\n{self._layout_help()}")
        missing = next(os.path.join(base, r) for r in self.required if not os.path.exists(os.path.join(base, r)))
        raise UserError(f"{self.name}: missing {missing}.\n{self._layout_help()}")

    def _bad(self, split: str, what: str, reason: str) -> None:
        """A file or line that does not fit the layout: an error, or counted when skip_bad. `reason`
        names the kind of problem for the skip report ("missing image", "bad file name", ...)."""
        if not self.skip_bad:
            raise BadEntry(f"{self.name}: {what}", "rows" if " line " in what else "files")
        self.skipped[split] = self.skipped.get(split, 0) + 1
        reasons = self.skip_reasons.setdefault(split, {})
        reasons[reason] = reasons.get(reason, 0) + 1

    def _images(self, folder: str, split: str) -> list[str]:
        """Sorted image paths in a folder (list_images)."""
        images, others = list_images(folder)
        if others:  # e.g. Market's Thumbs.db: not an image, so not a bad image name; but say so
            log.warning("%s: ignored %d entries that are not images in %s (e.g. %s)", self.name, len(others), folder,
                        os.path.basename(others[0]))
        return images

    def _scan(self, folder: str, split: str, parse) -> list[tuple]:
        """Parse every image of a folder with `parse(path) -> record or None (bad name)`."""
        records = []
        for path in self._images(folder, split):
            rec = parse(path)
            if rec is None:
                self._bad(split, f"file {path} does not match the {self.name} naming pattern", "bad file name")
            else:
                records.append(rec)
        return records

    def _read_list(self, list_name: str, img_dir: str, parse, expected: str) -> list[tuple]:
        """Records from a list file, `parse(line) -> (relative path, pid, camid, clothes key) or None`."""
        list_path, records = os.path.join(self.dir, list_name), []
        with open(list_path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec, where = parse(line.strip()), f"line {lineno} of {list_path}"
                if rec is None:
                    self._bad(list_name, f"{where} is not `{expected}` ({line.strip()!r})", "line not in the format")
                elif not os.path.isfile(os.path.join(self.dir, img_dir, rec[0])):
                    self._bad(list_name, f"{where}: image {os.path.join(self.dir, img_dir, rec[0])} does not exist",
                              "missing image")
                else:
                    records.append((os.path.join(self.dir, img_dir, rec[0]), *rec[1:]))
                    self.origins.setdefault(records[-1][0], where)
        return records

    def _check_nonempty(self, records: list, split: str, where: str) -> None:
        if not records:
            raise UserError(f"{self.name}: the {split} split is empty ({where} holds no usable images).\n{self._layout_help()}")

    # -- labels -------------------------------------------------------------------------------
    def _finish(self, train: list[tuple], query: list[tuple], gallery: list[tuple]) -> None:
        for split, n in self.skipped.items():
            why = ", ".join(f"{k} {r}" for r, k in sorted(self.skip_reasons.get(split, {}).items()))
            log.warning("%s: skipped %d bad %s entries (%s)", self.name, n, split, why)
        for split, recs in (("train", train), ("query", query), ("gallery", gallery)):
            self._check_nonempty(recs, split, self.dir)
        pids = sorted({r[1] for r in train})
        keys = sorted({r[3] for r in train})
        pid2label = {p: i for i, p in enumerate(pids)}
        clothes2label = {k: i for i, k in enumerate(keys)}
        self.train = [(p, pid2label[pid], cam, clothes2label[key]) for p, pid, cam, key in train]
        self.num_train_pids, self.num_train_clothes = len(pids), len(keys)
        self.pid2clothes = np.zeros((len(pids), len(keys)), dtype=np.float32)
        for _, pid, _, clothes in self.train:
            self.pid2clothes[pid, clothes] = 1.0
        # Query and gallery share one clothes mapping so clothes ids can be compared across them.
        test_keys = {k: i for i, k in enumerate(sorted({r[3] for r in query + gallery}))}
        self.train_clothes_keys, self.test_clothes_keys = keys, list(test_keys)  # index = clothes id
        self.query = [self._test_item(r, test_keys) for r in query]
        self.gallery = [self._test_item(r, test_keys) for r in gallery]

    def _test_item(self, rec: tuple, keys: dict) -> Item:
        path, pid, cam, key = rec
        return (path, pid, cam, keys[key] if self.has_clothes else pid)

    @property
    def protocols(self) -> list[tuple[str, list[Item], list[Item], str]]:
        """What evaluation runs: (setting name, query, gallery, mask setting of METHOD.md section 5)."""
        return [("general", self.query, self.gallery, "general")]

    def clothes_names(self) -> list[str] | None:
        """The dataset's own name of each test (query/gallery) clothes id, for figures; None without
        clothes labels. The raw clothes key (e.g. LTCC's `001_2`); the custom layout's label text."""
        return [str(k) for k in self.test_clothes_keys] if self.has_clothes else None

    # -- the image check ------------------------------------------------------------------------
    def _origin(self, split: str, index: int, path: str) -> str:
        """Where an item came from, for error messages: its list/CSV line where there is one."""
        return f"{self.origins[path]} ({path})" if path in self.origins else path

    def check_images(self, workers: int | None = None) -> None:
        """Decode every image of train, query and gallery (Pillow, all pixels), `workers` threads
        (default min(8, CPUs); Pillow decodes without the GIL). One UserError lists every image that
        cannot be read, by file (and list or CSV line), so nothing fails at the first evaluation
        after hours of training. A stop request (utils.check_stop) is honoured between chunks."""
        rows = " (and their lines)" if self.origins or isinstance(self, Custom) else ""
        self.check_files(decode_problem, "images cannot be read", f"Replace or remove these files{rows} before training",
                         workers)

    def file_problems(self, problem: Callable[[str], str | None], workers: int | None = None) -> dict[str, str | None]:
        """{image path: problem(path)} for every image of train, query and gallery (each path once, in split
        order), computed in `workers` threads (default min(8, CPUs)); problem returns why the image (or a file
        that belongs to it, such as its part mask) cannot serve, or None. A stop request is honoured between chunks."""
        paths, found = list(self._first_items()), []
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(paths), 512):  # chunks: a stop waits for one chunk at most
                check_stop()
                found += pool.map(problem, paths[start:start + 512])
        return dict(zip(paths, found))

    def check_files(self, problem: Callable[[str], str | None], what: str, fix: str, workers: int | None = None,
                    found: dict[str, str | None] | None = None) -> None:
        """One UserError `{name}: {n} of {N} {what}: IMAGE: WHY; ... {fix}` listing every image (with its list or
        CSV line) for which `problem` says why it fails (file_problems; `found`: its result, if already known)."""
        found = self.file_problems(problem, workers) if found is None else found
        bad = [(p, why) for p, why in found.items() if why is not None]
        if bad:
            first = self._first_items()
            listed = "; ".join(f"{self._origin(*first[p], p)}: {why}" for p, why in bad)
            raise UserError(f"{self.name}: {len(bad)} of {len(found)} {what}: {listed}. {fix}")

    def _first_items(self) -> dict[str, tuple[str, int]]:
        """image path -> (split, index) of its first item."""
        first: dict[str, tuple[str, int]] = {}
        for split, items in (("train", self.train), ("query", self.query), ("gallery", self.gallery)):
            for i, item in enumerate(items):
                first.setdefault(item[0], (split, i))
        return first

    # -- reporting ------------------------------------------------------------------------
    def _splits(self) -> list[tuple[str, list[Item]]]:
        return [("train", self.train), ("query", self.query), ("gallery", self.gallery)]

    def statistics(self) -> str:
        """A table of identities, images, clothes and cameras per split, and the protocols."""
        rows = [f"=> {self.name} from {self.dir}",
                "  subset       |  # ids | # images | # clothes | # cameras",
                "  -------------+--------+----------+-----------+----------"]
        for split, items in self._splits():
            ids, clothes, cams = (len({it[k] for it in items}) for k in (1, 3, 2))
            rows.append(f"  {split:<12} | {ids:6d} | {len(items):8d} | {clothes if self.has_clothes else '-':>9} | {cams:8d}")
        rows.append("  protocols: " + ", ".join(f"{s} ({len(q)} q / {len(g)} g, {m} masks)" for s, q, g, m in self.protocols))
        if any(self.skipped.values()):
            rows.append("  skipped bad files: " + ", ".join(f"{k} {v}" for k, v in self.skipped.items()))
        return "\n".join(rows)


def _match(pattern: re.Pattern, path: str):
    """Patterns apply to the base name only: a root like /data/my_cc_c1/ changes no label."""
    return pattern.match(os.path.basename(path))


# -----------------------------------------------------------------------------
# Parsers: one class per layout

class LTCC(ReIDDataset):
    """LTCC_ReID/{train,query,test}/{pid}_{clothes}_c{cam}_{frame}.png; gallery = test.
    camid = the camera number - 1 (from 0, as CAL); clothes key = the raw text `{pid}_{clothes}`."""
    name = "ltcc"
    folder = "LTCC_ReID"
    required = ("train", "query", "test")
    layout = ("  ROOT/LTCC_ReID/train/{pid}_{clothes}_c{cam}_{frame}.png   e.g. 001_1_c11_015859.png\n"
              "  ROOT/LTCC_ReID/query/...\n"
              "  ROOT/LTCC_ReID/test/...   (the gallery)")
    pattern = re.compile(r"^((\d+)_\d+)_c(\d+)_\d+\.\w+$")

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        splits = [self._scan(os.path.join(self.dir, s), s, self._parse) for s in ("train", "query", "test")]
        self._finish(*splits)

    def _parse(self, path: str):
        m = _match(self.pattern, path)
        return m and (path, int(m.group(2)), int(m.group(3)) - 1, m.group(1))  # cameras from 0 (CAL)

    @property
    def protocols(self):
        return [("general", self.query, self.gallery, "general"),
                ("cc", self.query, self.gallery, "cc"),
                ("sc", self.query, self.gallery, "sc")]


class PRCC(ReIDDataset):
    """prcc/rgb/{train,val}/{pid}/{A,B,C}_*.jpg and prcc/rgb/test/{A,B,C}/{pid}/*.jpg.

    camid: A=0, B=1, C=2. Cameras A and B see the same outfit of a person, C another one, so the
    clothes key is `{pid}_AB` or `{pid}_C`. Train uses rgb/train only (val is not read).
    Test: gallery = camera A; query_same = camera B (same clothes), query_diff = camera C.
    """
    name = "prcc"
    folder = "prcc"
    required = ("rgb/train", "rgb/test/A", "rgb/test/B", "rgb/test/C")
    layout = ("  ROOT/prcc/rgb/train/{pid}/{A,B,C}_*.jpg   (and rgb/val/, not used)\n"
              "  ROOT/prcc/rgb/test/A/{pid}/*.jpg          (the gallery)\n"
              "  ROOT/prcc/rgb/test/{B,C}/{pid}/*.jpg      (queries: B same clothes, C other clothes)")
    cams = {"A": 0, "B": 1, "C": 2}

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        rgb = os.path.join(self.dir, "rgb")
        train = []
        for pid_dir in self._pid_dirs(os.path.join(rgb, "train"), "train"):
            for path in self._images(pid_dir, "train"):
                cam = os.path.basename(path)[:2]  # "A_", "B_" or "C_"
                if cam[:1] not in self.cams or cam[1:] != "_":
                    self._bad("train", f"file {path} does not start with A_, B_ or C_", "bad file name")
                    continue
                train.append(self._record(pid_dir, path, cam[0]))
        test = {}
        for cam in "ABC":
            test[cam] = [self._record(d, p, cam) for d in self._pid_dirs(os.path.join(rgb, "test", cam), "test")
                         for p in self._images(d, "test")]
            self._check_nonempty(test[cam], f"test camera {cam}", os.path.join(rgb, "test", cam))
        self._finish(train, test["B"] + test["C"], test["A"])
        n_same = len(test["B"])
        self.query_same, self.query_diff = self.query[:n_same], self.query[n_same:]

    def _pid_dirs(self, folder: str, split: str) -> list[str]:
        dirs = []
        for n in sorted(os.listdir(folder)):
            path = os.path.join(folder, n)
            if n.startswith(".") or not os.path.isdir(path):
                continue
            if not n.isdigit():
                self._bad(split, f"identity folder {path} is not a number", "bad folder name")
                continue
            dirs.append(path)
        return dirs

    def _record(self, pid_dir: str, path: str, cam: str) -> tuple:
        pid = os.path.basename(pid_dir)
        return (path, int(pid), self.cams[cam], pid + ("_AB" if cam in "AB" else "_C"))

    @property
    def protocols(self):
        return [("sc", self.query_same, self.gallery, "general"),
                ("cc", self.query_diff, self.gallery, "general")]

    def _splits(self):
        return super()._splits() + [("query_same", self.query_same), ("query_diff", self.query_diff)]


class VCClothes(ReIDDataset):
    """VC-Clothes/{train,query,gallery}/{pid}-{cam}-{clothes}-{frame}.jpg.

    camid = the camera number - 1 (0-3, as CAL); clothes key = the raw texts of pid and clothes
    concatenated (as CAL does). Protocols follow CAL: general over all cameras, SC on raw cameras
    2 and 3, CC on raw cameras 3 and 4, each with the plain (general) masks; the SC/CC variants
    number their clothes over their camera subset, as CAL's do.
    """
    name = "vcclothes"
    folder = "VC-Clothes"
    required = ("train", "query", "gallery")
    layout = ("  ROOT/VC-Clothes/train/{pid}-{cam}-{clothes}-{frame}.jpg   e.g. 0001-01-01-01.jpg\n"
              "  ROOT/VC-Clothes/query/...\n"
              "  ROOT/VC-Clothes/gallery/...")
    pattern = re.compile(r"^(\d+)-(\d+)-(\d+)-\d+\.\w+$")
    cam_subsets = {"sc": (2, 3), "cc": (3, 4)}
    mode = "all"  # "sc"/"cc" in the subclasses: query and gallery restricted to those cameras

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        train, query, gallery = [self._scan(os.path.join(self.dir, s), s, self._parse) for s in ("train", "query", "gallery")]
        if self.mode != "all":
            query, gallery = self.subset(query, self.mode), self.subset(gallery, self.mode)
            self._check_nonempty(query, f"{self.mode} camera subset of query", self.dir)
            self._check_nonempty(gallery, f"{self.mode} camera subset of gallery", self.dir)
        self._finish(train, query, gallery)

    def _parse(self, path: str):
        m = _match(self.pattern, path)
        return m and (path, int(m.group(1)), int(m.group(2)) - 1, m.group(1) + m.group(3))  # cameras from 0

    @classmethod
    def subset(cls, items: list, mode: str) -> list:
        """Items (or raw records) seen by the raw cameras of `mode` (camid = raw number - 1)."""
        return [it for it in items if it[2] + 1 in cls.cam_subsets[mode]]

    @property
    def protocols(self):
        if self.mode != "all":
            return [(self.mode, self.query, self.gallery, "general")]
        return [("general", self.query, self.gallery, "general")] + [
            (m, self.subset(self.query, m), self.subset(self.gallery, m), "general") for m in ("sc", "cc")]


class VCClothesSC(VCClothes):
    name = "vcclothes_sc"
    mode = "sc"


class VCClothesCC(VCClothes):
    name = "vcclothes_cc"
    mode = "cc"


class Market1501(ReIDDataset):
    """Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/{pid}_c{cam}s{seq}_{frame}_{n}.jpg.

    No clothes labels: clothes id = pid. In the official protocol pid -1 marks junk detections
    and pid 0 distractors: both are dropped from training (with a log line) and kept in the
    gallery, where they never match a query (queries never hold them; if one does it is dropped
    with a log line).
    """
    name = "market1501"
    folder = "Market-1501-v15.09.15"
    required = ("bounding_box_train", "query", "bounding_box_test")
    layout = ("  ROOT/Market-1501-v15.09.15/bounding_box_train/{pid}_c{cam}s{seq}_{frame}_{n}.jpg\n"
              "  ROOT/Market-1501-v15.09.15/query/...\n"
              "  ROOT/Market-1501-v15.09.15/bounding_box_test/...   (the gallery)")
    has_clothes = False
    pattern = re.compile(r"^(-?\d+)_c(\d+)s\d+_\d+_\d+\.\w+$")

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        train, query, gallery = [self._scan(os.path.join(self.dir, s), s, self._parse)
                                 for s in ("bounding_box_train", "query", "bounding_box_test")]
        train, query = self._drop_junk(train, "train"), self._drop_junk(query, "query")
        self._finish(train, query, gallery)

    def _parse(self, path: str):
        m = _match(self.pattern, path)
        return m and (path, int(m.group(1)), int(m.group(2)) - 1, int(m.group(1)))  # cameras from 0

    def _drop_junk(self, records: list, split: str) -> list:
        kept = [r for r in records if r[1] > 0]
        if len(kept) < len(records):
            log.info("%s: dropped %d %s image(s) with pid 0 or -1 (distractors/junk)", self.name, len(records) - len(kept), split)
        return kept


class MSMT17(ReIDDataset):
    """MSMT17_V1/{train,test}/ with list_{train,val,query,gallery}.txt, lines `relative/path pid`.

    Train = list_train + list_val (the usual practice); query/gallery paths are relative to
    test/. camid = the third `_` field of the file name - 1 (0000_000_01_0303morning_0015_0.jpg -> 0).
    No clothes labels: clothes id = pid.
    """
    name = "msmt17"
    folder = "MSMT17_V1"
    required = ("train", "test", "list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
    layout = ("  ROOT/MSMT17_V1/train/{pid}/{pid}_{n}_{cam}_{time}_{n}_{n}.jpg\n"
              "  ROOT/MSMT17_V1/test/...\n"
              "  ROOT/MSMT17_V1/list_{train,val,query,gallery}.txt   (lines: relative/path pid)")
    has_clothes = False

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        read = lambda name, img_dir: self._read_list(name, img_dir, self._parse_line, "relative/path pid")
        train = read("list_train.txt", "train") + read("list_val.txt", "train")
        self._finish(train, read("list_query.txt", "test"), read("list_gallery.txt", "test"))

    @staticmethod
    def _parse_line(line: str):
        parts = line.split()
        fields = os.path.basename(parts[0]).split("_")
        if len(parts) != 2 or not parts[1].isdigit() or len(fields) < 3 or not fields[2].isdigit():
            return None
        return parts[0], int(parts[1]), int(fields[2]) - 1, int(parts[1])  # cameras from 0


class CelebReID(ReIDDataset):
    """Celeb-reID/{train,query,gallery}/{pid}_{n}_{x}.jpg.

    No cameras and no clothes labels (as CSSC's code): every image is its own camera (camid = a
    running index, unique over train, query and gallery, so no gallery image is ever junk) and
    clothes id = pid.
    """
    name = "celebreid"
    folder = "Celeb-reID"
    required = ("train", "query", "gallery")
    layout = ("  ROOT/Celeb-reID/train/{pid}_{n}_{x}.jpg\n"
              "  ROOT/Celeb-reID/query/...\n"
              "  ROOT/Celeb-reID/gallery/...")
    has_clothes = False
    pattern = re.compile(r"^(\d+)_\d+_\d+\.\w+$")

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        splits = [self._scan(os.path.join(self.dir, s), s, self._parse) for s in ("train", "query", "gallery")]
        counter = iter(range(sum(map(len, splits))))
        self._finish(*[[(p, pid, next(counter), key) for p, pid, _, key in recs] for recs in splits])

    def _parse(self, path: str):
        m = _match(self.pattern, path)
        return m and (path, int(m.group(1)), 0, int(m.group(1)))


class DeepChange(ReIDDataset):
    """DeepChangeDataset/{train-set,test-set-query,test-set-gallery}/ with `<split>-bbox.txt` lists.

    Assumed format (CAL's reading of the release; the data itself was not available to check):
    each list line is `relative/name.jpg,tracklet_id[,...]`, the base name is
    `P{pid}_C{cam}_{day}_...`, and the third field (the recording day) stands for the outfit, so
    the clothes key is `P{pid}` + `{day}`. camid := tracklet id, so that true matches from the same
    camera but another tracklet count, as the DeepChange protocol allows.
    """
    name = "deepchange"
    folder = "DeepChangeDataset"
    splits = (("train-set", "train-set-bbox.txt"), ("test-set-query", "test-set-query-bbox.txt"),
              ("test-set-gallery", "test-set-gallery-bbox.txt"))
    required = tuple(p for pair in splits for p in pair)
    layout = ("  ROOT/DeepChangeDataset/train-set/P{pid}_C{cam}_{day}_....jpg\n"
              "  ROOT/DeepChangeDataset/train-set-bbox.txt   (lines: name.jpg,tracklet_id,...)\n"
              "  ROOT/DeepChangeDataset/test-set-query/ and test-set-query-bbox.txt\n"
              "  ROOT/DeepChangeDataset/test-set-gallery/ and test-set-gallery-bbox.txt")
    pattern = re.compile(r"^([A-Za-z](\d+))_[A-Za-z]?\d+_([^_.]+)")

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        self._finish(*[self._read_list(lst, d, self._parse_line, "P<pid>_C<cam>_<day>_....jpg,<tracklet>")
                       for d, lst in self.splits])

    def _parse_line(self, line: str):
        parts = [p.strip() for p in line.split(",")]
        m = _match(self.pattern, parts[0])
        if len(parts) < 2 or not parts[1].isdigit() or m is None:
            return None
        return parts[0], int(m.group(2)), int(parts[1]), m.group(1) + m.group(3)


class Custom(ReIDDataset):
    """Users' own data: ROOT/{train,query,gallery}.csv, header `path,pid,camid[,clothes]`.

    One image per row; paths relative to the CSV's folder (or absolute; items hold absolute paths),
    in the CSV's order. pid and camid: integers (any numbering; camid only tells cameras apart: a
    gallery image of the query's identity counts only from another camera, METHOD.md section 5).
    clothes (optional column): any text naming an outfit of that identity (the clothes key is
    (pid, clothes), as LTCC's), given in every row of the three files or in none. With clothes
    labels the protocols are general, cc and sc (as LTCC; cc or sc is left out, with a warning,
    when no query could match under it); without them general only, has_clothes is False and
    clothes id = pid. A negative pid marks a distractor (Market-1501's -1): allowed in the gallery only,
    where it never matches a query; in train or query it is a bad row. Everything is checked up front
    (images exist; build_dataset then decodes each one): each problem is an error naming the CSV file
    and line; bad rows are skipped with skip_bad.
    """
    name = "custom"
    folder = ""  # ROOT holds the CSV files itself
    files = (("train", "train.csv"), ("query", "query.csv"), ("gallery", "gallery.csv"))
    required = tuple(f for _, f in files)
    columns = LABEL_COLUMNS
    layout = ("  ROOT/train.csv, ROOT/query.csv, ROOT/gallery.csv   header: path,pid,camid[,clothes]\n"
              "  rows like images/0001_a.jpg,1,0,red_coat   (paths relative to ROOT, or absolute)")
    header_help = "the first line must be the header `path,pid,camid` or `path,pid,camid,clothes`"

    def __init__(self, root: str, skip_bad: bool = False):
        super().__init__(root, skip_bad)
        rows = {split: self._read_csv(split, os.path.join(self.dir, f)) for split, f in self.files}
        self.has_clothes = self._clothes_given(rows)
        self._lines = {split: [r[0] for r in recs] for split, recs in rows.items()}  # CSV line of each item
        self._finish(*[[(path, pid, cam, (pid, clothes) if self.has_clothes else pid)
                        for _, path, pid, cam, clothes in rows[split]] for split, _ in self.files])
        self._check_test_splits()
        self._protocols = self._usable_protocols()

    # -- reading ------------------------------------------------------------------------------
    def _locate(self, root: str) -> str:
        missing = next((f for f in self.required if not os.path.isfile(os.path.join(root, f))), None)
        if missing is not None:  # one line: the file and the three names
            raise UserError(f"{self.name}: missing {os.path.join(root, missing)}; --root must be the folder that holds "
                            f"{', '.join(self.required[:-1])} and {self.required[-1]}")
        return os.path.abspath(root)

    def _layout_help(self) -> str:
        return f"Expected:\n{self.layout}\nPass --root as the folder that holds the three CSV files."

    def _origin(self, split: str, index: int, path: str) -> str:
        return f"{self._csv(split)} line {self._lines[split][index]} ({path})"

    def clothes_names(self) -> list[str] | None:
        """The clothes column's text of each test clothes id (the key is (pid, text))."""
        return [k[1] for k in self.test_clothes_keys] if self.has_clothes else None

    def statistics(self) -> str:
        distractors = sum(it[1] < 0 for it in self.gallery)
        note = f"\n  gallery distractors (pid < 0, never a correct match): {distractors} images" if distractors else ""
        return super().statistics() + note

    def _csv(self, split: str) -> str:
        return os.path.join(self.dir, dict(self.files)[split])

    def _read_csv(self, split: str, csv_path: str) -> list[tuple]:
        """Rows (line, absolute path, pid, camid, clothes text or None) of one CSV, each checked."""
        rows, _ = read_label_csv(csv_path, csv_path, f"{self.name}: ", self.columns[:3], self.header_help,
                                 lambda what, reason: self._bad(split, what, reason),
                                 lambda where, path, pid, value: self._row_problem(split, where, path, pid, value))
        if not rows:
            skipped = f" (its {self.skipped[split]} rows were all bad and skipped)" if self.skipped.get(split) else ""
            raise UserError(f"{self.name}: the {split} split is empty: {csv_path} has no rows after its header "
                            f"(line 1){skipped}; add one row `path,pid,camid[,clothes]` per image")
        return rows

    @staticmethod
    def _row_problem(split: str, where: str, path: str, pid: int, value: dict[str, str]) -> tuple[str, str] | None:
        """What else makes a row bad here: a distractor outside the gallery, a missing image."""
        if pid < 0 and split != "gallery":  # Market-1501's convention: a negative pid is a distractor
            return (f"{where}: pid {pid} is negative, which marks a distractor; distractors belong in gallery.csv "
                    f"only (there they never match a query), not in {split}.csv", "negative pid")
        if not os.path.isfile(path):
            return f"{where}: image {value['path']} does not exist (resolved to {path})", "missing image"
        return None

    def _clothes_given(self, rows: dict[str, list[tuple]]) -> bool:
        """Whether the rows have clothes labels: all of them or none, else an error naming the first that differs."""
        flat = [(split, r) for split, _ in self.files for r in rows[split]]
        first_split, first = flat[0]
        given = first[4] is not None
        for split, r in flat:
            if (r[4] is not None) != given:
                raise UserError(
                    f"{self.name}: {self._csv(split)} line {r[0]} has {'a' if r[4] else 'no'} clothes label but "
                    f"{self._csv(first_split)} line {first[0]} {'has none' if r[4] else 'has one'}; give a clothes "
                    f"label in every row of train.csv, query.csv and gallery.csv, or in none (then no clothes-"
                    f"adversarial loss and no cc/sc protocols)")
        return given

    # -- checks of the test splits --------------------------------------------------------------
    def _check_test_splits(self) -> None:
        """Errors for a test set on which the general protocol could not be evaluated."""
        qcsv, gcsv = self._csv("query"), self._csv("gallery")
        gallery_pids = {it[1] for it in self.gallery}
        absent = sorted({it[1] for it in self.query} - gallery_pids)
        if absent:
            first = next(i for i, it in enumerate(self.query) if it[1] not in gallery_pids)
            shown = ", ".join(map(str, absent[:5])) + (", ..." if len(absent) > 5 else "")
            never = "query identity never appears" if len(absent) == 1 else "query identities never appear"
            raise UserError(f"{self.name}: {len(absent)} {never} in the gallery: pid {shown} "
                            f"(first at {qcsv} line {self._lines['query'][first]}); such queries cannot be matched: "
                            f"add gallery images of them to {gcsv} or remove their rows from {qcsv}")
        cams = sorted({it[2] for it in self.query + self.gallery})
        if len(cams) < 2:
            raise UserError(f"{self.name}: the query and gallery splits hold one camera only (camid {cams[0]} on "
                            f"every row of {qcsv} and {gcsv}); a gallery image matches a query only from another "
                            f"camera (as in Market-1501 and LTCC), so give the real camera ids, at least 2 cameras")
        ok = _matchable(self.query, self.gallery, "general")
        if not any(ok):
            raise UserError(f"{self.name}: no query has a gallery image of its identity from another camera (e.g. "
                            f"{qcsv} line {self._lines['query'][0]}: pid {self.query[0][1]}, camid {self.query[0][2]}); "
                            f"a gallery image of the query's own camera does not count: check the camid columns")
        if not all(ok):
            first = self._lines["query"][ok.index(False)]
            log.warning("%s: %d of %d queries have no gallery image of their identity from another camera; the "
                        "evaluation skips them (first: %s line %d)", self.name, ok.count(False), len(ok), qcsv, first)

    def _usable_protocols(self) -> list[tuple[str, list[Item], list[Item], str]]:
        protocols = [("general", self.query, self.gallery, "general")]
        for setting, what in (("cc", "in other clothes"), ("sc", "in the same clothes")) if self.has_clothes else ():
            if any(_matchable(self.query, self.gallery, setting)):
                protocols.append((setting, self.query, self.gallery, setting))
            else:
                log.warning("%s: no query has a gallery image of its identity %s from another camera; the %s "
                            "protocol is left out", self.name, what, setting)
        return protocols

    @property
    def protocols(self):
        return self._protocols


LabelRow = tuple[int, str, int, int | None, str | None]  # (CSV line, absolute path, pid, camid, clothes text)


def read_label_csv(csv_path: str, label: str, prefix: str, required: tuple[str, ...], header_help: str,
                   bad: Callable[[str, str], None],
                   row_problem: Callable[[str, str, int, dict[str, str]], tuple[str, str] | None] | None = None,
                   ) -> tuple[list[LabelRow], list[str]]:
    """The rows of a label CSV and its columns: the one reader of the custom layout's CSV files and of
    tools/search.py's --labels. Line 1 is the header, columns of LABEL_COLUMNS in any order and case,
    `required` among them; UTF-8 with or without a byte-order mark; blank lines are allowed; paths are
    relative to the CSV's folder, or absolute (rows hold absolute ones); pid and camid are integers
    (parse_int); a clothes cell left empty is None. Messages name the file as `label` (its path, or e.g.
    `--labels PATH`) and the line. A problem of the whole file is a UserError starting with `prefix`; a bad
    row (wrong number of values, pid or camid not an integer, empty path, what `row_problem(where, path,
    pid, values)` returns as (message, reason), an image listed twice) goes to `bad(message, reason)`,
    which raises, or counts it and returns, and the row is left out."""
    with open(csv_path, "rb") as f:
        data = f.read()
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a spreadsheet's UTF-8 byte-order mark
    try:  # decoded as a whole, so that a bad byte's line is known exactly (a text stream decodes in blocks)
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line, column = data[:at].count(b"\n") + 1, at - data.rfind(b"\n", 0, at)
        raise UserError(f"{prefix}{label} line {line} is not UTF-8 text (byte {data[at]:#04x} at column {column}); "
                        f"save the file as CSV in UTF-8") from None
    reader, rows, seen = csv.reader(io.StringIO(text, newline="")), [], {}
    base = os.path.dirname(os.path.abspath(csv_path))
    try:
        header = _csv_header(f"{prefix}{label} line 1", next(reader, []), required, header_help)
        for fields in reader:
            if any(v.strip() for v in fields):  # blank lines are allowed
                row, problem = _csv_row(f"{label} line {reader.line_num}", reader.line_num, base, header, fields,
                                        seen, row_problem)
                if problem:
                    bad(*problem)
                else:
                    seen[row[1]] = row[0]
                    rows.append(row)
    except csv.Error as e:  # line_num counts the lines read, the bad one included
        raise UserError(f"{prefix}{label} line {reader.line_num} cannot be read as CSV ({e}); save the file as CSV "
                        f"in UTF-8") from None
    return rows, list(header)


def _csv_header(where: str, fields: list[str], required: tuple[str, ...], header_help: str) -> dict[str, int]:
    """Column name -> index, from line 1 (`where` names it)."""
    names = [v.strip().lower() for v in fields]
    if not set(names) & set(LABEL_COLUMNS):
        found = f"found {','.join(fields)!r}" if fields else "the file is empty"
        raise UserError(f"{where} is not a header ({found}); {header_help}")
    missing = [c for c in required if c not in names]
    unknown = [n for n in names if n not in LABEL_COLUMNS]
    repeated = sorted({n for n in names if names.count(n) > 1})
    for problem, cols in (("lacks the column(s)", missing), ("has unknown column(s)", unknown),
                          ("repeats the column(s)", repeated)):
        if cols:
            raise UserError(f"{where}: the header {problem} {', '.join(map(repr, cols))}; {header_help}")
    return {n: i for i, n in enumerate(names)}


def _csv_row(where: str, line: int, base: str, header: dict[str, int], fields: list[str], seen: dict[str, int],
             row_problem) -> tuple[LabelRow | None, tuple[str, str] | None]:
    """(the row, None), or (None, (message, reason)) when it is bad; `seen` maps the file's image paths to their lines."""
    if len(fields) != len(header):
        return None, (f"{where} has {len(fields)} values but the header names {len(header)} columns",
                      "line not in the format")
    value = {n: fields[i].strip() for n, i in header.items()}
    number = {n: parse_int(value[n]) for n in ("pid", "camid") if n in value}
    for n, parsed in number.items():
        if parsed is None:
            return None, (f"{where}: {n} {value[n]!r} is not an integer", f"{n} not an integer")
    if not value["path"]:
        return None, (f"{where} has an empty path; give each row its image's path", "empty path")
    path = os.path.abspath(os.path.join(base, value["path"]))  # an absolute one stays
    problem = row_problem(where, path, number["pid"], value) if row_problem else None
    if problem is None and path in seen:
        problem = f"{where} repeats the image of line {seen[path]} ({value['path']}); list each image once", "repeated image"
    return (None, problem) if problem else ((line, path, number["pid"], number.get("camid"), value.get("clothes") or None), None)


def parse_int(text: str) -> int | None:
    """A CSV cell's integer (e.g. "7", "-1", "+5"), None when it is not one (also for "²", "1.5", "")."""
    try:
        return int(text)
    except ValueError:  # int() refuses "²" and the like with ValueError
        return None


def _matchable(query: list[Item], gallery: list[Item], setting: str) -> list[bool]:
    """Per query: whether the gallery holds a correct match under `setting` (metrics.protocol_masks' rule)."""
    g_pids, g_cams, g_clothes = (np.array([it[k] for it in gallery]) for k in (1, 2, 3))
    return [bool(protocol_masks(pid, cam, clothes, g_pids, g_cams, g_clothes, setting)[0].any())
            for _, pid, cam, clothes in query]


class Synthetic(LTCC):
    """The project's embedded benchmark: generated on first use, then read by the LTCC parser.

    Options are the fields of `SyntheticConfig` (seed, num_train_ids, num_test_ids, outfits,
    cameras, img_size, shared_outfits); unset ones take their defaults. Without options the
    benchmark under root is used as it is (the default one is generated if there is none); with
    options that differ from it, it is regenerated (logged). `.boxes` maps `split/name.png` to the
    person box.
    """
    name = "synthetic"
    layout = ("  ROOT/SYNTH_CC/{train,query,test}/{pid:03d}_{outfit}_c{cam}_{frame:06d}.png\n"
              "  ROOT/SYNTH_CC/manifest.json   (generated: python -m synthetic --make ROOT)")

    def __init__(self, root: str, skip_bad: bool = False, **params):
        # the synthetic package is imported only when this dataset is used
        from synthetic import SYNTH_FOLDER, config_for, generate_synthetic

        self.folder = SYNTH_FOLDER
        self.config = config_for(root, params)
        super().__init__(generate_synthetic(root, self.config), skip_bad)
        with open(os.path.join(self.dir, "boxes.json")) as f:
            self.boxes = json.load(f)


DATASETS = {cls.name: cls for cls in (LTCC, PRCC, VCClothes, VCClothesSC, VCClothesCC, Market1501, MSMT17,
                                      CelebReID, DeepChange, Custom, Synthetic)}


def train_fingerprint(train: list[tuple]) -> str:
    """Identifies a training split (names and labels), so stage 2 can refuse another dataset's banks."""
    digest = hashlib.sha1()
    for path, pid, _, clothes in train:
        digest.update(f"{os.path.basename(path)} {pid} {clothes}\n".encode())
    return digest.hexdigest()


class BadEntry(UserError):
    """A file or list line that does not fit the layout (ReIDDataset._bad). `build_dataset` completes
    the message with the way the calling program can skip such entries, if it has one."""

    def __init__(self, what: str, such: str):
        self.what, self.such = what, such  # such: "rows" or "files"
        super().__init__(self.message("skip_bad=True"))

    def message(self, skip_hint: str | None) -> str:
        return f"{self.what}. Fix or remove it" + (f", or pass {skip_hint} to skip such {self.such}." if skip_hint else ".")


def decode_problem(path: str) -> str | None:
    """Why Pillow cannot decode the image at `path` (every pixel is decoded), or None when it can."""
    try:
        with Image.open(path) as img:
            img.load()  # the header alone passes a truncated file
        return None
    except Exception as e:  # UnidentifiedImageError (text, empty file), OSError (truncated), SyntaxError, ...
        return str(e).replace(f" {path!r}", "") or type(e).__name__  # the message already names the file


def build_dataset(name: str, root: str, skip_hint: str | None = None, check_images: bool = True,
                  **options) -> ReIDDataset:
    """Parse dataset `name` under `root` and decode every image (ReIDDataset.check_images; off with
    check_images=False). Options: skip_bad (all), SyntheticConfig fields (synthetic). `skip_hint`:
    how the caller's user skips bad entries (e.g. "--skip-bad"); without one the error about a bad
    entry says only to fix or remove it (the training scripts have no such flag)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    cls = DATASETS[name]
    if cls is Synthetic:
        from synthetic import SyntheticConfig  # only for --dataset synthetic

        accepted = set(SyntheticConfig.__dataclass_fields__) | {"skip_bad"}
    else:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"dataset {name} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}")
    try:
        dataset = cls(root, **options)
    except BadEntry as e:
        raise UserError(e.message(skip_hint)) from None
    if check_images:
        dataset.check_images()
    return dataset



# -----------------------------------------------------------------------------
# Command line

def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description="Dataset statistics. The synthetic benchmark is made and previewed by "
                                             "python -m synthetic; the colour-histogram check is benchmarks/colour_histogram.py.")
    ap.add_argument("--stats", metavar="NAME", required=True, help=f"print statistics of a dataset: {', '.join(DATASETS)}")
    ap.add_argument("--root", required=True, help="folder holding the dataset's folder (or the dataset's folder itself; "
                                            "custom: the folder of train.csv, query.csv and gallery.csv)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip files that do not match the naming pattern or list lines and CSV rows that are bad "
                         "or name a missing image (reports how many, and why); images that cannot be decoded are "
                         "always an error")
    ap.add_argument("--masks", metavar="DIR",
                    help="a folder of part masks (human parsing, SCHP's LIP labels) with one label PNG per image at the "
                         "image's path relative to the dataset folder: reports how many images have a usable one and "
                         "the pixels per part; the synthetic benchmark's own masks are reported without it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # synthetic: the benchmark under root as it is (the default one is generated, and said, if none);
    # every image is decoded, as the training scripts' build_dataset does
    dataset = build_dataset(args.stats, args.root, skip_hint="--skip-bad", skip_bad=args.skip_bad)
    print(dataset.statistics())
    if args.masks is not None or args.stats == "synthetic":
        import masks  # here only: the layouts need neither masks.py nor the synthetic package it reads

        source = masks.mask_source(dataset, args.masks, check=False)
        found = dataset.file_problems(source.problem)
        print(masks.coverage(dataset, source, found))
        masks.check_masks(dataset, source, found)  # bad or missing masks: the error line, exit status 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)  # bad input: one `error:` line and exit status 2


if __name__ == "__main__":
    sys.exit(main())
