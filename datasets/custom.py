"""Users' own labelled data (`--dataset custom`: train.csv, query.csv, gallery.csv; class `Custom`) and
the label-CSV reader it shares with tools/search.py's --labels (`read_label_csv`, `parse_int`)."""
from __future__ import annotations

import csv
import io
import os
from typing import Callable

import numpy as np

from datasets.base import Item, ReIDDataset, log
from metrics import protocol_masks
from utils import UserError

LABEL_COLUMNS = ("path", "pid", "camid", "clothes")  # of a label CSV (read_label_csv)


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
    row_files = True
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
