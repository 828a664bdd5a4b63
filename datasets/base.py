"""The shared machinery of the dataset layouts (datasets/layouts.py, datasets/custom.py): `ReIDDataset`
locates a dataset's folder, scans and relabels its files and builds its protocols, checks every image
(`check_images`; `check_files` for other per-image files such as part masks) and reports its statistics.
Also here: an item's form (`Item`), which files are images (`image_extensions`, `list_images`), why an
image cannot be decoded (`decode_problem`) and the error of a bad file or list line (`BadEntry`).
"""
from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from PIL import Image

from utils import UserError, check_stop

log = logging.getLogger("datasets")  # one logger for the package: `datasets`

Item = tuple[str, int, int, int]  # (path, pid, camid, clothes_id)


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
    row_files = False  # its items come from rows of label files (Custom): a bad image's fix names them

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
        rows = " (and their lines)" if self.origins or self.row_files else ""
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
