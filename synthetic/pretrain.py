"""Pretrain a small CLIP on the synthetic world's captioned people (METHOD.md section 11), so that
SCI's stage 1 has a text space that knows what clothes are.

The corpus (synthetic.generate_corpus) holds people who are in neither the benchmark's training
nor its test split, each image with three captions (full, "... person", "the ... clothes"). The
model's image encoder is a tiny preset of either family (`--arch tiny`: ModifiedResNet, `--arch
tiny-vit`: ViT), its text encoder a small transformer (`--text-width`, `--text-layers`), trained from
scratch with CLIP's symmetric contrastive loss and a learnt temperature, then checked on held-out
corpus people: zero-shot classification of every captioned attribute (prompted with the
attribute's words) beside its chance level and kappa, SCI's prompt shapes with words (the template
test), and caption->image retrieval. The checkpoint is a plain state dict with OpenAI's keys: `clip.load(PATH)` and every
script's `--weights PATH` read it as they read RN50.pt.

    python -m synthetic.pretrain                    # tiny ResNet -> data/SYNTH_CORPUS/clip_tiny.pt
    python -m synthetic.pretrain --arch tiny-vit    # the ViT
    python -m synthetic.pretrain --seed 1           # another pretraining draw -> clip_tiny_seed1.pt
    python train_stage1.py --arch tiny --weights data/SYNTH_CORPUS/clip_tiny.pt --img-size 64 32

The checkpoint is cached beside the corpus with a JSON of its parameters and report, and rebuilt
only when a parameter changes (a changed corpus replaces the whole folder, checkpoints included).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import clip
import config
import synthetic
import utils
from losses import clip_contrastive_loss
from models import TINY_FAMILIES as FAMILIES  # --arch name -> clip.tiny_state_dict family
from models import TextEncoder

PRETRAIN_VERSION = 3  # bump when training changes: cached checkpoints are rebuilt
REPORT_VERSION = 4    # bump when the report changes: a cached checkpoint's report is recomputed, not retrained
MAX_LOGIT_SCALE = 100.0  # CLIP clips its learnt temperature's multiplier here

log = logging.getLogger("pretrain")


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "tiny"
    epochs: int = 16
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: int = 1
    seed: int = 0
    text_width: int = 128  # the text transformer (heads: width // 64, OpenAI's rule); the image encoder is
    text_layers: int = 2   # the arch's preset, so that a stage-2 checkpoint rebuilds from --arch alone

    def __post_init__(self):
        checks = [(self.arch in FAMILIES, f"arch must be one of {', '.join(FAMILIES)}"),
                  (self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 2, "batch_size must be >= 2"),
                  (self.lr > 0, "lr must be > 0"), (self.text_width % 64 == 0 and self.text_width >= 64,
                                                     "text_width must be a multiple of 64"),
                  (self.text_layers >= 1, "text_layers must be >= 1"), (self.weight_decay >= 0, "weight_decay must be >= 0"),
                  (0 <= self.warmup_epochs < self.epochs or self.epochs == 1, "warmup_epochs must be < epochs")]
        for ok, msg in checks:
            if not ok:
                raise utils.UserError(f"pretrain: {msg} (got {self})")


# ----------------------------------------------------------------------------- data

def _to_input(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] with CLIP's statistics (OpenAI's convention)."""
    x = torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(clip.MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(clip.STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to `shift` pixels (reflect padding), per image.
    Captions never say left or right, so a flip keeps every caption true."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def tokenize(captions: list[str]) -> torch.Tensor:
    """[N, L] token ids, cut after the longest caption's end token (L <= 77): the causal text
    transformer's feature at the end token does not depend on the padding after it."""
    tokens = clip.tokenize(captions)
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :length]


def encode_text(model: clip.model.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's text feature of token ids cut to L <= context length (models.TextEncoder over their
    embeddings): the same numbers as the full 77-token pass, in a fraction of the time. [B, L] -> [B, D]."""
    return TextEncoder(model)(model.token_embedding(tokens), tokens)


# ----------------------------------------------------------------------------- training

def build_model(cfg: PretrainConfig) -> clip.model.CLIP:
    """The tiny preset of cfg.arch's family (clip.tiny_state_dict), randomly initialised as OpenAI
    initialises CLIP: its image encoder as it is, so that a stage-2 checkpoint (which keeps only the
    image encoder) rebuilds from --arch alone, and a text encoder of cfg's width and depth."""
    return clip.build_model(clip.tiny_state_dict(FAMILIES[cfg.arch], seed=cfg.seed, transformer_width=cfg.text_width,
                                                  transformer_heads=cfg.text_width // 64,
                                                  transformer_layers=cfg.text_layers))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # CLIP's recipe: no weight decay on gains, biases, embeddings' scale and the temperature
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name == "logit_scale" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# how often each kind of caption (synthetic.CAPTION_KINDS) is an image's caption in an epoch: the
# full descriptions most, and the prompts' own shapes ("... person.", "the ... clothes") often enough
# that "person" and "clothes" mean what SCI's prompts ask of them
CAPTION_MIX = {"full": 0.4, "person": 0.2, "clothes": 0.4}


def train_clip(images: np.ndarray, captions: list[dict[str, str]], cfg: PretrainConfig, device: torch.device,
               stop: utils.StopSignal | None = None) -> clip.model.CLIP:
    """Train the tiny CLIP of cfg.arch on images and their captions (one of each CAPTION_MIX kind per
    image, a kind drawn per image and epoch); returns it in eval mode on the CPU."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device).train()
    kinds = list(CAPTION_MIX)
    tokens = tokenize([c[k] for c in captions for k in kinds]).view(len(captions), len(kinds), -1).to(device)
    mix = torch.tensor([CAPTION_MIX[k] for k in kinds])
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=True)  # one kernel for all parameters: the step a sixth faster on CPU
    steps = len(captions) // cfg.batch_size
    if steps < 1:
        raise utils.UserError(f"pretrain: {len(captions)} training pairs are fewer than one batch of "
                              f"{cfg.batch_size}; use a larger corpus or a smaller --batch-size")
    total, warmup = cfg.epochs * steps, cfg.warmup_epochs * steps
    generator = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(captions), generator=generator)
        kind = torch.multinomial(mix, len(captions), replacement=True, generator=generator).to(device)
        bar = utils.Progress(steps, f"pretrain {epoch + 1}/{cfg.epochs}", every=max(steps // 2, 1))
        for step in range(steps):
            it = epoch * steps + step  # linear warm-up, then cosine to 0 (CLIP's schedule), per step
            lr = cfg.lr * (it + 1) / warmup if it < warmup else \
                cfg.lr * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = _augment(_to_input(images[idx.numpy()], device), generator)
            scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
            rows = idx.to(device)
            loss = clip_contrastive_loss(model.encode_image(x), encode_text(model, tokens[rows, kind[rows]]), scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(step + 1, len(idx), {"loss": loss.item(), "scale": scale.item()}, lr)
            if stop is not None:
                stop.check()
    return model.cpu().eval()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def image_features(model: clip.model.CLIP, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """L2-normalised image features [N, D] of uint8 [N, H, W, 3] images (no augmentation)."""
    device = next(model.parameters()).device
    feats = [model.encode_image(_to_input(images[i:i + batch], device)) for i in range(0, len(images), batch)]
    return F.normalize(torch.cat(feats).float(), dim=-1).cpu()


@torch.no_grad()
def text_features(model: clip.model.CLIP, texts: list[str], batch: int = 256) -> torch.Tensor:
    """L2-normalised text features [N, D]."""
    device = next(model.parameters()).device
    tokens = tokenize(texts).to(device)
    feats = [encode_text(model, tokens[i:i + batch]) for i in range(0, len(texts), batch)]
    return F.normalize(torch.cat(feats).float(), dim=-1).cpu()


def zero_shot(model: clip.model.CLIP, feats: torch.Tensor, records: list[dict]) -> dict[str, dict[str, float]]:
    """Zero-shot classification of every captioned attribute, CLIP-style: each image gets the value
    whose prompt (synthetic.zero_shot_prompts) is nearest. Reported as balanced accuracy (%, the mean
    of the per-value recalls over the values present), beside chance, what a uniform guess over all K
    prompts scores (100 / K: every value's recall is 1 / K, however many values occur), and Cohen's
    kappa = (accuracy - chance) / (100 - chance), 0 at chance and 1 when perfect. Balanced, because a
    prompt-based classifier knows no priors: plain accuracy would compare it with a majority guess it
    cannot make. Images without the attribute (bag colour without a bag) are left out."""
    out = {}
    for attribute in synthetic.ZERO_SHOT_ATTRIBUTES:
        prompts = synthetic.zero_shot_prompts(attribute)
        values = list(prompts)
        rows = [i for i, r in enumerate(records) if r["attributes"].get(attribute) in prompts]
        if not rows:
            continue
        truth = torch.tensor([values.index(records[i]["attributes"][attribute]) for i in rows])
        guess = (feats[rows] @ text_features(model, [prompts[v] for v in values]).t()).argmax(dim=1)
        recall = torch.stack([(guess[truth == k] == k).float().mean() for k in truth.unique()])
        accuracy, chance = 100 * recall.mean().item(), 100 / len(values)
        out[attribute] = {"accuracy": round(accuracy, 2), "chance": round(chance, 2),
                          "kappa": round((accuracy - chance) / (100 - chance), 3)}
    return out


def retrieval(model: clip.model.CLIP, feats: torch.Tensor, records: list[dict]) -> dict[str, float]:
    """Caption->image R@1 and R@5 (%): each caption ranks all images; a hit is an image of the same
    person in the same outfit (the caption describes every such image equally well)."""
    sims = text_features(model, [r["caption"] for r in records]) @ feats.t()  # [N captions, N images]
    key = torch.tensor([r["pid"] * 1000 + r["outfit"] for r in records])
    top = sims.topk(min(5, len(records)), dim=1).indices  # [N, 5]
    hits = key[top] == key[:, None]
    return {"R1": round(100 * hits[:, 0].float().mean().item(), 2),
            "R5": round(100 * hits.any(dim=1).float().mean().item(), 2)}


def template_test(model: clip.model.CLIP, feats: torch.Tensor, records: list[dict]) -> dict[str, dict[str, float]]:
    """SCI's prompt shapes with words (synthetic.template_prompts): R@1 (%) of "A photo of the {outfit
    words} clothes." finding an image of that outfit, and of "A photo of a {trait words} person." finding
    an image of that person in any outfit, one prompt per outfit / person among all held-out images;
    chance is the mean share of the images a hit may be."""
    out = {}
    for kind, key in (("clothes", lambda r: (r["pid"], r["outfit"])), ("person", lambda r: r["pid"])):
        groups: dict = {}
        for i, r in enumerate(records):
            groups.setdefault(key(r), []).append(i)
        prompts = [synthetic.template_prompts(records[rows[0]]["attributes"])[kind] for rows in groups.values()]
        nearest = (text_features(model, prompts) @ feats.t()).argmax(dim=1).tolist()  # [groups]
        hits = [key(records[n]) == k for n, k in zip(nearest, groups)]
        out[kind] = {"r1": round(100 * float(np.mean(hits)), 2),
                     "chance": round(100 * float(np.mean([len(g) for g in groups.values()])) / len(records), 2)}
    return out


def report(model: clip.model.CLIP, images: np.ndarray, records: list[dict]) -> dict:
    held = [i for i, r in enumerate(records) if r["split"] == "held_out"]
    if not held:
        raise utils.UserError("pretrain: the corpus has no held-out people; raise held_out")
    feats = image_features(model, images[held])
    recs = [records[i] for i in held]
    return {"zero_shot": zero_shot(model, feats, recs), "retrieval": retrieval(model, feats, recs),
            "templates": template_test(model, feats, recs), "held_out_images": len(held)}


def format_report(rep: dict) -> str:
    lines = ["| attribute | zero-shot balanced accuracy % | chance % (uniform over the prompts) | kappa |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {v['accuracy']:.1f} | {v['chance']:.1f} | {v['kappa']:.2f} |" for a, v in rep["zero_shot"].items()]
    r = rep["retrieval"]
    lines.append(f"\ncaption->image retrieval on {rep['held_out_images']} held-out images: "
                 f"R@1 {r['R1']:.1f}%, R@5 {r['R5']:.1f}%")
    t = rep["templates"]
    lines.append(f"SCI's prompt shapes with words: \"A photo of the ... clothes.\" finds its outfit R@1 "
                 f"{t['clothes']['r1']:.1f}% (chance {t['clothes']['chance']:.1f}%); \"A photo of a ... person.\" "
                 f"finds its person R@1 {t['person']['r1']:.1f}% (chance {t['person']['chance']:.1f}%)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the cached checkpoint

def checkpoint_paths(corpus_folder: str | Path, cfg: PretrainConfig) -> tuple[Path, Path]:
    """clip_{arch}.pt and its .json; a pretraining seed other than 0 adds _seed{N}, and training
    parameters other than the defaults add 8 hex digits of their digest, so that CLIPs of other
    recipes (e.g. benchmarks/ablation.py --quick's) sit beside the default ones instead of replacing them."""
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("arch", "seed")}
    default = {k: v for k, v in asdict(PretrainConfig()).items() if k not in ("arch", "seed")}
    digest = "" if recipe == default else "_" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    stem = f"clip_{cfg.arch}" + (f"_seed{cfg.seed}" if cfg.seed else "") + digest
    return Path(corpus_folder) / f"{stem}.pt", Path(corpus_folder) / f"{stem}.json"


def pretrained_clip(root: str, corpus: synthetic.CorpusConfig | None = None, cfg: PretrainConfig | None = None,
                    device: torch.device | str = "cpu", stop: utils.StopSignal | None = None) -> tuple[Path, dict]:
    """The pretrained checkpoint for these parameters under root/SYNTH_CORPUS, trained first when
    there is none (or its parameters differ, which is logged). Returns (path, its record: params,
    report and seconds)."""
    corpus, cfg = corpus or synthetic.CorpusConfig(), cfg or PretrainConfig()
    folder = synthetic.generate_corpus(root, corpus)
    ckpt, meta_path = checkpoint_paths(folder, cfg)
    params = {"version": PRETRAIN_VERSION, "train": asdict(cfg), "corpus": {**asdict(corpus), "img_size": list(corpus.img_size)}}
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    if meta is not None and meta.get("params") == params and ckpt.is_file():
        if meta.get("report_version") != REPORT_VERSION:  # the same weights, measured as this version does
            images, records = synthetic.load_corpus(folder)
            model = clip.build_model(torch.load(ckpt, map_location="cpu", weights_only=True)).float().eval()
            meta.update(report(model, images, records), report_version=REPORT_VERSION)
            utils.write_json(meta_path, meta)
        return ckpt, meta
    if meta is not None:
        log.warning("pretrain: retraining %s (its parameters changed)", ckpt)
    device = torch.device(device)
    utils.configure_determinism(device, None)
    images, records = synthetic.load_corpus(folder)
    train = [i for i, r in enumerate(records) if r["split"] == "train"]
    t0 = time.perf_counter()
    log.info("pretrain: %s CLIP on %d image-caption pairs of %d people, %d epochs", cfg.arch, len(train),
             len({records[i]["pid"] for i in train}), cfg.epochs)
    model = train_clip(images[train], [records[i]["captions"] for i in train], cfg, device, stop)
    seconds = round(time.perf_counter() - t0, 1)
    rep = report(model, images, records)
    utils.save_checkpoint(model.state_dict(), ckpt)  # OpenAI's keys, float32
    meta = {"params": params, "checkpoint": str(ckpt), "pretrain_seconds": seconds, **rep,
            "report_version": REPORT_VERSION}
    utils.write_json(meta_path, meta)  # written last: marks a complete checkpoint
    return ckpt, meta


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d, c = PretrainConfig(), synthetic.CorpusConfig()
    p = argparse.ArgumentParser(prog="python -m synthetic.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=config.DEFAULT_DATA_ROOT, help="folder for SYNTH_CORPUS (default: %(default)s)")
    p.add_argument("--arch", choices=tuple(FAMILIES), default=d.arch, help="tiny (ResNet) or tiny-vit (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the captioned corpus (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="image-caption pairs per contrastive step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--text-width", type=int, default=d.text_width,
                   help="width of the text transformer, a multiple of 64 (default: %(default)s)")
    p.add_argument("--text-layers", type=int, default=d.text_layers, help="text transformer layers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the initial weights, the batch order and the caption draws; another seed than 0 "
                        "writes clip_<arch>_seed<N>.pt (default: %(default)s)")
    p.add_argument("--people", type=int, default=c.people, help="corpus people (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where pretraining runs; auto picks cuda when visible (default: cpu)")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PretrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, text_width=args.text_width,
                         text_layers=args.text_layers)
    corpus = synthetic.CorpusConfig(people=args.people)
    ckpt, meta = pretrained_clip(args.root, corpus, cfg, utils.select_device(args.device))
    print(format_report(meta))
    print(f"\n{cfg.arch} CLIP at {ckpt} (pretrained in {meta['pretrain_seconds']:.0f} s); "
          f"use it with --arch {cfg.arch} --weights {ckpt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
