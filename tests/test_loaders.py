"""loaders.py: the transforms (bit-identical to the classic torchvision composition, part masks moved
with the image), the image dataset, the P x K samplers, the loaders and their workers' start-up."""
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import datasets as D
import evaluate as E
import loaders as L
from utils import UserError


def img(path, colour=(10, 20, 30), size=(4, 8)):
    """A tiny image, 8x4 (h x w) by default."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def ltcc_root(tmp_path):
    for name in ("train/001_1_c1_000001.png", "train/001_1_c2_000002.png", "train/005_1_c1_000004.png",
                 "query/010_1_c1_000001.png", "test/010_1_c2_000003.png"):
        img(os.path.join(tmp_path, "LTCC_ReID", name))
    return str(tmp_path)


def test_corrupt_image(ltcc_root):
    ds = D.build_dataset("ltcc", ltcc_root)
    with open(ds.train[0][0], "wb") as f:
        f.write(b"\x89PNG not really")
    data = L.ImageDataset(ds.train, L.build_transforms((16, 8), train=False))
    assert data[1][0].shape == (3, 16, 8)
    with pytest.raises(UserError, match="cannot read image .*001_1_c1_000001.png"):
        data[0]


# ---- transforms, samplers, loaders -------------------------------------------------------

def test_transforms():
    im = Image.new("RGB", (20, 40), (123, 116, 104))
    test_tf, train_tf = L.build_transforms((32, 16), False), L.build_transforms((32, 16), True)
    x = test_tf(im)
    assert x.shape == (3, 32, 16) and x.abs().max() < 0.02  # the CLIP mean pixel normalises to ~0
    torch.manual_seed(0)
    assert train_tf(im).shape == (3, 32, 16)


def test_erasing_fills_one_box_with_per_pixel_noise():
    """CLIP-ReID's timm RandomErasing(probability=0.5, mode='pixel', max_count=1): half the images get
    one box of 2 %..1/3 of the area, aspect within [0.3, 1/0.3], filled on every channel with
    N(0, 1) noise (not the mean pixel)."""
    assert any(isinstance(t, L.PixelNoiseErasing) for t in L.build_transforms((32, 16), True).transforms)
    torch.manual_seed(0)
    erase, erased, values, areas = L.PixelNoiseErasing(0.5), 0, [], []
    for _ in range(400):
        img = erase(torch.full((3, 96, 48), 7.0))
        box = img != 7.0
        if box.any():
            erased += 1
            rows, cols = box.any(dim=(0, 2)).nonzero(), box.any(dim=(0, 1)).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert box[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one full box, every channel
            areas.append(h * w / (96 * 48))
            assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3  # log-uniform aspect in [0.3, 1/0.3], up to rounding
            values.append(img[box])
    assert 160 < erased < 240  # p = 0.5 over 400 draws
    assert 0.015 < min(areas) and max(areas) < 0.36 and 0.12 < sum(areas) / len(areas) < 0.2  # uniform 2 %..1/3
    noise = torch.cat(values)
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02  # per-pixel N(0, 1)
    assert len(noise.unique()) > 0.99 * len(noise)  # every pixel its own draw


def fake_items(counts):
    """counts[pid] images for each pid."""
    return [(f"/x/{pid}_{j}.png", pid, j % 3, pid) for pid, n in enumerate(counts) for j in range(n)]


ITEMS = fake_items([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 2])


def test_sampler_batches():
    s = L.RandomIdentitySampler(ITEMS, batch_size=8, num_instances=2, seed=1)
    idx = list(s)
    assert len(idx) == len(s) > 0 and len(idx) % 8 == 0
    for b in range(0, len(idx), 8):
        pids = [ITEMS[i][1] for i in idx[b:b + 8]]
        assert len(set(pids)) == 4 and all(pids.count(p) == 2 for p in set(pids))
    few = fake_items([1, 3])  # a 1-image identity is sampled with replacement
    assert sorted(list(L.RandomIdentitySampler(few, 4, 2))[:4]) in ([0, 0, 1, 2], [0, 0, 1, 3], [0, 0, 2, 3])
    with pytest.raises(UserError):
        L.RandomIdentitySampler(ITEMS, batch_size=7, num_instances=2)
    with pytest.raises(UserError, match="identities"):
        L.RandomIdentitySampler(fake_items([2, 2]), batch_size=8, num_instances=2)


def test_sampler_epochs_are_deterministic():
    a = L.RandomIdentitySampler(ITEMS, 8, 2, seed=3)
    b = L.RandomIdentitySampler(ITEMS, 8, 2, seed=3)  # e.g. after --resume
    a.set_epoch(4)
    first = list(a)
    assert list(a) == first  # iterating twice in one epoch gives the same order
    b.set_epoch(4)
    assert list(b) == first
    a.set_epoch(5)
    assert list(a) != first
    assert list(L.RandomIdentitySampler(ITEMS, 8, 2, seed=4)) != list(L.RandomIdentitySampler(ITEMS, 8, 2, seed=3))


def test_distributed_sampler_splits_each_global_batch():
    """--batch-size is global: R processes together see exactly the batches of one process."""
    full = L.RandomIdentitySampler(ITEMS, 12, 2, seed=0)
    shards = [L.DistributedRandomIdentitySampler(ITEMS, 12, 2, num_replicas=3, rank=r, seed=0) for r in range(3)]
    for s in shards + [full]:
        s.set_epoch(2)
    parts = [list(s) for s in shards]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) > 0
    per_rank = [[p[i:i + 4] for i in range(0, len(p), 4)] for p in parts]  # 12 / 3 processes = 4 images each
    for batches in per_rank:
        assert all(len({ITEMS[i][1] for i in b}) == 2 for b in batches)  # 2 identities x K = 2
    steps = [sum(group, []) for group in zip(*per_rank)]
    assert sum(steps, []) == list(full)  # the global batches, in order, split by identity


def test_distributed_sampler_refuses_an_unsplittable_batch():
    with pytest.raises(UserError, match="multiple of --num-instances 2 x 3 processes"):
        L.DistributedRandomIdentitySampler(ITEMS, 8, 2, num_replicas=3, rank=0, seed=0)


def test_loaders(ltcc_root):
    items = [(os.path.join(ltcc_root, "LTCC_ReID", "train", f"{p:03d}_1_c1_{j:06d}.png"), p, 1, p)
             for p in range(4) for j in range(3)]
    for path, pid, *_ in items:
        img(path, (60 * pid, 0, 0))
    loader = L.build_train_loader(items, (16, 8), batch_size=4, num_instances=2, workers=0, seed=0)
    assert isinstance(loader.sampler, L.RandomIdentitySampler) and isinstance(loader.generator, torch.Generator)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader.sampler) // 4
    x, pid, cam, clothes = batches[0]
    assert x.shape == (4, 3, 16, 8) and len(set(pid.tolist())) == 2
    test = L.build_test_loader(items, (16, 8), batch_size=5, workers=0)
    assert torch.cat([b[1] for b in test]).tolist() == [it[1] for it in items]
    with pytest.raises(UserError, match="torch.distributed"):
        L.build_train_loader(items, (16, 8), 4, 2, 0, 0, distributed=True)


# ---- part masks carried with the image ---------------------------------------------------

def classic_transforms(img_size, train, normalize=L.CLIP_NORMALIZATION):
    """The pipeline before masks existed, composed of torchvision's classic transforms."""
    norm = T.Normalize(*normalize)
    if not train:
        return T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(), norm])
    return T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(0.5),
                      T.Pad(10), T.RandomCrop(img_size), T.ToTensor(), norm, L.PixelNoiseErasing(0.5)])


