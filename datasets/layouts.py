"""The public datasets' layouts, one class per on-disk layout with the same interface (ReIDDataset, as in
CAL's Simple-CCReID): LTCC, PRCC, VC-Clothes (and its SC/CC camera subsets), Market-1501, MSMT17,
Celeb-reID, DeepChange, and the embedded synthetic benchmark (read by the LTCC parser; the synthetic
package is imported only when that dataset is used)."""
from __future__ import annotations

import json
import os
import re

from datasets.base import ReIDDataset, log


def _match(pattern: re.Pattern, path: str):
    """Patterns apply to the base name only: a root like /data/my_cc_c1/ changes no label."""
    return pattern.match(os.path.basename(path))



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
