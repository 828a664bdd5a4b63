"""Stage 2 of SCI (SIM, METHOD.md section 4): train the CLIP image encoder, SIM, the BN necks and the
identity classifiers with L_id + L_cal + L_i2tce (Eq. 17-20), guided by stage 1's fixed text bank.
Writes OUTPUT_DIR/last.pt (every epoch), best.pt and results.json.

    python train_stage2.py                       # continues the run of train_stage1.py
    python train_stage2.py --stage1 runs/ltcc/stage1.pt --output-dir runs/ltcc
    torchrun --nproc_per_node 2 train_stage2.py --stage1 runs/ltcc/stage1.pt
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import config as cfg  # as cfg: train() calls its ModelConfig `config`
import utils
from datasets import build_dataset, train_fingerprint
from evaluate import evaluate_dataset, format_table, metrics_to_json
from loaders import build_train_loader
from losses import (ClothesAdversarialLoss, CosineClothesClassifier, CrossEntropyLabelSmooth, TripletLoss, text_logits,
                    total_loss)
from models import ModelConfig, SCIReID, build_reid_model

LR_DROP = 0.1         # METHOD.md section 4: x0.1 at each milestone
LABEL_SMOOTHING = 0.1  # epsilon of Eq. 17 and 19
CAL_EPSILON = 0.1      # epsilon of Eq. 18 (CAL's)
TRIPLET_MARGIN = 0.3
BIAS_LR_FACTOR = 2.0  # CLIP-ReID's convention: biases learn twice as fast
# stage 2 takes these from stage1.pt: --dataset and --arch may repeat them, a different value is an error
STAGE1_CHOICES = ("dataset", "arch")
# ... and these describe the stage-1 prompts and backbone, which stage 2 has no flag for
STAGE1_PROPERTIES = ("n_ctx", "ortho", "no_sse", "clothes_prompt", "lambda_id", "lambda_clo", "vit_stride")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg.add_common_args(parser, "stage2")
    g = parser.add_argument_group("stage 2")
    g.add_argument("--stage1", default=None, help="stage-1 file (default: OUTPUT_DIR/stage1.pt). Stage 2 takes "
                   "the stage-1 run's dataset, root, architecture, weights and image size unless given (--dataset "
                   "and --arch must agree with it), and its prompt properties (--n-ctx --no-sse --ortho --clothes-prompt "
                   "--lambda-id --lambda-clo --vit-stride), which have no stage-2 flag")
    g.add_argument("--num-instances", type=int, default=4, help="K images per identity in a batch (default: 4)")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="epochs where the rate drops x0.1 "
                   f"(default: {cfg.recipe_help('stage2_milestones')})")
    g.add_argument("--clothes-lr", type=float, default=None,
                   help="constant learning rate of the clothes classifier, as in CAL, whose scheduler decays only "
                        f"the main optimizer (default: {cfg.recipe_help('clothes_lr')})")
    g.add_argument("--loss-weight", nargs="+", default=[], metavar="TERM=W",
                   help=f"weights of the stage-2 loss terms ({', '.join(LossTerms.NAMES)}) in Eq. 20; unnamed terms "
                        f"weigh 1 (default: id from the recipe: {cfg.recipe_help('id_loss_weight')})")
    g.add_argument("--cal-start", type=int, default=None, help="epoch where the clothes classifier and L_cal "
                   "start (default: 25, CAL's value; half the epochs for runs under 50 epochs)")
    g.add_argument("--no-sim", action="store_true", help="ablation: no SIM, the image tokens go straight to f_proj")
    g.add_argument("--no-cal", action="store_true", help="ablation: no clothes classifier and no L_cal")
    g.add_argument("--triplet", action=argparse.BooleanOptionalAction, default=True,
                   help="CLIP-ReID's batch-hard triplet term (margin 0.3, weight 1) on its three features: pooled layer3 "
                        "and layer4 maps and f_proj (RN50), or the class token before and after the last block and "
                        "f_proj (ViT). Default: on, as in CLIP-ReID's code, which SCI extends; --no-triplet trains "
                        "Eq. 20 literally")
    g.add_argument("--sim-norm", choices=("dot", "softmax"), default="dot",
                   help="non-local affinity of Eq. 12: dot (as printed, divided by the number of tokens N) or "
                        "softmax over the N keys (embedded Gaussian) (default: %(default)s)")
    g.add_argument("--neck-feat", choices=("before", "after"), default="before",
                   help="test feature taken before or after the BN necks (default: before)")
    g.add_argument("--eval-every", type=int, default=10, help="evaluate every N epochs and at the end (default: 10)")
    g.add_argument("--eval-before", action="store_true",
                   help="also evaluate the model before training (written as 'untrained' in results.json)")
    g.add_argument("--flip-test", action="store_true", help="average test features with horizontally flipped images")
    args = parser.parse_args(argv)
    args.given = cfg.given_flags(parser, argv)  # --resume checks these against the saved run
    return args


def loss_weights(items: list[str], id_weight: float) -> dict[str, float]:
    """--loss-weight TERM=W ... over the recipe's ID-loss weight."""
    weights = {"id": id_weight}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in LossTerms.NAMES:
            raise utils.UserError(f"--loss-weight {item}: expected TERM=WEIGHT with TERM one of "
                                  f"{', '.join(LossTerms.NAMES)} and a number, e.g. --loss-weight id=0.25")
    return weights


