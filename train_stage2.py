"""Stage 2 of SCI (SIM, SPEC section 4): train the CLIP image encoder, SIM, the BN necks and the
identity classifiers with L_id + L_cal + L_i2tce (Eq. 17-20), guided by stage 1's fixed text bank.
Writes OUTPUT_DIR/last.pt (every epoch), best.pt and results.json.

    python train_stage2.py                       # continues the run of train_stage1.py
    python train_stage2.py --stage1 runs/ltcc/stage1.pt --output-dir runs/ltcc
    torchrun --nproc_per_node 2 train_stage2.py --stage1 runs/ltcc/stage1.pt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import utils
from datasets import build_dataset, build_train_loader
from evaluate import evaluate_dataset, format_table, metrics_to_json
from losses import ClothesAdversarialLoss, CosineClothesClassifier, CrossEntropyLabelSmooth, TripletLoss
from models import SCIReID, build_reid_model
from train_stage1 import train_fingerprint

WARMUP_FACTOR = 0.01  # SPEC section 4: linear warm-up from 1% of the base rate
LR_DROP = 0.1         # SPEC section 4: x0.1 at each milestone
LABEL_SMOOTHING = 0.1  # epsilon of Eq. 17 and 19
CAL_EPSILON = 0.1      # epsilon of Eq. 18 (CAL's)
TRIPLET_MARGIN = 0.3
# a --resume must continue the same run: these arguments change what last.pt holds
RUN_IDENTITY = ("dataset", "arch", "img_size", "no_sim", "sim_norm", "no_sse", "stage1")
BIAS_LR_FACTOR = 2.0  # CLIP-ReID's convention: biases learn twice as fast
# properties of the stage-1 run that stage 2 inherits; passing a different value is an error
STAGE1_PROPERTIES = ("dataset", "arch", "n_ctx", "ortho", "no_sse", "lambda_id", "lambda_clo", "vit_stride")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(parser)
    g = parser.add_argument_group("stage 2")
    g.add_argument("--stage1", default=None, help="stage-1 file (default: OUTPUT_DIR/stage1.pt); the dataset, "
                   "architecture and prompt flags default to its values, and must agree with them")
    g.add_argument("--num-instances", type=int, default=4, help="K images per identity in a batch (default: 4)")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="epochs where the rate drops x0.1 "
                   "(default: 40 70)")
    g.add_argument("--cal-start", type=int, default=None, help="epoch where the clothes classifier and L_cal "
                   "start (default: 25, CAL's value; half the epochs for runs under 50 epochs)")
    g.add_argument("--no-sim", action="store_true", help="ablation: no SIM, the image tokens go straight to f_proj")
    g.add_argument("--no-cal", action="store_true", help="ablation: no clothes classifier and no L_cal")
    g.add_argument("--triplet", action="store_true", help="add a batch-hard triplet loss (margin 0.3) on both features")
    g.add_argument("--sim-norm", choices=("dot", "softmax"), default="dot",
                   help="non-local affinity: divide by N as Eq. 12 (dot) or softmax (embedded Gaussian)")
    g.add_argument("--neck-feat", choices=("before", "after"), default="before",
                   help="test feature taken before or after the BN necks (default: before)")
    g.add_argument("--eval-every", type=int, default=10, help="evaluate every N epochs and at the end (default: 10)")
    g.add_argument("--eval-before", action="store_true",
                   help="also evaluate the model before training (written as 'untrained' in results.json)")
    g.add_argument("--flip-test", action="store_true", help="average test features with horizontally flipped images")
    return parser.parse_args(argv)


def merge_stage1_args(args: argparse.Namespace, stage1: dict, path: Path) -> argparse.Namespace:
    """Stage-1 properties default to the stage-1 run's values; a conflicting flag is an error."""
    s1 = stage1["args"]
    if args.no_sse is False and s1["no_sse"]:
        args.no_sse = True  # store_true: absence means "inherit"
    for key in STAGE1_PROPERTIES:
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


