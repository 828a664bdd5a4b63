"""How images become batches: transforms (METHOD.md section 4), the image dataset, the P x K identity
samplers and the data loaders, whose worker processes leave the stop signals to the main process.

A batch may carry per-image extras besides the image: with a `masks.MaskSource`, each item is
`(image, pid, camid, clothes, {"mask": LongTensor[H, W]})` (collated to `[B, H, W]`), the part mask moved
with the image by the same geometric transforms (resize, flip, pad, crop; nearest-neighbour for the
mask), while ToTensor, normalisation and random erasing touch the image only. Without masks, items and
batches are exactly those of a plain torchvision composition of the same steps, draw for draw.
"""
from __future__ import annotations

import math
import signal
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

import clip
from datasets import Item
from utils import STOP_SIGNALS, UserError, stop_signals_held

if TYPE_CHECKING:  # masks.py is needed only by callers that have masks
    from masks import MaskSource

Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel
CLIP_NORMALIZATION: Normalization = (clip.MEAN, clip.STD)


def build_transforms(img_size: tuple[int, int], train: bool, normalize: Normalization = CLIP_NORMALIZATION,
                     augmentation: str = "clip-reid") -> PairedTransform:
    """METHOD.md section 4; img_size is (height, width); `normalize` (mean, std) and `augmentation` (a
    key of AUGMENTATIONS) come from the recipe table (config.RECIPES). CLIP-ReID's loaders resize with
    bicubic interpolation for training (interpolation=3); every test resize is torchvision's default
    bilinear (and stage 1's cached features). Then flip, pad 10, random crop, and random erasing.
    `t(image)` gives the image tensor; `t(image, mask)` also the mask, moved alike (PairedTransform)."""
    import torchvision.transforms as T
    from torchvision.transforms import v2

    size = tuple(img_size)
    image_only = [T.ToTensor(), T.Normalize(*normalize)]
    if not train:
        return PairedTransform([v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR)], image_only)
    if augmentation not in AUGMENTATIONS:
        raise UserError(f"augmentation {augmentation!r}: this version knows {', '.join(AUGMENTATIONS)}")
    interpolation, erasing = AUGMENTATIONS[augmentation]
    geometry = [v2.Resize(size, interpolation=getattr(v2.InterpolationMode, interpolation)), v2.RandomHorizontalFlip(0.5), v2.Pad(10),
                v2.RandomCrop(size)]
    return PairedTransform(geometry, image_only + [erasing(ERASE_PROBABILITY)])


class PairedTransform:
    """An image transform that can carry the image's part mask along. `geometry` (torchvision.transforms.v2,
    which transforms an image and a tv_tensors.Mask jointly: one draw of the random parameters for both,
    nearest-neighbour and a 0 = background fill for the mask) moves both alike; `image_only` (ToTensor,
    Normalize, erasing) touches the image alone. v2 works on the PIL image with the same PIL calls and the
    same random draws as the classic transforms, so the image is bit-identical to a plain Compose of both
    lists (tested); ToTensor and Normalize stay the classic ones, since v2.ToDtype(scale=True) multiplies
    by 1/255 where ToTensor divides by 255, which differs in the last bit."""

    def __init__(self, geometry: list, image_only: list):
        import torchvision.transforms as T
        from torchvision.transforms import v2

        self.geometry, self.image_only = v2.Compose(geometry), T.Compose(image_only)

    @property
    def transforms(self) -> list:
        return [*self.geometry.transforms, *self.image_only.transforms]

    def __call__(self, img: Image.Image, mask: torch.Tensor | None = None):
        """img -> image tensor; (img, mask [H, W] integer labels at the image's size) -> (image tensor, mask)."""
        if mask is None:
            return self.image_only(self.geometry(img))
        from torchvision import tv_tensors

        img, mask = self.geometry(img, tv_tensors.Mask(mask))
        return self.image_only(img), mask.as_subclass(torch.Tensor)  # a plain tensor: default_collate stacks it

    def __repr__(self) -> str:
        return f"{type(self).__name__}(geometry={self.geometry}, image_only={self.image_only})"


ERASE_PROBABILITY = 0.5  # CLIP-ReID INPUT.RE_PROB


class BoxErasing:
    """Random erasing of one box: with probability p, up to ATTEMPTS tries to fit a box covering
    MIN_AREA..MAX_AREA of the image (area uniform) with an aspect ratio from `aspect()`, filled on every
    channel by `fill`; else nothing. Draws from torch's generator, so an epoch's augmentation follows
    the epoch's seed (exact --resume). Subclasses set the constants, the aspect draw and the fill."""

    MIN_AREA, MAX_AREA, MIN_ASPECT, ATTEMPTS = 0.02, 1 / 3, 0.3, 10

    def __init__(self, probability: float = ERASE_PROBABILITY):
        self.probability = probability

    def aspect(self) -> float:
        raise NotImplementedError

    def fill(self, img: torch.Tensor, h: int, w: int) -> torch.Tensor | float:
        raise NotImplementedError

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """img: a normalised [C, H, W] tensor, erased in place (and returned)."""
        if float(torch.rand(())) >= self.probability:
            return img
        _, height, width = img.shape
        for _ in range(self.ATTEMPTS):
            area = height * width * _uniform(self.MIN_AREA, self.MAX_AREA)
            aspect = self.aspect()
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                img[:, top:top + h, left:left + w] = self.fill(img, h, w)
                return img
        return img