def merge_stage1_args(args: argparse.Namespace, stage1: dict, path: Path) -> argparse.Namespace:
    """Stage-1 properties default to the stage-1 run's values; a conflicting flag is an error."""
    s1 = stage1["args"]
    for key in STAGE1_PROPERTIES:
        setattr(args, key, s1.get(key, "identity") if key == "clothes_prompt" else s1[key])  # older runs: per identity
    for key in STAGE1_CHOICES:
        mine = getattr(args, key)
        if mine is None:
            setattr(args, key, s1[key])
        elif mine != s1[key]:
            flag = "--" + key.replace("_", "-")
            raise utils.UserError(f"{flag} {mine} disagrees with the stage-1 file {path} ({flag} {s1[key]}); "
                                  f"re-run train_stage1.py with {flag} {mine}, or pass the matching --stage1")
    for key in ("root", "weights", "img_size"):
        if getattr(args, key) is None:
            setattr(args, key, s1[key])
    return args


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Biases at twice the rate (CLIP-ReID); each group keeps its base rate for the schedule."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return [{"params": weights, "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": lr * BIAS_LR_FACTOR, "base_lr": lr * BIAS_LR_FACTOR,
             "weight_decay": weight_decay}]


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def evaluate(model: SCIReID, dataset, args, device, world: int) -> dict:
    """The dataset's protocols. Every rank takes part: each extracts its shard of the features,
    all gather them and all compute the same metrics, so no rank waits alone in a collective
    (NCCL's timeout is 10 minutes; an MSMT17 evaluation can take longer on one GPU)."""
    if world > 1:  # BN running statistics drift apart per rank after the last step: use rank 0's (saved) ones
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    results = evaluate_dataset(model, dataset, tuple(args.img_size), args.batch_size, args.workers, device,
                               flip=args.flip_test, distributed=world > 1,
                               normalize=(args.pixel_mean, args.pixel_std))
    model.train()
    return results


def primary_score(results: dict) -> float:
    """best.pt is chosen by the cloth-changing mAP where the dataset has one, else the first setting's."""
    return (results.get("cc") or next(iter(results.values())))["mAP"]


def main(argv: list[str] | None = None) -> int:
    return utils.run_training("train_stage2.py", parse_args, train, argv)


def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """A new run's settings: stage-1 properties from stage1.pt, then the recipe table for the rest."""
    stage1_path = Path(args.stage1 or Path(args.output_dir) / "stage1.pt")
    args.stage1 = str(stage1_path)
    stage1 = utils.load_checkpoint(stage1_path, "stage1", ("banks", "train_fingerprint", "num_train_pids"))
    args = cfg.apply_recipe(merge_stage1_args(args, stage1, stage1_path), "stage2")
    args.loss_weight = loss_weights(args.loss_weight, cfg.recipe(args.arch, args.dataset)["id_loss_weight"])
    if args.cal_start is None:
        args.cal_start = 25 if args.epochs >= 50 else args.epochs // 2  # 25 is never reached by short schedules
    if args.batch_size % args.num_instances:
        raise utils.UserError(f"--batch-size {args.batch_size} is not a multiple of --num-instances "
                              f"{args.num_instances}; pick P x K images per batch")
    return args, stage1


