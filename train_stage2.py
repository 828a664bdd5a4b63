"""Stage 2 of SCI (SIM, METHOD.md section 4): train the CLIP image encoder, SIM, the BN necks and the
identity classifiers with L_id + L_cal + L_i2tce (Eq. 17-20), guided by stage 1's fixed text bank.
Trains any method of registry.METHODS (--method); one without stage 1 needs no stage1.pt.
Writes OUTPUT_DIR/last.pt (every epoch), best.pt and results.json.

    python train_stage2.py                       # continues the run of train_stage1.py
    python train_stage2.py --stage1 runs/ltcc/stage1.pt --output-dir runs/ltcc
    python train_stage2.py --method bnneck --dataset ltcc --root /data   # a method without stage 1
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
from torch.nn.parallel import DistributedDataParallel

import config as cfg  # as cfg: train() calls its ModelConfig `config`
import training
import utils
from datasets import build_dataset, train_fingerprint
from evaluate import evaluate_dataset, format_table, metrics_to_json
from loaders import build_train_loader
from masks import mask_source
from losses import total_loss
from models import ModelConfig, clip_logit_scale
from registry import METHODS, build_model, method_of

LR_DROP = 0.1  # METHOD.md section 4: x0.1 at each milestone
# stage 2 takes these from stage1.pt: --dataset and --arch may repeat them, a different value is an error
STAGE1_CHOICES = ("dataset", "arch")
# ... and these describe the stage-1 prompts and backbone, which stage 2 has no flag for
STAGE1_PROPERTIES = ("n_ctx", "ortho", "no_sse", "clothes_prompt", "lambda_id", "lambda_clo", "vit_stride", "cosine_sim")
OLDER_STAGE1 = {"clothes_prompt": "identity", "cosine_sim": False}  # properties stage1.pt files before them lack
# recipe values that runs saved before them lack: what those runs trained with (CLIP-ReID's)
OLDER_RUN = {"tri_start": 0, "bias_lr_factor": 2.0, "schedule_from": 1, "augmentation": "clip-reid"}
RESUME_KEYS = ("model", "optimizers", "scaler", "best", "history", "results")  # what last.pt holds (and "loss")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg.add_common_args(parser, "stage2")
    cfg.add_stage2_args(parser)
    args = parser.parse_args(argv)
    args.given = cfg.given_flags(parser, argv)  # --resume checks these against the saved run
    return args


def merge_stage1_args(args: argparse.Namespace, stage1: dict, path: Path) -> argparse.Namespace:
    """Stage-1 properties default to the stage-1 run's values; a conflicting flag is an error."""
    s1 = stage1["args"]
    for key in STAGE1_PROPERTIES:
        setattr(args, key, s1.get(key, OLDER_STAGE1[key]) if key in OLDER_STAGE1 else s1[key])
    if args.cosine_sim:  # Eq. 19 takes stage 1's s(.,.): cosine times the scale stage 1 used
        args.i2t_logit_scale = stage1.get("logit_scale") or clip_logit_scale(s1["arch"], s1["weights"], s1["img_size"],
                                                                                  s1["seed"])
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
    if args.masks is None:  # the part masks stage 1 read (CCAF's), unless given
        args.masks = s1.get("masks")
    return args


def evaluate(model: torch.nn.Module, dataset, args, device, world: int) -> dict:
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