@pytest.mark.parametrize("train", [True, False])
def test_images_are_bit_identical_to_the_classic_composition(train):
    """With or without a mask, the image tensor and the random draws equal the classic transforms' under
    the same seed, so training without masks is unchanged, batch for batch."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 20), (128, 64), (77, 31))]
    for size in ((32, 16), (96, 48)):
        classic, paired = classic_transforms(size, train), L.build_transforms(size, train)
        for seed, im in enumerate(images * 3):
            mask = torch.from_numpy(rng.integers(0, 8, (im.height, im.width), dtype=np.uint8))
            outputs = []
            for call in (lambda: classic(im), lambda: paired(im), lambda: paired(im, mask)[0]):
                torch.manual_seed(seed)
                outputs.append((call(), torch.rand(4)))  # the draws after it: the same consumption
            for x, after in outputs[1:]:
                assert torch.equal(x, outputs[0][0]) and torch.equal(after, outputs[0][1])


def painted(height=64, width=32, box=(10, 5, 30, 20)):
    """A white box (top, left, bottom, right) on black, and its mask: label 6 (top) in the box, 0 elsewhere."""
    image, mask = np.zeros((height, width, 3), np.uint8), np.zeros((height, width), np.uint8)
    top, left, bottom, right = box
    image[top:bottom, left:right], mask[top:bottom, left:right] = 255, 6
    return Image.fromarray(image), torch.from_numpy(mask)


def normalised(value: float) -> torch.Tensor:
    """A pixel of `value` on every channel after ToTensor and Normalize, [3, 1, 1]."""
    return T.Normalize(*L.CLIP_NORMALIZATION)(torch.full((3, 1, 1), value))


def test_flips_and_crops_move_the_mask_with_the_image():
    """At the image's own size the geometry is exact: after the random flip, pad and crop every pixel
    that is still the box's white is labelled 6 and every other one not erased is 0."""
    im, mask = painted()
    transform, white, black = L.build_transforms((64, 32), True), normalised(1.0), normalised(0.0)
    placements = set()
    for seed in range(30):
        torch.manual_seed(seed)
        x, m = transform(im, mask)
        is_white, is_black = (x == white).all(0), (x == black).all(0)
        kept = is_white | is_black  # the rest was erased
        assert torch.equal(m[kept] == 6, is_white[kept]) and set(m.unique().tolist()) <= {0, 6}
        placements.add(tuple(is_white.nonzero().min(0).values.tolist()))
    assert len(placements) > 10  # flips and crops did move the box