def comparable(key: str, value, saved: dict):
    """A flag typed with --resume in the form last.pt stores it (paths absolute, --loss-weight as weights)."""
    if key in ("root", "stage1") and value is not None:
        return os.path.abspath(value)
    if key == "loss_weight" and isinstance(value, list):
        return loss_weights(value, saved.get("loss_weight", {}).get("id", 1.0))
    return value


def train(args: argparse.Namespace, stop: utils.StopSignal) -> int:
    out, state, notes = Path(args.output_dir), None, []
    if args.resume:  # the saved run's settings, whatever this command line leaves out
        state = utils.load_checkpoint(out / "last.pt", "stage2", ("model", "optimizers", "scaler", "best", "history",
                                                                "results", "clothes_classifier"))
        args, notes = cfg.restore_run(args, state["args"], out / "last.pt", comparable)
        stage1 = utils.load_checkpoint(args.stage1, "stage1", ("banks", "train_fingerprint", "num_train_pids"))
    else:
        args, stage1 = resolve_args(args)
    board = utils.TensorBoard(out, "stage2", args.tensorboard)  # a missing package stops here, before anything
    device, rank, world, log = utils.start_run(args, out, "stage2")
    for note in notes:
        log.info(note)

    # data
    dataset = build_dataset(args.dataset, args.root)
    if train_fingerprint(dataset.train) != stage1["train_fingerprint"]:
        raise utils.UserError(f"the training split of {args.dataset} under {args.root} is not the one {args.stage1} "
                              f"was trained on; re-run train_stage1.py on this data")
    log.info("\n%s", dataset.statistics())
    loader = build_train_loader(dataset.train, tuple(args.img_size), args.batch_size, args.num_instances,
                                args.workers, args.seed, distributed=world > 1,
                                persistent_workers=False,  # workers re-seeded each epoch: exact --resume
                                normalize=(args.pixel_mean, args.pixel_std))
    stop.check()

    # model
    bank = stage1["banks"]["F_id" if args.no_sse else "F_ort"]  # F_ort = F_id without SSE anyway
    # only the image encoder is kept: the text encoder's output is the fixed bank
    config = ModelConfig.from_run(utils.args_to_dict(args), dataset.num_train_pids)
    model = build_reid_model(config, bank, args.weights, seed=args.seed, logger=log).to(device)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.Adam(param_groups(model, args.lr, args.weight_decay))
    amp = utils.MixedPrecision(device, args.amp, args.amp_dtype)

    use_cal = not args.no_cal and dataset.has_clothes
    if not args.no_cal and not dataset.has_clothes:
        log.info("%s has no clothes labels: the clothes-adversarial loss is disabled", args.dataset)
    clothes_clf = optimizer_cc = None
    if use_cal:
        clothes_clf = CosineClothesClassifier(model.feature_dim, dataset.num_train_clothes).to(device)
        # CAL's own optimizer for the clothes classifier, at a constant rate (CAL decays only the main one)
        optimizer_cc = torch.optim.Adam(clothes_clf.parameters(), lr=args.clothes_lr, weight_decay=args.weight_decay)
    losses = LossTerms(model, args, clothes_clf, torch.as_tensor(dataset.pid2clothes, device=device))
    stop.check()

    start_epoch, best, history, results, final = 0, {"score": -1.0, "epoch": 0}, [], {}, None

    def save_last(epochs_done: int) -> None:
        """last.pt after every epoch, before its evaluation, so no error there can lose the training."""
        if rank == 0:
            state = checkpoint(model, args, config, epochs_done, final)
            state.update(optimizers=[o.state_dict() for o in (optimizer, optimizer_cc) if o is not None],
                         scaler=amp.state_dict(), best=best, history=history, results=results,
                         clothes_classifier=clothes_clf.state_dict() if clothes_clf is not None else {})
            utils.save_checkpoint(state, out / "last.pt")
        stop.keep(out / "last.pt", f"epoch {epochs_done} of {args.epochs}")

    def evaluate_epoch(record: dict) -> None:
        """The protocols after epoch record["epoch"], into the record; best.pt when the score improves."""
        nonlocal best, final
        evaluation = evaluate(model, dataset, args, device, world)  # every rank, see evaluate()
        log.info("epoch %d\n%s", record["epoch"], format_table(evaluation))
        record["metrics"] = final = metrics_to_json(evaluation)
        if primary_score(final) > best["score"]:
            best = {"score": primary_score(final), "epoch": record["epoch"]}
            if rank == 0:
                utils.save_checkpoint(checkpoint(model, args, config, record["epoch"], final), out / "best.pt")

    def evaluated_at(epochs_done: int) -> bool:
        return epochs_done == args.epochs or epochs_done % args.eval_every == 0

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizers"][0])
        if clothes_clf is not None:
            optimizer_cc.load_state_dict(state["optimizers"][1])
            clothes_clf.load_state_dict(state["clothes_classifier"])
        amp.load_state_dict(state["scaler"])
        start_epoch, best, history, results = state["epoch"], state["best"], state["history"], state["results"]
        final = state.get("metrics")
        stop.keep(out / "last.pt", f"epoch {start_epoch} of {args.epochs}")
        log.info("resumed from %s after epoch %d", out / "last.pt", start_epoch)
        if history and evaluated_at(start_epoch) and "metrics" not in history[-1]:
            log.info("epoch %d was trained but its evaluation did not finish: evaluating it now", start_epoch)
            evaluate_epoch(history[-1])
            save_last(start_epoch)
        if rank == 0:  # the metrics file says what the checkpoint holds, not what a stopped run added
            utils.write_jsonl(out / "metrics_stage2.jsonl", history)
    elif args.eval_before:
        evaluation = evaluate(model, dataset, args, device, world)
        log.info("before training\n%s", format_table(evaluation))
        results["untrained"] = metrics_to_json(evaluation)
        board.log_epoch({"epoch": 0, "metrics": results["untrained"]})

    # loop
    utils.note_short_schedule(log, args, [args.lr * utils.warmup_multistep(e, args.warmup_epochs, args.warmup_factor,
                                                                           args.milestones, LR_DROP)
                                          for e in range(1, args.epochs + 1)])
    model.train()
    t_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        # everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly
        loader.sampler.set_epoch(epoch)
        loader.generator.manual_seed(utils.epoch_seed(args.seed, epoch))
        torch.manual_seed(utils.epoch_seed(args.seed, epoch))
        # epochs counted from 1, as CLIP-ReID's processor steps its scheduler before each epoch
        lr_factor = utils.warmup_multistep(epoch + 1, args.warmup_epochs, args.warmup_factor, args.milestones, LR_DROP)
        set_lr(optimizer, lr_factor)
        where = f"{out / 'last.pt'} keeps the last good epoch"
        bar = train_one_epoch(net, loader, losses, optimizer, optimizer_cc, amp, epoch, args, stop, where, world)
        if bar is None:
            return stop.report(log)

        record = {"epoch": epoch + 1, "lr": args.lr * lr_factor, "lr_factor": lr_factor,
                  "images_per_s": round(bar.images_per_second, 1),
                  **utils.epoch_summary(log, bar, amp, epoch, args.epochs)}
        history.append(record)
        save_last(epoch + 1)
        if evaluated_at(epoch + 1):
            evaluate_epoch(record)
            save_last(epoch + 1)  # again, with the metrics and best
        if rank == 0:  # a metrics line never runs ahead of what is saved
            utils.append_jsonl(out / "metrics_stage2.jsonl", record)
            board.log_epoch(record)
        utils.barrier()
        if stop.requested(device):
            return stop.report(log)

    if rank == 0:
        final = final or history[-1]["metrics"]  # resumed after the last epoch had been evaluated
        results.update(metrics=final, best_epoch=best["epoch"],
                       train_seconds=round(time.perf_counter() - t_start, 1),
                       images_per_second=[h["images_per_s"] for h in history])
        utils.write_json(out / "results.json", results)
        log.info("wrote %s, %s and %s", out / "last.pt", out / "best.pt", out / "results.json")
    board.close()
    return 0


