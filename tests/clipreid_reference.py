"""Reference facts from CLIP-ReID's code (Syliz517/CLIP-ReID), transcribed literally so the tests can
compare our schedules and stepping with them without the original repository:

- stage 1: `solver/scheduler_factory.py:create_scheduler` builds timm's `CosineLRScheduler` with
  t_initial = STAGE1.MAX_EPOCHS, lr_min = STAGE1.LR_MIN, t_mul 1, decay_rate 0.1, warmup_lr_init =
  STAGE1.WARMUP_LR_INIT, warmup_t = STAGE1.WARMUP_EPOCHS, cycle_limit 1, t_in_epochs, no noise, no
  warm-up prefix; `processor/processor_clipreid_stage1.py` calls `scheduler.step(epoch)` at the start
  of `for epoch in range(1, epochs + 1)`.
- stage 2: `solver/lr_scheduler.py:WarmupMultiStepLR` (a torch `_LRScheduler`: construction steps
  once, to last_epoch 0) with STAGE2.STEPS, GAMMA, WARMUP_FACTOR, WARMUP_ITERS, 'linear';
  `processor/processor_clipreid_stage2.py` calls `scheduler.step()` at the start of every epoch.
"""
from __future__ import annotations

import math
from bisect import bisect_right


class TimmCosineAsClipReidBuildsIt:
    """timm CosineLRScheduler(t_initial, lr_min, t_mul=1, decay_rate=0.1, warmup_lr_init, warmup_t,
    cycle_limit=1, warmup_prefix=False), one parameter group at `base_lr`."""

    def __init__(self, base_lr: float, t_initial: int, lr_min: float, warmup_lr_init: float, warmup_t: int):
        self.base, self.t_initial, self.lr_min = base_lr, t_initial, lr_min
        self.warmup_lr_init, self.warmup_t = warmup_lr_init, warmup_t
        self.decay_rate, self.cycle_limit = 0.1, 1
        self.warmup_step = (base_lr - warmup_lr_init) / warmup_t if warmup_t else 1
        self.lr = warmup_lr_init if warmup_t else base_lr  # set at construction

    def _get_lr(self, t: int) -> float:
        if t < self.warmup_t:
            return self.warmup_lr_init + t * self.warmup_step
        i = t // self.t_initial  # t_mul == 1
        t_i, t_curr = self.t_initial, t - self.t_initial * i
        gamma = self.decay_rate ** i
        lr_min, lr_max = self.lr_min * gamma, self.base * gamma
        if i < self.cycle_limit:
            return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr / t_i))
        return self.lr_min

    def step(self, epoch: int) -> None:
        self.lr = self._get_lr(epoch)


class WarmupMultiStepLRAsClipReid:
    """WarmupMultiStepLR(milestones, gamma, warmup_factor, warmup_iters, 'linear') on a torch
    scheduler's stepping: last_epoch starts at -1 and the constructor steps once."""

    def __init__(self, base_lr: float, milestones: list[int], gamma: float, warmup_factor: float, warmup_iters: int):
        self.base, self.milestones, self.gamma = base_lr, milestones, gamma
        self.warmup_factor, self.warmup_iters = warmup_factor, warmup_iters
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        warmup = 1.0
        if self.last_epoch < self.warmup_iters:
            alpha = self.last_epoch / self.warmup_iters
            warmup = self.warmup_factor * (1 - alpha) + alpha
        self.lr = self.base * warmup * self.gamma ** bisect_right(self.milestones, self.last_epoch)


def stage1_rates(epochs: int, base_lr: float, warmup: int, warmup_lr: float, min_lr: float) -> list[float]:
    """The rate each stage-1 epoch trains at, as processor_clipreid_stage1 steps the scheduler."""
    scheduler, rates = TimmCosineAsClipReidBuildsIt(base_lr, epochs, min_lr, warmup_lr, warmup), []
    for epoch in range(1, epochs + 1):
        scheduler.step(epoch)
        rates.append(scheduler.lr)
    return rates


def stage2_rates(epochs: int, base_lr: float, milestones: list[int], gamma: float, warmup_factor: float,
                 warmup: int) -> list[float]:
    """The rate each stage-2 epoch trains at, as processor_clipreid_stage2 steps the scheduler."""
    scheduler, rates = WarmupMultiStepLRAsClipReid(base_lr, milestones, gamma, warmup_factor, warmup), []
    for _ in range(1, epochs + 1):
        scheduler.step()
        rates.append(scheduler.lr)
    return rates
