"""Stage 1 of SCI (SSE, METHOD.md section 3): learn identity and clothes prompts against frozen CLIP
image features, and write the text-feature banks F_id, F_clo, F_ort (C x D) to OUTPUT_DIR/stage1.pt.

    python train_stage1.py --dataset ltcc --root /data
    torchrun --nproc_per_node 2 train_stage1.py --dataset ltcc --root /data
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import config
import training
import utils
from datasets import build_dataset, train_fingerprint
from evaluate import extract_features
from loaders import build_test_loader
from losses import image_to_text_loss, prompt_loss, text_to_image_loss, total_loss
from masks import mask_source
from models import SemanticPrompts, build_clip
from registry import METHODS, method_of

CHECKPOINT, PROGRESS = "stage1.pt", "stage1_last.pt"
LOSS_TERMS = ("i2t", "t2i", "sim", "clo_i2t", "clo_t2i")  # what --loss-weight accepts (clo_*: per-outfit prompts)
STAGE1_METHODS = tuple(name for name, m in METHODS.items() if m.needs_stage1)
SSE_FLAGS = ("ortho", "clothes_prompt", "lambda_id", "lambda_clo", "match_norm", "no_sse")  # SCI's stage 1 only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_common_args(parser, "stage1")
    config.add_prompt_args(parser)
    g = parser.add_argument_group("stage 1")
    g.add_argument("--method", choices=STAGE1_METHODS, default="sci",
                   help="whose stage 1: sci (SSE), clipreid (one identity prompt, as --no-sse), ccaf (prompts on "
                        "clothes-shielded images and on clothes pixels; part masks) or csgn (prompts on RGB and on "
                        "grayscale images); ccaf and csgn are RECONSTRUCTED from their papers' descriptions "
                        "(METHOD.md sections 13-14) (default: %(default)s)")
    g.add_argument("--masks", default=None, metavar="DIR",
                   help="ccaf: part masks, SCHP label PNGs at each image's relative path (masks.py; default: the "
                        "synthetic world's own, none elsewhere); stage 2 reads the same unless given")
    g.add_argument("--cosine-sim", action="store_true",
                   help="s(.,.) of Eq. 9-10 as cosine times CLIP's logit scale instead of a plain dot product; "
                        "stage 2 takes the same similarity for Eq. 19's logits")
    g.add_argument("--match-norm", action="store_true",
                   help="a control: rescale each F_ort row to its F_id row's norm, so that SSE changes the bank's "
                        "direction only (METHOD.md section 11)")
    g.add_argument("--loss-weight", nargs="+", default=[], metavar="TERM=W",
                   help=f"weights of the stage-1 loss terms ({', '.join(LOSS_TERMS)}) in Eq. 11; unnamed terms weigh 1")
    args = parser.parse_args(argv)
    given = config.given_flags(parser, argv)
    sse = sorted(f"--{k.replace('_', '-')}" for k in SSE_FLAGS if k in given and not (k == "no_sse" and args.method == "clipreid"))
    if args.method != "sci" and sse:  # CLIP-ReID, CCAF and CSGN have no SSE
        parser.error(f"{', '.join(sse)}: SCI's stage-1 options; --method {args.method} has no SSE, drop them")
    if args.clothes_prompt == "outfit" and (args.no_sse or args.ortho != "gram-schmidt"):
        parser.error("--clothes-prompt outfit removes the span of several outfit features: it needs SSE and "
                     "--ortho gram-schmidt")
    if args.match_norm and args.no_sse:
        parser.error("--match-norm rescales SSE's F_ort to |F_id|: without SSE F_ort is F_id; drop --match-norm")
    args.given = given  # --resume checks these against the saved run
    prompts = method_of(args.method).prompts  # a method's own stage 1 (ccaf, csgn): its own terms
    if args.method != "sci":
        args.no_sse = True  # F_ort = F_id: CLIP-ReID's identity prompts, and the banks of ccaf and csgn
    if args.masks is not None and not (prompts is not None and prompts.NEEDS_MASKS):
        parser.error(f"--masks {args.masks}: --method {args.method} does not read part masks in stage 1; drop it")
    try:
        terms = prompts.TERMS if prompts is not None else LOSS_TERMS
        args.loss_weight = config.loss_weights(args.loss_weight, terms, {})
    except utils.UserError as exc:
        parser.error(str(exc))
    absent = [t for t in args.loss_weight if prompts is None and ((t == "sim" and args.no_sse)
              or (t.startswith("clo_") and args.clothes_prompt != "outfit"))]
    if absent:  # a weight for a term the run does not compute would do nothing
        parser.error(f"--loss-weight {', '.join(absent)}: no such term without SSE (sim) or per-outfit prompts "
                     f"(clo_i2t, clo_t2i); drop the weight")
    if args.arch not in config.CLIP_ARCHS:  # CSSC's ResNet-50: no text encoder, no prompts
        parser.error(f"--arch {args.arch} is torchvision's ResNet-50 of --method cssc, which has no stage 1; "
                     f"train it with python train_stage2.py --method cssc")
    return config.apply_recipe(args, "stage1")


def train_one_epoch(net: torch.nn.Module, optimizer: torch.optim.Optimizer, amp: training.MixedPrecision,
                    image_feats: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor, clothes: torch.Tensor,
                    epoch: int, lr: float, logit_scale: float, args: argparse.Namespace, stop: utils.StopSignal,
                    where: str) -> utils.Progress | None:
    """One epoch of stage 1 over the cached features: each step takes one global batch of
    --batch-size, split over the processes. Returns the progress record, None when stopped."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    steps = epoch_steps(len(labels), args.batch_size, world)
    # the order depends on (seed, epoch) only, so a resumed run sees exactly the same batches
    generator = torch.Generator().manual_seed(utils.epoch_seed(args.seed, epoch))
    order = torch.randperm(len(labels), generator=generator)
    bar = utils.Progress(steps, f"stage1 {epoch + 1}/{args.epochs}", args.log_every, enabled=rank == 0)
    for step in range(steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size].tensor_split(world)[rank].to(labels.device)
        with amp.autocast():
            terms = step_terms(net, image_feats, idx, labels, clothes, logit_scale, args)
        amp.step(total_loss(terms, args.loss_weight), optimizer,  # Eq. 11, weighed like stage 2's Eq. 20
                 f"stage-1 loss at epoch {epoch + 1} step {step + 1}; {where}")
        bar.update(step + 1, len(idx) * world, {k: v.item() for k, v in terms.items()}, lr)
        if stop.requested(labels.device):
            return None
    return bar