def train_one_epoch(net: torch.nn.Module, loader, losses: LossTerms, optimizer: torch.optim.Optimizer,
                    optimizer_cc: torch.optim.Optimizer | None, amp: utils.MixedPrecision, epoch: int,
                    args: argparse.Namespace, stop: utils.StopSignal, where: str, world: int) -> utils.Progress | None:
    """One epoch of stage 2; returns its progress record (epoch means, images/s), None when stopped."""
    rank = dist.get_rank() if world > 1 else 0
    device = losses.text_bank.device
    bar = utils.Progress(len(loader), f"stage2 {epoch + 1}/{args.epochs}", args.log_every, enabled=rank == 0)
    for step, (images, pids, _, clothes) in enumerate(loader, 1):
        images, pids, clothes = images.to(device, non_blocking=True), pids.to(device), clothes.to(device)
        at = f"epoch {epoch + 1} step {step}; {where}"
        with amp.autocast():
            outputs = net(images)
        extra = {}
        if losses.cal_on(epoch):  # CAL's classifier learns first, on detached features
            extra["clo"] = train_clothes_classifier(losses.clothes_classifier, optimizer_cc, outputs["bn_feat"],
                                                    clothes, world, amp.scaling, at)
        with amp.autocast():
            terms = losses.terms(outputs, pids, clothes, epoch)
        amp.step(total_loss(terms, args.loss_weight), optimizer, f"stage-2 loss at {at}")  # Eq. 20
        bar.update(step, len(images) * world, {k: v.item() for k, v in terms.items()} | extra,
                   optimizer.param_groups[0]["lr"])
        if stop.requested(device):
            return None
    return bar


