"""The synthetic cloth-changing benchmark: its parameters (`SyntheticConfig`), who wears what where
(`_plan`), the folder written atomically with its manifest (the regeneration rule: `generate_synthetic`,
`config_for`), and its part masks and annotations read back (`load_mask`, `load_annotations`)."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from masks import SYNTHETIC_MASKS, MaskSource
from synthetic.draw import PARTS, _background, _camera, _outfit, _person, _render
from synthetic.words import attributes, caption
from utils import STOP_SIGNALS, UserError, stop_signals_held

log = logging.getLogger("datasets")  # one logger with the datasets package: its users see the regeneration lines

# -----------------------------------------------------------------------------
# The synthetic cloth-changing benchmark

SYNTH_VERSION = 3  # bump whenever the generator's output changes: cached copies regenerate
SYNTH_FOLDER = "SYNTH_CC"
MASK_FOLDER = SYNTHETIC_MASKS  # SYNTH_CC/masks/{split}/{image name}: part label maps
ANNOTATIONS = "annotations.json"  # image key (as in boxes.json) -> caption and attributes


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_train_ids: int = 60
    num_test_ids: int = 40
    outfits: int = 4             # outfits per identity: uniform in [max(2, outfits-1), outfits+1]
    cameras: int = 4
    img_size: tuple[int, int] = (128, 64)  # (height, width)
    shared_outfits: float = 0.15  # chance that an outfit copies another person's outfit

    def __post_init__(self):
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        checks = [(self.seed >= 0, "seed must be >= 0"),
                  (self.num_train_ids >= 2, "num_train_ids (--train-ids) must be >= 2"),
                  (self.num_test_ids >= 2, "num_test_ids (--test-ids) must be >= 2"),
                  (self.outfits >= 2, "outfits must be >= 2 (cloth-changing needs two outfits)"),
                  (self.cameras >= 2, "cameras must be >= 2 (every match comes from another camera)"),
                  (len(self.img_size) == 2 and self.img_size[0] >= 32 and self.img_size[1] >= 16,
                   "img_size must be (height, width) with height >= 32 and width >= 16"),
                  (0.0 <= self.shared_outfits <= 1.0, "shared_outfits must be in [0, 1]")]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"synthetic: {msg} (got {self})")


def _plan(cfg: SyntheticConfig) -> tuple[dict, dict, dict, list[tuple]]:
    """Who wears what where: identities, outfits, cameras and the list of images to draw.

    Train: each outfit is seen by 2-3 cameras, 3-4 frames each. Test: each outfit is seen by
    every camera (2-3 gallery frames each) plus one query frame in each of 2 cameras, so every
    query has a same-clothes and a different-clothes match in other cameras.
    """
    rng = np.random.default_rng([cfg.seed, 0])
    n_ids = cfg.num_train_ids + cfg.num_test_ids
    people = {pid: _person(np.random.default_rng([cfg.seed, 1, pid])) for pid in range(1, n_ids + 1)}
    cams = {c: _camera(np.random.default_rng([cfg.seed, 2, c])) for c in range(1, cfg.cameras + 1)}
    outfits, pool = {}, []  # pool: outfits of the people drawn so far
    for pid in people:
        outfits[pid] = []
        for k in range(int(rng.integers(max(2, cfg.outfits - 1), cfg.outfits + 2))):
            # Some outfits are worn by several people: clothes alone cannot tell them apart.
            shared = pool and rng.random() < cfg.shared_outfits
            outfits[pid].append(pool[rng.integers(len(pool))] if shared else _outfit(np.random.default_rng([cfg.seed, 3, pid, k])))
        pool += outfits[pid]
    images = []  # (split, pid, outfit 1-based, camera, frame)
    for pid in people:
        frame = 0
        test = pid > cfg.num_train_ids
        for o in range(1, len(outfits[pid]) + 1):
            if not test:
                seen = rng.choice(np.arange(1, cfg.cameras + 1), min(cfg.cameras, int(rng.integers(2, 4))), replace=False)
                shots = [("train", int(c)) for c in sorted(seen) for _ in range(int(rng.integers(3, 5)))]
            else:
                qcams = rng.choice(np.arange(1, cfg.cameras + 1), 2, replace=False)
                shots = [("query", int(c)) for c in sorted(qcams)]
                shots += [("test", c) for c in range(1, cfg.cameras + 1) for _ in range(int(rng.integers(2, 4)))]
            for split, c in shots:
                images.append((split, pid, o, c, frame))
                frame += 1
    return people, outfits, cams, images


def _render_shots(args) -> dict[str, tuple[list, dict]]:
    """Draw and save a list of images with their part masks and captions; every image has its own
    seeds, so any split of the work between processes gives the same bytes. Returns, per image,
    the person box and the annotation (caption and attributes)."""
    cfg, people, outfits, cams, bgs, shots, out_dir = args
    out, words = {}, {}  # words: (pid, outfit) -> attributes
    for split, pid, o, c, frame in shots:
        rng = np.random.default_rng([cfg.seed, 4, pid, frame])
        img, labels, pbox = _render(people[pid], outfits[pid][o - 1], cams[c], bgs[c], cfg.img_size, rng)
        name = f"{split}/{pid:03d}_{o}_c{c}_{frame:06d}.png"
        img.save(os.path.join(out_dir, name), compress_level=1)
        Image.fromarray(labels, "L").save(os.path.join(out_dir, MASK_FOLDER, name), compress_level=1)
        if (pid, o) not in words:
            words[pid, o] = attributes(people[pid], outfits[pid][o - 1])
        attrs = words[pid, o]
        text = caption(attrs, np.random.default_rng([cfg.seed, 5, pid, frame]))  # its own stream: images unchanged
        out[name] = (pbox, {"caption": text, "attributes": attrs})
    return out


def _parent(root: str, folder: str = SYNTH_FOLDER) -> str:
    """The folder that holds `folder` (SYNTH_CC): `root` may name it itself."""
    if os.path.basename(os.path.normpath(root)) == folder:
        return os.path.dirname(os.path.normpath(root)) or "."
    return root


def _manifest_params(cfg) -> dict:
    return {**asdict(cfg), "img_size": list(cfg.img_size)}  # as JSON reads it back


def _changes(old: dict, new: dict) -> str:
    """What differs between an old manifest and a new one, e.g. 'num_train_ids 6 -> 60'."""
    diff = [f"generator version {old.get('version')} -> {new['version']}"] if old.get("version") != new["version"] else []
    old_params = old.get("params") if isinstance(old.get("params"), dict) else {}
    diff += [f"{k} {old_params.get(k, 'unset')} -> {v}" for k, v in new["params"].items() if old_params.get(k) != v]
    return ", ".join(diff)


def _default_signals() -> None:
    """Pool workers end on the pool's SIGTERM as usual, whatever handler the parent installed."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held while the pool started (_parallel)