def step_terms(net: torch.nn.Module, image_feats: torch.Tensor | dict[str, torch.Tensor], idx: torch.Tensor,
               labels: torch.Tensor, clothes: torch.Tensor, logit_scale: float,
               args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The stage-1 terms of the samples `idx`: SCI's Eq. 1-11 over the image features, or a method's own
    prompt module (image_feats then holds its views by name) giving its terms."""
    if isinstance(image_feats, dict):
        return net(labels[idx], clothes[idx], {k: v[idx].float() for k, v in image_feats.items()}, logit_scale,
                   args.cosine_sim)
    outfit = args.clothes_prompt == "outfit"
    f_id, f_clo, f_ort = net(labels[idx], clothes[idx]) if outfit else net(labels[idx])  # Eq. 1-5
    terms = prompt_loss(image_feats[idx].float(), f_ort.float(), f_id.float(),  # Eq. 9-11
                        None if f_clo is None else f_clo.float(), labels[idx],
                        lambda_id=args.lambda_id, lambda_clo=args.lambda_clo,
                        use_sim=not args.no_sse, logit_scale=logit_scale, cosine=args.cosine_sim)
    if outfit:  # per-outfit prompts learn their outfit's images (the same Eq. 9-10, clothes labels)
        terms = outfit_prompt_loss(terms, image_feats[idx].float(), f_clo.float(), clothes[idx],
                                   logit_scale, args.cosine_sim)
    return terms


def epoch_steps(num_images: int, batch_size: int, world: int = 1) -> int:
    """Steps of a stage-1 epoch: CLIP-ReID's processor takes the remainder as a last, smaller batch;
    here only when every process gets at least one sample of it (an empty share has no loss)."""
    full, remainder = divmod(num_images, batch_size)
    return max(full + (remainder >= world), 1)


def outfit_prompt_loss(terms: dict[str, torch.Tensor], image_feats: torch.Tensor, f_clo: torch.Tensor,
                       clothes: torch.Tensor, logit_scale: float, cosine: bool) -> dict[str, torch.Tensor]:
    """The per-outfit clothes prompts' own contrastive terms (Eq. 9-10 with F_clo and clothes labels),
    added to the stage-1 terms: an extension beyond the paper (METHOD.md section 3)."""
    clo_i2t = image_to_text_loss(image_feats, f_clo, logit_scale, cosine)
    clo_t2i = text_to_image_loss(f_clo, image_feats, clothes, logit_scale, cosine)
    return {**terms, "clo_i2t": clo_i2t, "clo_t2i": clo_t2i}


def clothes_by_identity(train: list, num_ids: int) -> list[list[int]]:
    """clothes_of[y]: the sorted clothes labels identity y wears in the training split."""
    sets: list[set] = [set() for _ in range(num_ids)]
    for _, pid, _, clothes in train:
        sets[pid].add(clothes)
    return [sorted(s) for s in sets]


class ImageEncoder(torch.nn.Module):
    """CLIP's pooled image feature V (token 0 of the projected sequence) for caching; with a `view`
    (images, part masks) -> images, the feature of that view (e.g. CCAF's shielded images)."""

    def __init__(self, clip_model: torch.nn.Module, view: Callable | None = None):
        super().__init__()
        self.visual, self.view = clip_model.visual, view

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.visual(images if self.view is None else self.view(images, mask))


def main(argv: list[str] | None = None) -> int:
    return utils.run_training("train_stage1.py", parse_args, train, argv)


def train(args: argparse.Namespace, stop: utils.StopSignal) -> int:
    run = training.Run(args, stop, "stage1", PROGRESS, ("prompts", "optimizer", "scaler", "history"))
    args = run.args
    args.weights = config.resolve_weights(args.arch, args.weights)
    log = run.open(args)
    device = run.device

    # data
    dataset = build_dataset(args.dataset, args.root)
    log.info("\n%s", dataset.statistics())
    stop.check()

    # model: frozen CLIP; image features cached once with test-time transforms
    clip_model = build_clip(args.arch, args.weights, tuple(args.img_size), seed=args.seed,
                            vit_stride=args.vit_stride, logger=log)
    clip_model.requires_grad_(False).to(device)
    stop.check()
    image_feats, labels, clothes = cache_views(clip_model, dataset, args, device, log)
    del clip_model.visual  # not needed any more
    prompts = build_prompts(clip_model, dataset, args).to(device)
    trainable = [p for p in prompts.parameters() if p.requires_grad]  # the prompt contexts only
    net = DistributedDataParallel(prompts) if run.world > 1 else prompts
    optimizer = torch.optim.Adam(trainable, lr=args.lr, weight_decay=args.weight_decay)
    amp = training.MixedPrecision(device, args.amp, args.amp_dtype)
    logit_scale = clip_model.logit_scale.exp().item() if args.cosine_sim else 1.0
    if run.state is not None:
        try:
            prompts.load_state_dict(run.state["prompts"])
        except RuntimeError as exc:  # e.g. the --weights file was replaced by a CLIP of another text width
            raise utils.UserError(f"--resume: the saved prompts do not fit the CLIP of --weights {args.weights} "
                                  f"({str(exc).splitlines()[-1].strip()}); was the weights file replaced? Start a new "
                                  f"run in another --output-dir") from None
        optimizer.load_state_dict(run.state["optimizer"])
        amp.load_state_dict(run.state["scaler"])
    start_epoch = run.resume()
    stop.check()

    # loop
    training.note_short_schedule(log, args, [schedule(e, args) for e in range(1, args.epochs + 1)])
    for epoch in range(start_epoch, args.epochs):
        lr = schedule(epoch + 1, args)  # epochs counted from 1, as CLIP-ReID calls scheduler.step(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        bar = train_one_epoch(net, optimizer, amp, image_feats, labels, clothes, epoch, lr, logit_scale, args, stop,
                              run.where)
        if bar is None:
            return stop.report(log)
        record = run.record(epoch, bar, amp, lr=lr)
        run.save({"kind": "stage1", "epoch": epoch + 1, "args": utils.args_to_dict(args),
                  "prompts": prompts.state_dict(), "optimizer": optimizer.state_dict(),
                  "scaler": amp.state_dict(), "history": run.history}, epoch + 1)
        run.log_epoch(record)
        if run.stopped():
            return stop.report(log)
    if run.rank == 0:
        save_banks(prompts, dataset, args, logit_scale, run.out / CHECKPOINT, log)
    run.close()
    return 0


def schedule(epoch: int, args: argparse.Namespace) -> float:
    """The learning rate of epoch `epoch` (from 1): CLIP-ReID's stage-1 warm-up and cosine."""
    return training.warmup_cosine(epoch, args.epochs, args.warmup_epochs, args.lr, args.warmup_lr, args.min_lr)


def cache_views(clip_model: torch.nn.Module, dataset, args: argparse.Namespace, device: torch.device, log
                ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """SCI's cached image features, or those of each view a method's own stage 1 names (e.g. CCAF's
    shielded images and clothes pixels, from the part masks), with the identity and clothes labels."""
    own = method_of(args.method).prompts
    if own is None:
        return cache_image_features(clip_model, dataset, args, device, log)
    source = mask_source(dataset, args.masks) if own.NEEDS_MASKS else None
    if own.NEEDS_MASKS and source is None:
        raise utils.UserError(f"--method {args.method} learns its prompts on part masks, and {args.dataset} has "
                              f"none of its own; pass --masks DIR (SCHP label PNGs, see masks.py)")
    views = {}
    for name, view in own.views(args).items():
        views[name], labels, clothes = cache_image_features(clip_model, dataset, args, device, log, view, source)
    return views, labels, clothes


def build_prompts(clip_model: torch.nn.Module, dataset, args: argparse.Namespace) -> torch.nn.Module:
    """The prompts stage 1 learns: SCI's SemanticPrompts (SSE, or CLIP-ReID's with --no-sse), or the
    method's own prompt module."""
    own = method_of(args.method).prompts
    if own is not None:
        return own.for_run(clip_model, dataset, args)
    num_ids = dataset.num_train_pids
    clothes_of = clothes_by_identity(dataset.train, num_ids) if args.clothes_prompt == "outfit" else None
    return SemanticPrompts(clip_model, num_ids, args.n_ctx, use_sse=not args.no_sse, ortho=args.ortho,
                           clothes_of=clothes_of, norm_matched=args.match_norm)


def cache_image_features(clip_model: torch.nn.Module, dataset, args: argparse.Namespace, device: torch.device,
                         log, view: Callable | None = None, masks=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's image feature of every training image (of its `view`, with the part `masks` a view reads)
    with test-time transforms, once: (features [N, D], identity labels [N], clothes labels [N]) on `device`."""
    loader = build_test_loader(dataset.train, tuple(args.img_size), args.batch_size, args.workers,
                               (args.pixel_mean, args.pixel_std), masks=masks)
    t0 = time.perf_counter()
    feats, pids, _, clothes_ids = extract_features(ImageEncoder(clip_model, view), loader, device, amp=args.amp,
                                                   amp_dtype=args.amp_dtype)
    log.info("cached %d image features (%d-d) in %.1fs", len(pids), feats.shape[1], time.perf_counter() - t0)
    return feats.to(device), torch.as_tensor(pids, device=device), torch.as_tensor(clothes_ids, device=device)


def save_banks(prompts: SemanticPrompts, dataset, args: argparse.Namespace, logit_scale: float, path: Path,
               log) -> None:
    """stage1.pt: the learnt contexts, the banks F_id, F_clo, F_ort for all C identities, and the scale
    of s(.,.) (1 for dot products; CLIP's exp(logit_scale) with --cosine-sim), which stage 2 reuses."""
    num_ids = dataset.num_train_pids
    banks = prompts.banks(num_ids)
    ids = sorted({pid: os.path.basename(p) for p, pid, _, _ in reversed(dataset.train)}.items())
    utils.save_checkpoint({
        "kind": "stage1", "args": utils.args_to_dict(args), "epoch": args.epochs,
        # every learnt prompt parameter (a fork's too), not the frozen text encoder
        "contexts": {k: v.cpu() for k, v in prompts.state_dict().items() if not k.startswith("text_encoder.")},
        "banks": banks, "identities": [name for _, name in ids], "logit_scale": logit_scale,
        "num_train_pids": num_ids, "train_fingerprint": train_fingerprint(dataset.train),
    }, path)
    log.info("wrote %s (banks F_id, F_clo, F_ort: %d x %d)", path, *banks["F_ort"].shape)


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