class LossTerms:
    """The stage-2 loss terms of one batch (Eq. 17-19, and CLIP-ReID's triplet), summed with
    --loss-weight by losses.total_loss (Eq. 20). A new term: a function or module in losses.py,
    one line in `terms` and its name in NAMES (then --loss-weight NAME=W weighs it)."""

    NAMES = ("id", "i2t", "cal", "tri")  # the names --loss-weight accepts

    def __init__(self, model: SCIReID, args: argparse.Namespace, clothes_classifier: CosineClothesClassifier | None,
                 pid2clothes: torch.Tensor):
        self.text_bank = model.text_bank
        self.id_loss = CrossEntropyLabelSmooth(LABEL_SMOOTHING)
        self.i2t_loss = CrossEntropyLabelSmooth(LABEL_SMOOTHING)
        self.triplet = TripletLoss(TRIPLET_MARGIN) if args.triplet else None
        self.clothes_classifier, self.pid2clothes = clothes_classifier, pid2clothes
        self.cal_loss = ClothesAdversarialLoss(CAL_EPSILON)
        self.cal_start = args.cal_start

    def cal_on(self, epoch: int) -> bool:
        return self.clothes_classifier is not None and epoch >= self.cal_start

    def terms(self, outputs: dict, pids: torch.Tensor, clothes: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        terms = {"id": sum(self.id_loss(logits, pids) for logits in outputs["logits"]),          # Eq. 17
                 "i2t": self.i2t_loss(text_logits(outputs["f_proj"], self.text_bank), pids)}  # Eq. 19
        if self.triplet is not None:  # CLIP-ReID: summed over its three features, weight 1
            terms["tri"] = sum(self.triplet(f, pids) for f in outputs["triplet_feats"])
        if self.cal_on(epoch):  # push the backbone to make one identity's clothes indistinguishable (Eq. 18)
            logits = self.clothes_classifier(outputs["bn_feat"], detach_weight=True)
            terms["cal"] = self.cal_loss(logits, clothes, self.pid2clothes[pids])
        return terms


def train_clothes_classifier(clf: CosineClothesClassifier, optimizer: torch.optim.Optimizer, bn_feat: torch.Tensor,
                             clothes: torch.Tensor, world: int, scaling: bool, where: str) -> float:
    """One step of CAL's clothes classifier on detached features; returns its loss. Under DDP the
    gradients are averaged first, so every rank takes the same decision. A non-finite gradient stops
    the run in float32 and bfloat16, and skips this step under float16 (the main step skips too)."""
    loss = F.cross_entropy(clf(bn_feat.detach()), clothes)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in clf.parameters()]
    if world > 1:
        for g in grads:
            dist.all_reduce(g)
            g /= world
    if all(bool(torch.isfinite(g).all()) for g in grads):
        optimizer.step()
    elif not scaling:
        raise utils.TrainingStopped(f"non-finite clothes-classifier loss at {where} (try a lower --lr, or drop --amp)")
    return loss.item()


def checkpoint(model: SCIReID, args, config: ModelConfig, epoch: int, metrics: dict | None) -> dict:
    """What evaluate.py needs to rebuild and test the model with no other file: `config` rebuilds it."""
    return {"kind": "stage2", "epoch": epoch, "args": utils.args_to_dict(args), "model": model.state_dict(),
            "config": asdict(config), "num_classes": config.num_classes, "metrics": metrics}


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