def resolve_args(args: argparse.Namespace, resumed: bool) -> tuple[argparse.Namespace, dict | None]:
    """The run's settings and stage1.pt's contents (None for a method without stage 1). A new run takes
    the stage-1 properties from stage1.pt, then the recipe table for the rest; a resumed one has its own."""
    args.method = getattr(args, "method", "sci")  # runs saved before the registry trained SCI
    stage1 = None
    if method_of(args.method).needs_stage1:
        path = Path(args.stage1 or Path(args.output_dir) / "stage1.pt")
        args.stage1 = str(path)
        stage1 = utils.load_checkpoint(path, "stage1", ("banks", "train_fingerprint", "num_train_pids"))
        if not resumed:
            check_stage1_method(args, stage1, path)
            args = merge_stage1_args(args, stage1, path)
    elif not resumed:
        args = without_stage1(args)
    if resumed:
        for key, value in OLDER_RUN.items():  # a run saved before these recipe values existed
            setattr(args, key, getattr(args, key, value))
        return args, stage1
    implied = method_of(args.method).implies
    unread = sorted(f"--{k.replace('_', '-')}" for k in ((method_flags() - method_flags(args.method)) | set(implied))
                    & args.given)
    if unread:  # another method's option: refused rather than silently ignored
        raise utils.UserError(f"{', '.join(unread)}: method {args.method} does not read them; drop them")
    for key, value in implied.items():  # e.g. clipreid: SCI without SSE, SIM and CAL
        if key in STAGE1_PROPERTIES and getattr(args, key) != value:  # the implied stage-1 flags are switches
            flag = "--" + key.replace("_", "-")
            raise utils.UserError(f"--method {args.method} trains on a stage-1 run made with {flag}, and {args.stage1} "
                                  f"was made without it; re-run train_stage1.py with {flag}, or pass another --stage1")
        setattr(args, key, value)
    halve_cal = args.cal_start is None
    args = cfg.apply_recipe(args, "stage2")
    if hasattr(method_of(args.method).model, "resolve_args"):  # a method's own defaults (e.g. CSGN's second encoder)
        method_of(args.method).model.resolve_args(args)
    args.loss_weight = cfg.loss_weights(args.loss_weight, method_of(args.method).loss.NAMES,
                                        {"id": cfg.recipe(args.arch, args.dataset)["id_loss_weight"]})
    if halve_cal and args.cal_start is not None:  # the recipe's epoch is never reached by a short schedule: half of it then
        args.cal_start = min(args.cal_start, args.epochs // 2)
    if args.batch_size % args.num_instances:
        raise utils.UserError(f"--batch-size {args.batch_size} is not a multiple of --num-instances "
                              f"{args.num_instances}; pick P x K images per batch")
    return args, stage1


def check_weights(args: argparse.Namespace, loss: torch.nn.Module) -> None:
    """--loss-weight for a term this run never computes (e.g. cal with --no-cal) is refused, not ignored."""
    absent = sorted(set(args.loss_weight) - loss.active())
    if absent:
        raise utils.UserError(f"--loss-weight {', '.join(absent)}: this run has no such term (its terms: "
                              f"{', '.join(sorted(loss.active()))}; --no-cal, --no-triplet or a dataset without "
                              f"clothes labels leave terms out); drop the weight")


def method_flags(name: str | None = None) -> set[str]:
    """The method-specific flags the model and loss classes of method `name` read (None: of any method)."""
    methods = METHODS.values() if name is None else [method_of(name)]
    return {flag for m in methods for flag in (*m.model.FLAGS, *m.loss.FLAGS)}


def without_stage1(args: argparse.Namespace) -> argparse.Namespace:
    """A method without stage 1: the data and backbone flags' own defaults; no prompt properties."""
    if args.stage1 is not None:
        raise utils.UserError(f"--method {args.method} trains without stage 1; drop --stage1 {args.stage1}")
    args.dataset = args.dataset or "synthetic"
    args.root = args.root or cfg.DEFAULT_DATA_ROOT
    args.arch = args.arch or method_of(args.method).archs[0]
    args.weights = cfg.resolve_weights(args.arch, args.weights)
    for key in STAGE1_PROPERTIES:
        setattr(args, key, None)
    return args


def comparable(key: str, value, saved: dict):
    """A flag typed with --resume in the form last.pt stores it (paths absolute, --loss-weight as weights)."""
    if key in ("root", "stage1") and value is not None:
        return os.path.abspath(value)
    if key == "loss_weight" and isinstance(value, list):
        return cfg.loss_weights(value, method_of(saved.get("method", "sci")).loss.NAMES,
                                {"id": saved.get("loss_weight", {}).get("id", 1.0)})
    return value


def main(argv: list[str] | None = None) -> int:
    return utils.run_training("train_stage2.py", parse_args, train, argv)


def train(args: argparse.Namespace, stop: utils.StopSignal) -> int:
    run = training.Run(args, stop, "stage2", "last.pt", RESUME_KEYS, comparable)
    args, stage1 = resolve_args(run.args, resumed=run.state is not None)
    log = run.open(args)
    device, world = run.device, run.world

    # data
    dataset = build_dataset(args.dataset, args.root)
    if stage1 is not None and train_fingerprint(dataset.train) != stage1["train_fingerprint"]:
        raise utils.UserError(f"the training split of {args.dataset} under {args.root} is not the one {args.stage1} "
                              f"was trained on; re-run train_stage1.py on this data")
    log.info("\n%s", dataset.statistics())
    method = method_of(args.method)
    loader = build_train_loader(dataset.train, tuple(args.img_size), args.batch_size, args.num_instances,
                                args.workers, args.seed, distributed=world > 1,
                                persistent_workers=False,  # workers re-seeded each epoch: exact --resume
                                normalize=(args.pixel_mean, args.pixel_std), masks=part_masks(method, dataset, args),
                                augmentation=args.augmentation)
    stop.check()

    # model and its loss terms (only the image encoder is kept: the text encoder's output is the fixed bank)
    bank = stage2_bank(method, stage1["banks"], args) if stage1 is not None else None
    config = ModelConfig.from_run(utils.args_to_dict(args), dataset.num_train_pids)
    model = build_model(config, bank, args.weights, seed=args.seed, logger=log).to(device)
    loss = method.loss.for_run(model, args, dataset, log).to(device)
    check_weights(args, loss)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer, adversary_optimizer = build_optimizers(model, loss, args)
    amp = training.MixedPrecision(device, args.amp, args.amp_dtype)
    state = RunState(run, model, loss, (optimizer, adversary_optimizer), amp, dataset, config)
    stop.check()
    start_epoch = state.restore()
    if start_epoch >= args.epochs and (run.out / "results.json").is_file():  # --resume of a finished run
        log.info("%s had finished all %d epochs: nothing to do (results.json kept as it is)", run.path, args.epochs)
        run.close()
        return 0

    # loop
    training.note_short_schedule(log, args, [args.lr * schedule(e, args) for e in range(1, args.epochs + 1)])
    model.train()
    t_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        # everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly
        loader.sampler.set_epoch(epoch)
        loader.generator.manual_seed(utils.epoch_seed(args.seed, epoch))
        torch.manual_seed(utils.epoch_seed(args.seed, epoch))
        lr_factor = schedule(epoch + 1, args)  # epochs counted from 1, as CLIP-ReID steps its scheduler
        training.set_lr(optimizer, lr_factor)
        bar = train_one_epoch(net, loader, loss, optimizer, adversary_optimizer, amp, epoch, args, stop, run.where,
                              world)
        if bar is None:
            return stop.report(log)
        record = run.record(epoch, bar, amp, lr=args.lr * lr_factor, lr_factor=lr_factor)
        state.save(epoch + 1)  # before the evaluation, so no error there can lose the training
        if state.due(epoch + 1):
            state.evaluate(record)
            state.save(epoch + 1)  # again, with the metrics and best
        run.log_epoch(record)
        if run.stopped():
            return stop.report(log)
    state.finish(time.perf_counter() - t_start)
    run.close()
    return 0


def stage2_bank(method, banks: dict, args: argparse.Namespace) -> torch.Tensor:
    """The text bank stage 2 keeps: SCI's F_ort (F_id without SSE, where they are equal), or the rows a
    method with its own stage 1 names (e.g. CCAF's F_id and F_outfit)."""
    if method.prompts is not None:
        return method.prompts.stage2_bank(banks)
    return banks["F_id" if args.no_sse else "F_ort"]


def check_stage1_method(args: argparse.Namespace, stage1: dict, path: Path) -> None:
    """A method with its own stage 1 trains on a stage1.pt of that method; SCI and CLIP-ReID on SCI's."""
    made = stage1["args"].get("method", "sci")  # stage1.pt files before --method were SCI's
    needs = args.method if method_of(args.method).prompts is not None else "sci"
    if (made if method_of(made).prompts is not None else "sci") != needs:
        raise utils.UserError(f"--method {args.method} trains on a stage-1 run of train_stage1.py --method {needs}, "
                              f"and {path} was made with --method {made}; re-run train_stage1.py --method {needs}, or "
                              f"pass another --stage1")


def part_masks(method, dataset, args: argparse.Namespace):
    """The masks.MaskSource of a method that trains on part masks, None for the others."""
    if "mask" not in method.extras:
        if args.masks is not None:
            raise utils.UserError(f"--masks {args.masks}: method {args.method} does not train on part masks; drop it")
        return None
    source = mask_source(dataset, args.masks)
    if source is None:
        raise utils.UserError(f"method {args.method} trains on part masks, and {args.dataset} has none of its own; "
                              f"pass --masks DIR (SCHP label PNGs, see masks.py)")
    return source


def schedule(epoch: int, args: argparse.Namespace) -> float:
    """The learning-rate factor of epoch `epoch` (from 1): warm-up and multi-step drops (CLIP-ReID's, CSSC's)."""
    # the recipe's schedule_from: CLIP-ReID's scheduler reads the epoch's number (1 in the first), CSSC's the
    # epochs done (0 in the first), so CSSC's rate at epoch e is CLIP-ReID's formula at e - 1
    return training.warmup_multistep(epoch - 1 + args.schedule_from, args.warmup_epochs, args.warmup_factor,
                                     args.milestones, LR_DROP)


def build_optimizers(model: torch.nn.Module, loss: torch.nn.Module, args: argparse.Namespace
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """Adam over the model's and the loss terms' parameters (but the adversary's), and the adversary's
    own Adam at a constant rate (CAL's clothes classifier: CAL decays only the main optimizer)."""
    named = [*model.named_parameters(), *loss.main_parameters()]
    optimizer = torch.optim.Adam(training.param_groups(named, args.lr, args.weight_decay, args.bias_lr_factor))
    if loss.adversary is None:
        return optimizer, None
    return optimizer, torch.optim.Adam(loss.adversary.parameters(), lr=args.clothes_lr, weight_decay=args.weight_decay)


class RunState:
    """What a stage-2 run keeps beyond its loop: the states last.pt holds, the evaluations (when they
    are due, the best epoch and best.pt, results.json)."""

    def __init__(self, run: training.Run, model: torch.nn.Module, loss: torch.nn.Module,
                 optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer | None], amp: training.MixedPrecision,
                 dataset, config: ModelConfig):
        self.run, self.args, self.model, self.loss, self.optimizers, self.amp = run, run.args, model, loss, optimizers, amp
        self.dataset, self.config = dataset, config
        self.best, self.results, self.final = {"score": -1.0, "epoch": 0}, {}, None

    def due(self, epochs_done: int) -> bool:
        return epochs_done == self.args.epochs or epochs_done % self.args.eval_every == 0

    def evaluate(self, record: dict) -> None:
        """The protocols after epoch record["epoch"], into the record; best.pt when the score improves."""
        evaluation = evaluate(self.model, self.dataset, self.args, self.run.device, self.run.world)  # every rank
        self.run.log.info("epoch %d\n%s", record["epoch"], format_table(evaluation))
        record["metrics"] = self.final = metrics_to_json(evaluation)
        if primary_score(self.final) > self.best["score"]:
            self.best = {"score": primary_score(self.final), "epoch": record["epoch"]}
            if self.run.rank == 0:
                utils.save_checkpoint(checkpoint(self.model, self.args, self.config, record["epoch"], self.final),
                                      self.run.out / "best.pt")

    def save(self, epochs_done: int) -> None:
        """last.pt: the model's checkpoint and everything --resume needs to go on exactly."""
        state = checkpoint(self.model, self.args, self.config, epochs_done, self.final)
        state.update(loss=self.loss.state_dict(), optimizers=[o.state_dict() for o in self.optimizers if o],
                     scaler=self.amp.state_dict(), best=self.best, history=self.run.history, results=self.results)
        self.run.save(state, epochs_done)

    def restore(self) -> int:
        """--resume: every state from last.pt, and an evaluation a stop interrupted; a new run with
        --eval-before evaluates the untrained model. Returns the epochs done."""
        run, state = self.run, self.run.state
        if state is None:
            if self.args.eval_before:
                evaluation = evaluate(self.model, self.dataset, self.args, run.device, run.world)
                run.log.info("before training\n%s", format_table(evaluation))
                self.results["untrained"] = metrics_to_json(evaluation)
                run.board.log_epoch({"epoch": 0, "metrics": self.results["untrained"]})
            return 0
        self.model.load_state_dict(state["model"])
        # last.pt of the version before the registry kept CAL's classifier as "clothes_classifier"
        old = {f"adversary.{k}": v for k, v in state.get("clothes_classifier", {}).items()}
        self.loss.load_state_dict(state.get("loss", old))
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        self.amp.load_state_dict(state["scaler"])
        self.best, self.results, self.final = state["best"], state["results"], state.get("metrics")
        start_epoch = run.resume()
        if run.history and self.due(start_epoch) and "metrics" not in run.history[-1]:
            run.log.info("epoch %d was trained but its evaluation did not finish: evaluating it now", start_epoch)
            self.evaluate(run.history[-1])
            self.save(start_epoch)
            run.rewrite_metrics()
        return start_epoch

    def finish(self, seconds: float) -> None:
        """results.json: the last evaluation, the best epoch, time and throughput."""
        run = self.run
        if run.rank != 0:
            return
        self.final = self.final or run.history[-1]["metrics"]  # resumed after the last epoch had been evaluated
        self.results.update(metrics=self.final, best_epoch=self.best["epoch"], train_seconds=round(seconds, 1),
                            images_per_second=[h["images_per_s"] for h in run.history])
        utils.write_json(run.out / "results.json", self.results)
        run.log.info("wrote %s, %s and %s", run.path, run.out / "best.pt", run.out / "results.json")


def train_one_epoch(net: torch.nn.Module, loader, loss: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    adversary_optimizer: torch.optim.Optimizer | None, amp: training.MixedPrecision, epoch: int,
                    args: argparse.Namespace, stop: utils.StopSignal, where: str, world: int) -> utils.Progress | None:
    """One epoch of stage 2; returns its progress record (epoch means, images/s), None when stopped."""
    rank = dist.get_rank() if world > 1 else 0
    device = next(net.parameters()).device
    shared = [p for _, p in loss.main_parameters() if p.requires_grad]  # outside DDP: averaged by hand
    bar = utils.Progress(len(loader), f"stage2 {epoch + 1}/{args.epochs}", args.log_every, enabled=rank == 0)
    for step, (images, pids, _, clothes, *extras) in enumerate(loader, 1):
        images = images.to(device, non_blocking=True)
        extras = {k: v.to(device, non_blocking=True) for k, v in (extras[0] if extras else {}).items()}  # e.g. masks
        batch = {"pids": pids.to(device), "clothes": clothes.to(device), **extras}
        at = f"epoch {epoch + 1} step {step}; {where}"
        with amp.autocast():
            outputs = net(images, **extras)
        # an adversary (CAL's clothes classifier) learns first, on detached features
        extra = step_adversary(loss, adversary_optimizer, outputs, batch, epoch, amp.scaling, at)
        with amp.autocast():
            terms = loss(outputs, batch, epoch)
        amp.step(total_loss(terms, args.loss_weight), optimizer, f"stage-2 loss at {at}",  # Eq. 20
                 shared=shared)
        bar.update(step, len(images) * world, {k: v.item() for k, v in terms.items()} | extra,
                   optimizer.param_groups[0]["lr"])
        if stop.requested(device):
            return None
    return bar


def step_adversary(loss: torch.nn.Module, optimizer: torch.optim.Optimizer | None, outputs: dict, batch: dict,
                   epoch: int, scaling: bool, where: str) -> dict[str, float]:
    """One step of the loss terms' adversary on its own loss; returns that loss by name. Under DDP the
    gradients are averaged first, so every rank takes the same decision. A non-finite gradient stops
    the run in float32 and bfloat16, and skips this step under float16 (the main step skips too)."""
    own = loss.adversary_loss(outputs, batch, epoch)
    if not own:
        return {}
    optimizer.zero_grad(set_to_none=True)
    sum(own.values()).backward()
    training.average_gradients(list(loss.adversary.parameters()))
    grads = [p.grad for p in loss.adversary.parameters()]
    if all(bool(torch.isfinite(g).all()) for g in grads):
        optimizer.step()
    elif not scaling:
        raise utils.TrainingStopped(f"non-finite {', '.join(own)} loss at {where} (try a lower --lr, or drop --amp)")
    return {name: value.item() for name, value in own.items()}


def checkpoint(model: torch.nn.Module, args, config: ModelConfig, epoch: int, metrics: dict | None) -> dict:
    """What evaluate.py needs to rebuild and test the model with no other file: `config` rebuilds it."""
    return {"kind": "stage2", "epoch": epoch, "args": utils.args_to_dict(args), "model": model.state_dict(),
            "config": asdict(config), "num_classes": config.num_classes, "metrics": metrics}


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