class PixelNoiseErasing(BoxErasing):
    """Random erasing as CLIP-ReID configures timm's RandomErasing (probability 0.5, mode 'pixel',
    max_count 1; timm's defaults otherwise): one box covering 2 %..1/3 of the image with aspect ratio
    log-uniform in [0.3, 1/0.3], filled with per-pixel N(0, 1) noise on the normalised image; up to 10
    tries. torchvision's RandomErasing(value=0) would fill the mean pixel instead."""

    MIN_AREA, MAX_AREA, MIN_ASPECT, ATTEMPTS = 0.02, 1 / 3, 0.3, 10  # timm's RandomErasing defaults

    def aspect(self) -> float:
        return math.exp(_uniform(math.log(self.MIN_ASPECT), math.log(1 / self.MIN_ASPECT)))

    def fill(self, img: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return torch.randn(img.shape[0], h, w, dtype=img.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.probability}, fill=per-pixel N(0, 1))"


class ZeroErasing(BoxErasing):
    """Random erasing as CSSC's code configures Zhong et al.'s (data_process/transform.py: probability
    0.5, fill 0 after normalisation): one box covering 2 %..40 % of the image with aspect ratio uniform
    in [0.3, 1/0.3], set to 0; up to 100 tries."""

    MIN_AREA, MAX_AREA, MIN_ASPECT, ATTEMPTS = 0.02, 0.4, 0.3, 100

    def aspect(self) -> float:
        return _uniform(self.MIN_ASPECT, 1 / self.MIN_ASPECT)

    def fill(self, img: torch.Tensor, h: int, w: int) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.probability}, fill=0)"


# the training augmentations of the recipe table's `augmentation`: (resize interpolation, erasing)
AUGMENTATIONS = {"clip-reid": ("BICUBIC", PixelNoiseErasing),  # CLIP-ReID: bicubic, timm's pixel noise
                 "cssc": ("BILINEAR", ZeroErasing)}            # CSSC: torchvision's default, zeros


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() loads the pixels, so truncated files fail here
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # changed since build_dataset checked it
        raise UserError(f"cannot read image {path} ({e}); replace or remove the file") from None


class ImageDataset(Dataset):
    """items -> (image tensor, pid, camid, clothes_id); with `masks` a fifth element {"mask": LongTensor[H, W]}
    (indices into masks.PARTS), which the transform moves with the image (PairedTransform)."""

    def __init__(self, items: list[Item], transform=None, masks: MaskSource | None = None):
        self.items, self.transform, self.masks = items, transform, masks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, pid, camid, clothes = self.items[index]
        img = open_rgb(path)
        if self.masks is None:
            return (self.transform(img) if self.transform else img), pid, camid, clothes
        mask = torch.from_numpy(self.masks.read(path))
        if self.transform:
            img, mask = self.transform(img, mask)
        return img, pid, camid, clothes, {"mask": mask.long()}


class RandomIdentitySampler(Sampler[int]):
    """P x K batches: P = batch_size // num_instances distinct identities, K = num_instances images each.

    Each identity's images are shuffled and cut into groups of K (identities with fewer than K
    images are sampled with replacement); batches draw P identities at random among those with
    groups left. The order depends only on (seed, epoch): call `set_epoch(epoch)` before each
    epoch, which is what makes a resumed run exact. `len()` counts whole batches only.
    """

    def __init__(self, items: list[Item], batch_size: int, num_instances: int, seed: int = 0):
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise UserError(f"batch size {batch_size} must be a positive multiple of the instances per identity {num_instances}")
        self.K, self.P, self.seed, self.epoch = num_instances, batch_size // num_instances, seed, 0
        self.index: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            self.index.setdefault(it[1], []).append(i)
        self.pids = sorted(self.index)
        if len(self.pids) < self.P:
            raise UserError(f"a batch needs {self.P} identities (batch size {batch_size} / {num_instances} instances) "
                            f"but the training set has only {len(self.pids)}; lower --batch-size")
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        groups = {}
        for pid in self.pids:
            idx = np.array(self.index[pid])
            idx = rng.choice(idx, self.K, replace=True) if len(idx) < self.K else rng.permutation(idx)
            groups[pid] = [idx[j:j + self.K].tolist() for j in range(0, len(idx) - self.K + 1, self.K)]
        avail, batches = list(self.pids), []
        while len(avail) >= self.P:
            chosen = [avail[j] for j in rng.choice(len(avail), self.P, replace=False)]
            batches.append([i for pid in chosen for i in groups[pid].pop()])
            avail = [p for p in avail if groups[p]]
        return batches

    def _indices(self, epoch: int) -> list[int]:
        return [i for b in self._batches(epoch) for i in b]

    def _epoch_indices(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._indices(self.epoch))
        return self._cache[1]

    def __iter__(self):
        return iter(self._epoch_indices())

    def __len__(self) -> int:
        return len(self._epoch_indices())