def test_resized_masks_stay_on_their_pixels():
    """Resized (nearest for the mask, bilinear for the test image), the box and its label still coincide."""
    im, mask = painted()
    x, m = L.build_transforms((128, 64), False)(im, mask)
    bright, labelled = (x > normalised(0.5)).all(0), m == 6
    assert (bright & labelled).sum() / (bright | labelled).sum() > 0.9


def test_erasing_and_normalisation_leave_the_mask_alone():
    from torchvision import tv_tensors

    im, mask = painted()
    transform, erased = L.build_transforms((64, 32), True), 0
    for seed in range(20):
        torch.manual_seed(seed)
        x, m = transform(im, mask)
        torch.manual_seed(seed)
        _, moved = transform.geometry(im, tv_tensors.Mask(mask))  # the geometry alone
        assert torch.equal(m, moved.as_subclass(torch.Tensor)) and m.dtype == torch.uint8
        erased += not ((x == normalised(1.0)).all(0) | (x == normalised(0.0)).all(0)).all()
    assert erased > 0  # some draws erased a box of the image, none of the mask


@pytest.mark.parametrize("train", [True, False])
def test_nearest_keeps_the_labels_in_their_set(train):
    labels = [0, 2, 5, 7]
    mask = torch.from_numpy(np.random.default_rng(1).choice(labels, (77, 31)).astype(np.uint8))
    for size in ((128, 64), (32, 16), (50, 23)):
        torch.manual_seed(0)
        _, m = L.build_transforms(size, train)(Image.new("RGB", (31, 77)), mask)
        assert tuple(m.shape) == size and set(m.unique().tolist()) <= set(labels)