def set_lr(optimizers: list, factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


def evaluate(model: SCIReID, dataset, args, device) -> dict:
    """The dataset's protocols on rank 0 (other ranks wait at the barrier that follows)."""
    results = evaluate_dataset(model, dataset, tuple(args.img_size), args.batch_size, args.workers, device,
                               flip=args.flip_test)
    model.train()
    return results


def primary_score(results: dict) -> float:
    """best.pt is chosen by the cloth-changing mAP where the dataset has one, else the first setting's."""
    return (results.get("cc") or next(iter(results.values())))["mAP"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir or utils.DEFAULT_OUTPUT_DIR)
    args.output_dir = str(out)
    stage1_path = Path(args.stage1 or out / "stage1.pt")
    args.stage1 = str(stage1_path)
    stage1 = utils.load_checkpoint(stage1_path, "stage1")
    args = merge_stage1_args(args, stage1, stage1_path)
    epochs = 20 if args.dataset == "prcc" else 120
    utils.fill_defaults(args, dict(epochs=epochs, batch_size=64, lr=3.5e-4, weight_decay=5e-4, warmup_epochs=10,
                                   milestones=[40, 70]))
    if args.cal_start is None:
        args.cal_start = 25 if args.epochs >= 50 else args.epochs // 2  # 25 is never reached by short schedules
    if args.batch_size % args.num_instances:
        raise utils.UserError(f"--batch-size {args.batch_size} is not a multiple of --num-instances "
                              f"{args.num_instances}; pick P x K images per batch")

    device, rank, world, log = utils.start_run(args, out, "stage2")

    # data
    dataset = build_dataset(args.dataset, args.root)
    if train_fingerprint(dataset.train) != stage1["train_fingerprint"]:
        raise utils.UserError(f"the training split of {args.dataset} under {args.root} is not the one {stage1_path} "
                              f"was trained on; re-run train_stage1.py on this data")
    log.info("\n%s", dataset.statistics())
    loader = build_train_loader(dataset.train, tuple(args.img_size), args.batch_size, args.num_instances,
                                args.workers, args.seed, distributed=world > 1,
                                persistent_workers=False)  # workers re-seeded each epoch: exact --resume

    # model
    bank = stage1["banks"]["F_id" if args.no_sse else "F_ort"]  # F_ort = F_id without SSE anyway
    # only the image encoder is kept: the text encoder's output is the fixed bank
    model = build_reid_model(utils.args_to_dict(args), dataset.num_train_pids, bank, logger=log).to(device)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.Adam(param_groups(model, args.lr, args.weight_decay))
    optimizers = [optimizer]

    use_cal = not args.no_cal and dataset.has_clothes
    if not args.no_cal and not dataset.has_clothes:
        log.info("%s has no clothes labels: the clothes-adversarial loss is disabled", args.dataset)
    clothes_clf = None
    if use_cal:
        clothes_clf = CosineClothesClassifier(model.feature_dim, dataset.num_train_clothes).to(device)
        optimizer_cc = torch.optim.Adam([{"params": clothes_clf.parameters(), "lr": args.lr, "base_lr": args.lr,
                                          "weight_decay": args.weight_decay}])
        optimizers.append(optimizer_cc)
        pid2clothes = torch.as_tensor(dataset.pid2clothes, device=device)
    id_loss, i2t_loss = CrossEntropyLabelSmooth(LABEL_SMOOTHING), CrossEntropyLabelSmooth(LABEL_SMOOTHING)
    cal_loss, clothes_ce = ClothesAdversarialLoss(CAL_EPSILON), torch.nn.CrossEntropyLoss()
    triplet = TripletLoss(TRIPLET_MARGIN) if args.triplet else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    start_epoch, best, history, results = 0, {"score": -1.0, "epoch": 0}, [], {}
    if args.resume:
        state = utils.load_checkpoint(out / "last.pt", "stage2")
        changed = [k for k in RUN_IDENTITY if state["args"].get(k) != getattr(args, k)]
        if changed:
            raise utils.UserError(f"--resume: {out / 'last.pt'} was written by a run with other "
                                  f"{', '.join('--' + k.replace('_', '-') for k in changed)}; resume with the same "
                                  f"arguments or pick a new --output-dir")
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        if clothes_clf is not None:
            clothes_clf.load_state_dict(state["clothes_classifier"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, history, results = state["epoch"], state["best"], state["history"], state["results"]
        log.info("resumed from %s after epoch %d", out / "last.pt", start_epoch)
    elif args.eval_before and rank == 0:
        evaluation = evaluate(model, dataset, args, device)
        log.info("before training\n%s", format_table(evaluation))
        results["untrained"] = metrics_to_json(evaluation)

    # loop
    stop = utils.StopSignal()
    model.train()
    t_start, final = time.perf_counter(), None
    for epoch in range(start_epoch, args.epochs):
        # everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly
        loader.sampler.set_epoch(epoch)
        loader.generator.manual_seed(args.seed * 1000 + epoch)
        torch.manual_seed(args.seed * 1000 + epoch)
        lr_factor = utils.warmup_multistep(epoch, args.warmup_epochs, WARMUP_FACTOR, args.milestones, LR_DROP)
        set_lr(optimizers, lr_factor)
        cal_on = use_cal and epoch >= args.cal_start
        bar = utils.Progress(len(loader), f"stage2 {epoch + 1}/{args.epochs}", args.log_every, enabled=rank == 0)
        for step, (images, pids, _, clothes) in enumerate(loader, 1):
            images, pids, clothes = images.to(device, non_blocking=True), pids.to(device), clothes.to(device)
            with utils.autocast(device, args.amp):
                outputs = net(images)
                terms = {"id": sum(id_loss(logits, pids) for logits in outputs["logits"]),          # Eq. 17
                         "i2t": i2t_loss(outputs["f_proj"].float() @ model.text_bank.t(), pids)}   # Eq. 19
                if triplet is not None:
                    terms["tri"] = triplet(outputs["f_glob"], pids) + triplet(outputs["f_proj"], pids)
            if cal_on:
                # the clothes classifier learns on detached features (CAL) ...
                clo = clothes_ce(clothes_clf(outputs["bn_feat"].detach()), clothes)
                optimizer_cc.zero_grad(set_to_none=True)
                clo.backward()
                if world > 1:
                    for p in clothes_clf.parameters():
                        dist.all_reduce(p.grad)
                        p.grad /= world
                optimizer_cc.step()
                # ... and the backbone is pushed to make clothes of one identity indistinguishable (Eq. 18)
                adv_logits = clothes_clf(outputs["bn_feat"], detach_weight=True)
                terms["cal"] = cal_loss(adv_logits, clothes, pid2clothes[pids])
            loss = sum(terms.values())  # Eq. 20, all weights 1
            if not torch.isfinite(loss):
                raise utils.TrainingStopped(
                    f"non-finite stage-2 loss at epoch {epoch + 1} step {step}; {out / 'last.pt'} keeps the last "
                    f"good epoch (try a lower --lr, or drop --amp)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            values = {k: v.item() for k, v in terms.items()}
            if cal_on:
                values["clo"] = clo.item()
            bar.update(step, len(images) * world, values | {"lr": optimizer.param_groups[0]["lr"]})
            if stop.received:
                break
        if stop.received:
            log.warning("%s received during epoch %d: stopped; %s holds epoch %d, continue with --resume",
                        stop.received, epoch + 1, out / "last.pt", epoch)
            utils.cleanup_distributed()
            return 130

        record = {"epoch": epoch + 1, "lr_factor": lr_factor, "images_per_s": round(bar.images_per_second, 1),
                  **{k: round(v, 6) for k, v in values.items()}}
        last_epoch = epoch + 1 == args.epochs
        if rank == 0 and (last_epoch or (epoch + 1) % args.eval_every == 0):
            evaluation = evaluate(model, dataset, args, device)
            log.info("epoch %d\n%s", epoch + 1, format_table(evaluation))
            record["metrics"] = final = metrics_to_json(evaluation)
            if primary_score(final) > best["score"]:
                best = {"score": primary_score(final), "epoch": epoch + 1}
                utils.save_checkpoint(checkpoint(model, args, dataset, epoch + 1, final), out / "best.pt")
        if rank == 0:
            history.append(record)
            utils.append_jsonl(out / "metrics_stage2.jsonl", record)
            state = checkpoint(model, args, dataset, epoch + 1, final)
            state.update(optimizers=[o.state_dict() for o in optimizers], scaler=scaler.state_dict(), best=best,
                         history=history, results=results,
                         clothes_classifier=clothes_clf.state_dict() if clothes_clf is not None else {})
            utils.save_checkpoint(state, out / "last.pt")
        utils.barrier()
    stop.restore()

    if rank == 0:
        if final is None:  # resumed after the last epoch had already been evaluated
            final = history[-1]["metrics"]
        results.update(metrics=final, best_epoch=best["epoch"],
                       train_seconds=round(time.perf_counter() - t_start, 1),
                       images_per_second=[h["images_per_s"] for h in history])
        utils.write_json(out / "results.json", results)
        log.info("wrote %s, %s and %s", out / "last.pt", out / "best.pt", out / "results.json")
    utils.cleanup_distributed()
    return 0


def checkpoint(model: SCIReID, args, dataset, epoch: int, metrics: dict | None) -> dict:
    """What evaluate.py needs to rebuild and test the model with no other file."""
    return {"kind": "stage2", "epoch": epoch, "args": utils.args_to_dict(args), "model": model.state_dict(),
            "num_classes": dataset.num_train_pids, "metrics": metrics}


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