class DistributedRandomIdentitySampler(RandomIdentitySampler):
    """The global P x K batches of `RandomIdentitySampler` (batch_size = images per optimizer step
    over all processes), split by identity: rank r takes identities r*P/R .. (r+1)*P/R - 1 of every
    batch, K images each, so a step over R processes sees exactly the batch a single process would.
    The per-rank DataLoader batch is batch_size / R."""

    def __init__(self, items: list[Item], batch_size: int, num_instances: int, num_replicas: int, rank: int, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} is not in [0, {num_replicas})")
        if batch_size % (num_instances * num_replicas):
            raise UserError(f"--batch-size {batch_size} (images per step over all {num_replicas} processes) must be a "
                            f"multiple of --num-instances {num_instances} x {num_replicas} processes")
        super().__init__(items, batch_size, num_instances, seed)
        self.num_replicas, self.rank = num_replicas, rank

    def _indices(self, epoch: int) -> list[int]:
        share = self.P // self.num_replicas * self.K  # images of this rank in every batch
        return [i for b in self._batches(epoch) for i in b[self.rank * share:(self.rank + 1) * share]]


def build_train_loader(items: list[Item], img_size: tuple[int, int], batch_size: int, num_instances: int,
                       workers: int, seed: int, distributed: bool = False, persistent_workers: bool | None = None,
                       normalize: Normalization = CLIP_NORMALIZATION, masks: MaskSource | None = None,
                       augmentation: str = "clip-reid") -> DataLoader:
    """Training loader with P x K identity batches (augmentation: a key of AUGMENTATIONS); `batch_size` counts the images of one optimizer
    step over all processes (each of R processes loads batch_size / R of them). With `masks`, each
    batch carries the part masks too (ImageDataset).

    At each epoch start the training script calls `loader.sampler.set_epoch(epoch)` (batch order)
    and `loader.generator.manual_seed(...)` (worker seeds, drawn when workers start). Note that
    persistent workers (the default when workers > 0) start once, so augmentation randomness is
    only replayed exactly on --resume with workers = 0 or persistent_workers=False.
    """
    world = 1
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise UserError("distributed loading needs torch.distributed initialised first (run under torchrun)")
        world = torch.distributed.get_world_size()
        sampler = DistributedRandomIdentitySampler(items, batch_size, num_instances, world,
                                                   torch.distributed.get_rank(), seed)
    else:
        sampler = RandomIdentitySampler(items, batch_size, num_instances, seed)
    return WorkerLoader(ImageDataset(items, build_transforms(img_size, True, normalize, augmentation), masks), batch_size=batch_size // world,
                        sampler=sampler, num_workers=workers, drop_last=True, pin_memory=torch.cuda.is_available(),
                        persistent_workers=(workers > 0) if persistent_workers is None else (persistent_workers and workers > 0),
                        generator=torch.Generator().manual_seed(seed))


def build_test_loader(items: list[Item], img_size: tuple[int, int], batch_size: int, workers: int,
                      normalize: Normalization = CLIP_NORMALIZATION, masks: MaskSource | None = None) -> DataLoader:
    """Test loader in the fixed order of `items` (with `masks`, batches carry the part masks too)."""
    return WorkerLoader(ImageDataset(items, build_transforms(img_size, False, normalize), masks), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=False)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes leave SIGINT and SIGTERM to the main process from their
    first instant: they start under utils.stop_signals_held() and _worker_init ignores the signals
    before unblocking them. Without that, a group signal (Ctrl-C, scancel, timeout) landing while
    workers start, which stage 2 does every epoch, killed a worker or struck inside torch's iterator
    constructor. Its worker_init_fn is always _worker_init."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("worker_init_fn", _worker_init) is not _worker_init:
            raise ValueError("WorkerLoader's workers run loaders._worker_init (it unblocks the stop signals)")
        super().__init__(*args, **{**kwargs, "worker_init_fn": _worker_init})

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with stop_signals_held():
            iterator = super().__iter__()
        return iterator


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the main process, which stops the run cleanly at a step
    boundary and then shuts them down: Ctrl-C, `timeout` and SLURM's scancel signal the whole
    process group, and a worker killed by the signal would crash the main process's loader. (A
    worker still exits when its parent dies: the DataLoader's watchdog checks.) One thread each,
    so decoding does not fight the main process's math for the cores."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a signal held since the fork is discarded here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by WorkerLoader while workers start
    sys.excepthook = _quiet_lost_parent
    torch.set_num_threads(1)


def _quiet_lost_parent(exc_type: type, exc: BaseException, tb) -> None:
    """sys.excepthook of a worker. Its resource-sharer thread (multiprocessing's, handing batches'
    file descriptors to the main process) reports errors through sys.excepthook, and meets a reset
    connection when the main process stops mid-transfer: the run is ending, so that is no error worth
    a traceback. Anything else is reported as usual."""
    if not issubclass(exc_type, ConnectionError):
        sys.__excepthook__(exc_type, exc, tb)