def test_synthetic_masks_come_with_the_batches(data_root):
    import masks as M
    import synthetic as S

    ds = D.build_dataset("synthetic", data_root)
    source = M.mask_source(ds, None)
    train = L.build_train_loader(ds.train, (64, 32), 8, 2, workers=0, seed=0, masks=source)
    x, pid, _, _, extras = next(iter(train))
    assert x.shape == (8, 3, 64, 32) and extras["mask"].shape == (8, 64, 32) and extras["mask"].dtype == torch.long
    assert 0 <= int(extras["mask"].min()) and int(extras["mask"].max()) < len(M.PARTS)
    items = ds.query[:4]
    with_masks = next(iter(L.build_test_loader(items, (64, 32), 4, workers=1, masks=source)))
    expected = torch.stack([torch.from_numpy(S.load_mask(it[0]).copy()).long() for it in items])
    assert torch.equal(with_masks[4]["mask"], expected)  # the benchmark's own size: the test geometry keeps it
    plain = next(iter(L.build_test_loader(items, (64, 32), 4, workers=0)))
    assert len(plain) == 4 and torch.equal(plain[0], with_masks[0])  # without masks: the 4-tuples, same images


# ---- worker start-up and stop signals (issue 19) -------------------------------------------

def slow_worker_start(monkeypatch, seconds: float = 0.5) -> None:
    """Widen the window between a worker's fork and its worker_init_fn (torch runs the loop's
    set-up there) to `seconds`, so that a signal lands in it deterministically."""
    from torch.utils.data._utils import worker

    original = worker._worker_loop

    def loop(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(worker, "_worker_loop", loop)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_workers_survive_a_signal_while_they_start(sig, monkeypatch):
    """A group signal (scancel, Ctrl-C) reaching workers between their fork and _worker_init used to
    kill them (the inherited handler or torch's SIGTERM handler): "DataLoader worker is killed by
    signal". The signals stay held in the new workers until _worker_init ignores them."""
    slow_worker_start(monkeypatch)
    loader = L.WorkerLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=2, num_workers=2)
    batches = iter(loader)
    for w in batches._workers:  # still in the widened window: not yet in _worker_init
        os.kill(w.pid, getattr(signal, sig))
    assert [b[0].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_a_raising_handler_never_strikes_inside_the_iterator_constructor(monkeypatch):
    """evaluate.py / python -m datasets run under run_cli, whose SIGTERM handler raises Interrupted. Raised
    inside torch's iterator constructor, it left a half-built iterator whose __del__ printed
    "Exception ignored ... no attribute '_workers_status'". Now it is raised after the constructor:
    the iterator is complete and shuts its workers down."""
    import gc

    import utils
    from torch.utils.data._utils import signal_handling

    original = signal_handling._set_SIGCHLD_handler

    def signal_midway():  # torch calls this in the constructor, after the forks, before _reset
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this window, unless held
        original()

    monkeypatch.setattr(signal_handling, "_set_SIGCHLD_handler", signal_midway)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    previous = signal.signal(signal.SIGTERM, utils._raise_interrupted)
    try:
        loader = L.WorkerLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=2, num_workers=2)
        with pytest.raises(utils.Interrupted) as stopped:
            iter(loader)
        frames = stopped.traceback
        assert not any(entry.frame.code.name == "__init__" and "dataloader" in str(entry.path) for entry in frames)
        del stopped, frames
        gc.collect()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not unraisable, [u.exc_value for u in unraisable]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # nothing left blocked


def test_a_stop_never_cuts_a_worker_shutdown_short(monkeypatch):
    """evaluate.py shuts an extraction's workers down itself (evaluate._close_batches). Workers ignore
    SIGTERM, so a raising handler striking before they were told to exit left them running, and the
    interpreter's exit then waited for them forever. The stop now takes effect after the shutdown."""
    import utils

    loader = L.WorkerLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=2, num_workers=2)
    batches = iter(loader)
    next(batches)
    original = type(batches)._mark_worker_as_unavailable

    def signal_first(self, *args, **kwargs):  # the first step of telling the workers to exit
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this window, unless held
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(batches), "_mark_worker_as_unavailable", signal_first)
    previous = signal.signal(signal.SIGTERM, utils._raise_interrupted)
    try:
        with pytest.raises(utils.Interrupted):
            E._close_batches(batches)
        assert not [w for w in batches._workers if w.is_alive()]
    finally:
        signal.signal(signal.SIGTERM, previous)
        for w in batches._workers:  # without the fix: do not leave them to block this test run's exit
            if w.is_alive():
                w.kill()