def _parallel(fn, jobs: list) -> list:
    """fn over jobs, in forked processes when there are several (fork: no re-import)."""
    if len(jobs) == 1:
        return [fn(jobs[0])]
    # held: a signal while the pool forks must not run the parent's raising handler in a worker (a traceback)
    pool = None
    try:
        with stop_signals_held():
            pool = mp.get_context("fork").Pool(len(jobs), initializer=_default_signals)
        return pool.map(fn, jobs)
    finally:
        if pool is not None:
            pool.terminate()  # as `with Pool` does, also when the held signal stops us at the line above


def _workers(workers: int | None, n_images: int) -> int:
    """PNG encoding and drawing dominate: split the work over processes when it pays."""
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") and n_images >= 500 else 1
    return workers if "fork" in mp.get_all_start_methods() else 1


def _write_folder(root: str, folder: str, manifest: dict, fill, what: str, flag: str) -> str:
    """Write root/folder atomically unless one with the same version and parameters is there.

    fill(tmp, manifest) writes the contents into a temporary folder, adds its entries to the
    manifest and returns the number of images; manifest.json is written last (it marks a
    complete folder), then the folder is renamed into place. A folder of other parameters or
    another version is replaced, with a log line naming the changes; one without a manifest is
    refused (it was not made here).
    """
    target = os.path.join(root, folder)
    same = lambda m: m is not None and m.get("version") == manifest["version"] and m.get("params") == manifest["params"]
    old = _read_manifest(target)
    if same(old):
        return target
    if os.path.exists(target) and old is None:
        raise UserError(f"synthetic: {target} exists but has no readable manifest.json, so it was not made by this "
                        f"generator; remove it or choose another {flag}.")
    if old is not None:  # never replaced silently
        log.warning("regenerating %s: %s", target, _changes(old, manifest))
    t0 = time.time()
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=root)
    except OSError as e:
        raise UserError(f"synthetic: cannot write the {what} under {root} ({e}); choose a writable {flag}") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed folder should not be
    try:
        n_images = fill(tmp, manifest)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:  # written last: marks a complete folder
            json.dump(manifest, f, indent=1, sort_keys=True)
        if same(_read_manifest(target)):  # another process (e.g. another rank) finished first
            return target
        if os.path.exists(target):  # parameters changed: swap the old one out, then delete it
            trash = tempfile.mkdtemp(prefix=f".{folder}.old-", dir=root)
            os.rename(target, os.path.join(trash, folder))
            shutil.rmtree(trash)
        try:
            os.rename(tmp, target)
        except OSError:  # lost a race with another process writing the same parameters
            if not same(_read_manifest(target)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic: generated %d images in %s in %.1f s", n_images, target, time.time() - t0)
    return target


def generate_synthetic(root: str, cfg: SyntheticConfig, workers: int | None = None) -> str:
    """Write the benchmark to `root/SYNTH_CC` (LTCC layout) unless an identical one is there.

    Besides the images: part masks in masks/{split}/ (same file names), captions and attributes
    in annotations.json, person boxes in boxes.json. Same parameters give byte-identical files.
    Generated into a temporary folder and renamed, so a crash never leaves a half-written
    benchmark; `manifest.json` records the parameters and the generator version. Calling this
    with parameters that differ from the manifest's is the request to regenerate: it does, and
    logs what changed. Callers that only want to read a benchmark take their config from
    `config_for`. workers: processes (default: the CPUs).
    """
    manifest = {"generator": "synthetic.py", "version": SYNTH_VERSION, "params": _manifest_params(cfg)}

    def fill(tmp: str, manifest: dict) -> int:
        people, outfits, cams, shots = _plan(cfg)
        h, w = cfg.img_size
        bgs = {c: _background(cam, 2 * h, 2 * w) for c, cam in cams.items()}
        for split in ("train", "query", "test"):
            os.makedirs(os.path.join(tmp, split))
            os.makedirs(os.path.join(tmp, MASK_FOLDER, split))  # a parallel tree: the LTCC parser reads all of train/
        n = _workers(workers, len(shots))
        parts = _parallel(_render_shots, [(cfg, people, outfits, cams, bgs, shots[i::n], tmp) for i in range(n)])
        done = {k: v for part in parts for k, v in part.items()}
        with open(os.path.join(tmp, "boxes.json"), "w") as f:  # person boxes (x0, y0, x1, y1), for analysis
            json.dump({k: box for k, (box, _) in done.items()}, f, sort_keys=True)
        with open(os.path.join(tmp, ANNOTATIONS), "w") as f:
            f.write(json.dumps({k: note for k, (_, note) in done.items()}, sort_keys=True))  # dumps: the C encoder
        manifest["counts"] = {s: sum(1 for sh in shots if sh[0] == s) for s in ("train", "query", "test")}
        manifest.update(parts=list(PARTS), annotations=ANNOTATIONS, masks=MASK_FOLDER)
        return len(shots)

    return _write_folder(_parent(root), SYNTH_FOLDER, manifest, fill, "benchmark", "--root")


def _read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def existing_params(root: str) -> dict:
    """Parameters of a benchmark of this generator version already under root ({} when there is none)."""
    manifest = _read_manifest(os.path.join(_parent(root), SYNTH_FOLDER))
    if manifest is None or manifest.get("version") != SYNTH_VERSION:
        return {}
    return {k: tuple(v) if k == "img_size" else v for k, v in manifest["params"].items()}


def config_for(root: str, params: dict) -> SyntheticConfig:
    """The benchmark a reader of `root` means.

    Explicit parameters mean that benchmark (generate_synthetic regenerates a different one and
    says so). Without them: the benchmark already under root, with its own parameters even when an
    older generator made it (it is then remade as it was meant); the default one only when there is
    none, which is said, since a mistyped root also lands here.
    """
    if params:
        return SyntheticConfig(**params)
    folder = os.path.join(_parent(root), SYNTH_FOLDER)
    manifest = _read_manifest(folder)
    if manifest is None:
        cfg = SyntheticConfig()
        if not os.path.exists(folder):  # a folder without a manifest: generate_synthetic refuses it
            log.warning("no synthetic benchmark under %s: generating the default one (%s)", root,
                        ", ".join(f"{k} {v}" for k, v in _manifest_params(cfg).items()))
        return cfg
    saved = manifest.get("params") if isinstance(manifest.get("params"), dict) else {}
    return SyntheticConfig(**{k: v for k, v in saved.items() if k in SyntheticConfig.__dataclass_fields__})


def mask_path(image_path: str) -> str:
    """The part mask of a benchmark image: SYNTH_CC/test/x.png -> SYNTH_CC/masks/test/x.png."""
    split_dir, name = os.path.split(image_path)
    folder, split = os.path.split(split_dir)
    if split not in ("train", "query", "test"):
        raise UserError(f"synthetic: {image_path} is not a benchmark image (expected SYNTH_CC/{{train,query,test}}/NAME)")
    return os.path.join(folder, MASK_FOLDER, split, name)


def load_mask(image_path: str) -> np.ndarray:
    """The part label map (H x W uint8, indices into PARTS) of a benchmark image, read as every mask is
    (masks.MaskSource: one reader, one check of the labels)."""
    split_dir = os.path.dirname(mask_path(image_path))  # SYNTH_CC/masks/{split}: a benchmark image
    return MaskSource("synthetic", os.path.dirname(os.path.dirname(split_dir))).read(image_path)


def load_annotations(target: str) -> dict:
    """Captions and attributes of a benchmark: {"test/NAME.png": {"caption": str, "attributes": {...}}}.
    target: SYNTH_CC or the folder holding it."""
    path = os.path.join(_parent(target), SYNTH_FOLDER, ANNOTATIONS)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"synthetic: cannot read {path} ({e}); benchmarks of generator version < 2 have no "
                        f"captions: regenerate with python -m synthetic --make") from None
