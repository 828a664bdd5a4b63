"""The synthetic world's words and parts: colour names, attributes, captions, zero-shot prompts,
part masks and annotations of the benchmark, and the captioned pretraining corpus."""
import hashlib
import json
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

import synthetic as S
from utils import UserError

TINY = dict(seed=1, num_train_ids=2, num_test_ids=2, outfits=2, cameras=3, img_size=(64, 32))
# Digest of TINY's 98 images (names and bytes) as generator version 3 drew them (patterns a quarter of
# the garment; versions 1-2, before it, had half-and-half stripes and checks): words and parts must not
# change a single image byte.
IMAGES = (98, "5b7b75a8753558a6adad4f81ca7a548bd03149ee14046d3ec18bc2ea4aafcff4")
CORPUS = dict(seed=2, people=10, images_per_person=3, outfits_per_person=2, cameras=3, held_out=0.2)
COLOUR_KEYS = [k for k, v in S.ATTRIBUTE_VALUES.items() if v == S.COLOUR_TERMS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A benchmark with a few more people than TINY, and what the generator drew for each image."""
    cfg = S.SyntheticConfig(**{**TINY, "num_train_ids": 4, "num_test_ids": 4})
    target = S.generate_synthetic(str(tmp_path_factory.mktemp("synth")), cfg, workers=1)
    people, outfits, _, shots = S.benchmark._plan(cfg)
    drawn = {f"{split}/{pid:03d}_{o}_c{c}_{frame:06d}.png": (people[pid], outfits[pid][o - 1])
             for split, pid, o, c, frame in shots}
    return target, drawn


def read_tree(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def random_words(n, seed=0):
    """Attributes of n random people in random outfits, as the generator draws them."""
    return [S.attributes(S.draw._person(np.random.default_rng([seed, 1, i])), S.draw._outfit(np.random.default_rng([seed, 2, i])))
            for i in range(n)]


def tokens(text):
    return re.findall(r"[a-z-]+", text)


def colour_words(text):
    """The colour terms a caption uses ("brown skin" is a skin tone)."""
    return set(tokens(re.sub(r"\w+ skin", "", text))) & set(S.COLOUR_TERMS)


# ---- words ---------------------------------------------------------------------------------

def test_colour_names():
    assert np.allclose(S.srgb_to_lab((255, 255, 255)), (100, 0, 0), atol=0.01)
    assert np.allclose(S.srgb_to_lab((0, 0, 0)), (0, 0, 0), atol=0.01)
    assert np.allclose(S.srgb_to_lab((255, 0, 0)), (53.24, 80.09, 67.20), atol=0.05)  # the textbook value
    named = {(220, 30, 30): "red", (0, 0, 0): "black", (255, 255, 255): "white", (128, 128, 128): "grey",
             (30, 60, 200): "blue", (20, 30, 70): "blue", (120, 170, 220): "blue", (30, 150, 60): "green",
             (250, 220, 30): "yellow", (250, 140, 20): "orange", (130, 40, 170): "purple", (250, 150, 200): "pink",
             (110, 65, 30): "brown", (40, 190, 190): "turquoise", (225, 200, 160): "beige", (120, 20, 30): "red"}
    assert {rgb: S.colour_name(rgb) for rgb in named} == named
    assert [S.colour_name(c) for c in S.SHOES] == ["white", "black", "red", "blue", "yellow", "green", "orange", "purple"]
    assert len(S.COLOUR_TERMS) == len(set(S.COLOUR_TERMS)) == 13


def test_attributes_name_what_was_drawn():
    keys = list(S.ATTRIBUTE_VALUES)
    assert keys == ["hair colour", "hair style", "skin tone", "glasses", "bag", "bag colour", "shoe colour",
                    "top colour", "top pattern", "top pattern colour", "sleeves", "bottom colour", "bottom type",
                    "bottom pattern", "bottom pattern colour"]
    for a in random_words(300):
        assert list(a) == [k for k in keys if k in a]  # ATTRIBUTE_VALUES order
        assert all(a[k] in S.ATTRIBUTE_VALUES[k] for k in a), a
        assert ("bag colour" in a) == (a["bag"] != "no bag") and ("hair colour" in a) == (a["hair style"] != "bald")
        assert ("top pattern colour" in a) == (a["top pattern"] != "plain")
        assert ("bottom pattern colour" in a) == (a["bottom pattern"] != "plain")
    person = S.draw._person(np.random.default_rng(0))
    outfit = S.draw._outfit(np.random.default_rng(0))
    person.update(skin=S.SKIN[2], hair=(220, 30, 30), style="ponytail", glasses=True, bag="backpack",
                  bag_colour=(30, 60, 200), shoes=(245, 245, 245))
    outfit.update(top=(220, 30, 30), top2=(245, 245, 245), top_pattern="vstripes", sleeves="short", bottom=(20, 20, 20),
                  bottom2=(30, 60, 200), bottom_type="skirt", bottom_pattern="checks")
    assert S.attributes(person, outfit) == {
        "hair colour": "red", "hair style": "ponytail", "skin tone": "olive", "glasses": "glasses", "bag": "backpack",
        "bag colour": "blue", "shoe colour": "white", "top colour": "red", "top pattern": "vertically striped",
        "top pattern colour": "white", "sleeves": "short", "bottom colour": "black", "bottom type": "skirt",
        "bottom pattern": "checked", "bottom pattern colour": "blue"}
    for i, rgb in enumerate(S.SKIN):  # the jittered colour names its palette entry
        for seed in range(5):
            person["skin"] = S.draw._jitter(np.random.default_rng(seed), rgb, 8)
            assert S.attributes(person, outfit)["skin tone"] == S.SKIN_TONES[i]


def test_captions_say_only_what_is_there():
    other = {"trousers": {"skirt", "shorts"}, "shorts": {"skirt", "trousers", "pants"}, "skirt": {"trousers", "pants", "shorts"}}
    for n, a in enumerate(random_words(300)):
        text = S.caption(a, np.random.default_rng(n))
        assert text == S.caption(a, np.random.default_rng(n))  # deterministic
        words = tokens(text)
        assert colour_words(text) <= {a[k] for k in COLOUR_KEYS if k in a}, (a, text)
        assert not set(words) & other[a["bottom type"]], (a, text)
        wrong = ("sweater", "long-sleeved", "long sleeves") if a["sleeves"] == "short" else ("t-shirt", "short-sleeved", "short sleeves")
        assert not any(w in text for w in wrong), (a, text)
        if a["glasses"] == "glasses":
            assert "no glasses" not in text, (a, text)
        else:
            assert text.count("glasses") == text.count("no glasses"), (a, text)
        assert ("backpack" in words) <= (a["bag"] == "backpack") and ("shoulder" in words) <= (a["bag"] == "shoulder bag")
        assert all(t == a["skin tone"] for t in re.findall(r"(\w+) skin", text)), (a, text)
        for style in ("bald", "afro", "ponytail", "bun", "spiky"):
            assert (style in words) <= (a["hair style"] == style), (a, text)
        for pattern in ("striped", "checked", "dotted"):
            assert (pattern in words) <= (pattern in (a["top pattern"] + " " + a["bottom pattern"])), (a, text)


def test_captions_name_each_value_in_its_place():
    """Changing one colour changes the caption only where that colour is said, and the top and
    bottom colours are nearly always said: the words, not their positions, carry the meaning."""
    said = 0
    for n, a in enumerate(random_words(200, seed=1)):
        for key in ("top colour", "bottom colour", "shoe colour"):
            new = next(c for c in S.COLOUR_TERMS if c not in a.values())
            before, after = tokens(S.caption(a, np.random.default_rng(n))), tokens(S.caption({**a, key: new}, np.random.default_rng(n)))
            assert len(before) == len(after)
            changed = [(x, y) for x, y in zip(before, after) if x != y and {x, y} != {"a", "an"}]
            assert all(x == a[key] and y == new for x, y in changed), (a, key, before, after)
            said += key == "top colour" and bool(changed)
    assert said > 0.8 * 200


def test_captions_vary():
    a = {"hair colour": "black", "hair style": "short", "skin tone": "tan", "glasses": "glasses", "bag": "backpack",
         "bag colour": "red", "shoe colour": "white", "top colour": "green", "top pattern": "striped", "sleeves": "long",
         "bottom colour": "blue", "bottom type": "trousers", "bottom pattern": "plain"}
    texts = [S.caption(a, np.random.default_rng(n)) for n in range(400)]
    assert len(set(texts)) > 300
    assert len({" ".join(t.split()[:2]) for t in texts}) >= 4  # templates and subjects
    for words in ("wearing", "dressed in", " in ", "pants", "trousers", "a passer-by", "a pedestrian", "someone",
                  "they have", "a photo of", " on ", "sweater", "shirt", "long-sleeved", "with long sleeves"):
        assert any(words in t for t in texts), words
    first = [t.index("green") < t.index("blue") for t in texts if "green" in t and "blue" in t]
    assert 0.2 < np.mean(first) < 0.8  # clause order is shuffled
    assert all(t.endswith(".") for t in texts)
    few = min(texts, key=lambda t: len(tokens(t)))
    assert len(tokens(few)) >= 4  # attributes are left out, never all of them


def test_zero_shot_prompts():
    assert S.zero_shot_prompts("hair colour")["red"] == "a photo of a person with red hair"
    assert S.zero_shot_prompts("top colour")["orange"] == "a photo of the orange top clothes"
    assert S.zero_shot_prompts("bottom type")["skirt"] == "a photo of the skirt clothes"
    assert S.zero_shot_prompts("sleeves")["long"] == "a photo of the long-sleeved top clothes"
    assert S.zero_shot_prompts("shoe colour")["red"] == "a photo of a person wearing red shoes"
    assert S.zero_shot_prompts("glasses") == {"glasses": "a photo of a person with glasses",
                                              "no glasses": "a photo of a person with no glasses"}
    assert set(S.ATTRIBUTE_VALUES) - set(S.ZERO_SHOT_ATTRIBUTES) == {"top pattern colour", "bottom pattern colour"}
    for attribute in S.ZERO_SHOT_ATTRIBUTES:
        values = S.ATTRIBUTE_VALUES[attribute]
        prompts = S.zero_shot_prompts(attribute)
        assert list(prompts) == list(values) and len(set(prompts.values())) == len(values)
        frames = set()
        for value, text in prompts.items():  # one frame, differing only in the value's words (and a/an)
            words = re.split(r"[ -]", text)  # long-sleeved: the value "long" and the frame "sleeved"
            if attribute in S.CLOTHES_ATTRIBUTES:  # the clothes prompt's shape
                assert words[:4] == "a photo of the".split() and words[-1] == "clothes" and "person" not in words
            else:  # the identity prompt's
                assert words[:5] == "a photo of a person".split() and "clothes" not in words
            assert set(value.split()) <= set(words[4:]), text
            frames.add(tuple(w for w in words if w not in value.split() + ["a", "an"]))
        assert len(frames) == 1 or attribute == "hair style", (attribute, frames)  # styles are whole phrases
    for attribute in ("hat", "top pattern colour"):
        with pytest.raises(UserError, match=f"no zero-shot prompts for '{attribute}'"):
            S.zero_shot_prompts(attribute)


CLOTHES_WORDS = {"top", "shirt", "sweater", "t-shirt", "trousers", "pants", "shorts", "skirt", "bottoms", "sleeves",
                 "long-sleeved", "short-sleeved", "striped", "checked", "dotted", "plain", "vertically"}
PERSON_WORDS = {"hair", "skin", "glasses", "shoes", "bag", "backpack", "ponytail", "afro", "bald", "bun"}


def test_person_and_clothes_words_are_kept_apart():
    """"person" names who someone is (hair, skin, glasses, bag, shoes) and "the ... clothes" what they
    wear: a caption with "person" never names a clothes attribute, a clothes caption never a person
    trait, and the full description never says "person"."""
    assert set(S.PERSON_ATTRIBUTES) | set(S.CLOTHES_ATTRIBUTES) == set(S.ATTRIBUTE_VALUES)
    assert not set(S.PERSON_ATTRIBUTES) & set(S.CLOTHES_ATTRIBUTES)
    shapes = {"person": 0, "clothes": 0}
    for n, a in enumerate(random_words(300, seed=4)):
        person = S.person_caption(a, np.random.default_rng(n))
        clothes = S.clothes_caption(a, np.random.default_rng(n))
        full = S.caption(a, np.random.default_rng(n))
        words = {"person": set(re.findall(r"[a-z]+", person)), "clothes": set(re.findall(r"[a-z]+", clothes))}  # red-striped: red, striped
        assert "person" in words["person"] and "clothes" not in words["person"], person
        assert not words["person"] & (CLOTHES_WORDS | {"t", "sleeved", "vertically"}), (a, person)
        person_colours = {a[k] for k in ("hair colour", "shoe colour", "bag colour") if k in a}
        assert words["person"] & set(S.COLOUR_TERMS) <= person_colours | ({"brown"} if a["skin tone"] == "brown" else set()), (a, person)
        assert re.search(r"\bthe\b.*\bclothes\b", clothes) and "person" not in words["clothes"], clothes
        worn_colours = {a[k] for k in ("top colour", "bottom colour", "top pattern colour", "bottom pattern colour") if k in a}
        assert not words["clothes"] & (PERSON_WORDS | {"haired", "skinned", "shoed"}), (a, clothes)
        assert words["clothes"] & set(S.COLOUR_TERMS) <= worn_colours, (a, clothes)
        assert "person" not in tokens(full), full
        shapes["person"] += person.startswith("a photo of a ") and person.endswith(" person.")
        shapes["clothes"] += clothes.startswith("a photo of the ") and clothes.endswith(" clothes.")
    assert all(v > 20 for v in shapes.values()), shapes  # the prompts' own shapes are among them


def test_template_prompts():
    a = {"hair colour": "black", "hair style": "short", "skin tone": "olive", "glasses": "glasses", "bag": "backpack",
         "bag colour": "red", "shoe colour": "white", "top colour": "green", "top pattern": "striped", "sleeves": "long",
         "bottom colour": "blue", "bottom type": "skirt", "bottom pattern": "plain"}
    assert S.template_prompts(a) == {"clothes": "A photo of the green top and blue skirt clothes.",
                                     "person": "A photo of an olive-skinned black-haired white-shoed person."}


# ---- the benchmark's parts and annotations ---------------------------------------------

def test_benchmark_images_unchanged_by_words_and_parts(tmp_path):
    target = S.generate_synthetic(str(tmp_path), S.SyntheticConfig(**TINY), workers=1)
    h, n = hashlib.sha256(), 0
    for split in ("train", "query", "test"):
        for name in sorted(os.listdir(os.path.join(target, split))):
            h.update(f"{split}/{name}".encode())
            h.update(open(os.path.join(target, split, name), "rb").read())
            n += 1
    assert (n, h.hexdigest()) == IMAGES
    manifest = json.load(open(os.path.join(target, "manifest.json")))
    assert manifest["version"] == S.SYNTH_VERSION == 3
    assert (manifest["parts"], manifest["annotations"], manifest["masks"]) == (list(S.PARTS), "annotations.json", "masks")


def test_generation_is_byte_deterministic_with_masks_and_annotations(tmp_path):
    a = S.generate_synthetic(str(tmp_path / "a"), S.SyntheticConfig(**TINY), workers=1)
    b = S.generate_synthetic(str(tmp_path / "b"), S.SyntheticConfig(**TINY), workers=2)
    ta = read_tree(a)
    assert ta == read_tree(b)
    masks = [k for k in ta if k.startswith("masks" + os.sep)]
    assert len(masks) == IMAGES[0] and "annotations.json" in ta


def test_annotations_describe_every_image(tiny):
    target, drawn = tiny
    notes = S.load_annotations(target)
    assert notes == S.load_annotations(os.path.dirname(target))  # the folder holding SYNTH_CC works too
    assert set(notes) == set(json.load(open(os.path.join(target, "boxes.json")))) == set(drawn)
    for name, (person, outfit) in drawn.items():
        assert notes[name]["attributes"] == S.attributes(person, outfit)
        assert colour_words(notes[name]["caption"]) <= set(notes[name]["attributes"].values())
    red = [n for n in notes.values() if n["attributes"]["top colour"] == "red"]
    assert sum("red" in n["caption"] for n in red) >= 0.7 * len(red)
    with pytest.raises(UserError, match="annotations.json"):
        S.load_annotations(os.path.dirname(os.path.dirname(target)))


def test_masks_cover_the_drawn_parts(tiny):
    target, drawn = tiny
    part = {p: i for i, p in enumerate(S.PARTS)}
    assert S.IDENTITY_PARTS + S.CLOTHES_PARTS == S.PARTS[1:]
    dist = lambda px, colours: np.min([np.linalg.norm(px - np.array(c), axis=-1) for c in colours], axis=0)
    top, skin, closer = [], [], []
    for name, (person, outfit) in drawn.items():
        path = os.path.join(target, name)
        assert S.mask_path(path) == os.path.join(target, "masks", name)
        mask = S.load_mask(path)
        img = np.asarray(Image.open(path), np.float64)
        assert mask.dtype == np.uint8 and mask.shape == img.shape[:2] and mask.max() < len(S.PARTS)
        present = set(np.unique(mask).tolist())
        assert {part[p] for p in ("background", "top", "bottom", "skin", "shoes")} <= present, name
        assert (part["hair"] in present) == (person["style"] != "bald"), name
        assert (part["glasses"] in present) == person["glasses"], name
        assert (part["bag"] in present) == (person["bag"] is not None), name
        top.append(np.median(dist(img[mask == part["top"]], [outfit["top"], outfit["top2"]])))
        skin.append(np.median(dist(img[mask == part["skin"]], [person["skin"]])))
        closer.append(top[-1] < np.median(dist(img[mask == part["background"]], [outfit["top"], outfit["top2"]])))
    # camera gain, cast, blur and noise move colours; the labels still pick the right pixels
    assert np.median(top) < 30 and np.median(skin) < 30 and np.mean(closer) > 0.9, (np.median(top), np.median(skin))


def test_mask_readers_name_missing_files(tmp_path):
    assert S.mask_path("/d/SYNTH_CC/test/001_1_c1_000000.png") == "/d/SYNTH_CC/masks/test/001_1_c1_000000.png"
    with pytest.raises(UserError, match="not a benchmark image"):
        S.mask_path("/d/SYNTH_CC/001_1_c1_000000.png")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "SYNTH_CC" / "masks" / "test" / "x.png"))):
        S.load_mask(str(tmp_path / "SYNTH_CC" / "test" / "x.png"))
    labels = Image.fromarray(np.array([[0, 3, 1, 1, 6, 1], [0, 3, 1, 7, 6, 1], [0, 0, 6, 6, 0, 7], [0, 6, 6, 7, 0, 7]], np.uint8))
    assert S.draw._downsample_labels(labels, 2, 3).tolist() == [[3, 1, 1], [0, 6, 7]]  # majority; ties to the thinner part


def test_preview_shows_masks_and_captions(tiny, tmp_path, capsys):
    target, _ = tiny
    out = str(tmp_path / "p.png")
    S.save_preview(target, out, ids=4)
    assert "4 with masks and captions" in capsys.readouterr().out
    img = np.asarray(Image.open(out).convert("RGB"))
    grid = 2 * 64 * 4
    assert img.shape[0] == grid + S.preview._panel_height(64, 2)
    top = grid + 2 * S.preview._PAD + S.preview._LINE + 2 * 64  # under the images: the caption lines
    assert (img[top:top + S.preview._PAD + S.preview._CAPTION_LINES * S.preview._LINE].max(-1) < 100).sum() > 500  # dark text is there
    for colour in S.PART_COLOURS[1:]:  # masks and legend
        assert (img[grid:] == colour).all(-1).any(), colour


# ---- the pretraining corpus -----------------------------------------------------------------

def test_corpus(tmp_path):
    cfg = S.CorpusConfig(**CORPUS)
    a = S.generate_corpus(str(tmp_path / "a"), cfg, workers=1)
    b = S.generate_corpus(str(tmp_path / "b"), cfg, workers=2)
    assert read_tree(a) == read_tree(b) and sorted(os.listdir(a)) == ["images.npy", "manifest.json", "records.json"]
    images, records = S.load_corpus(a)
    assert images.shape == (30, 64, 64, 3) and images.dtype == np.uint8 and len(records) == 30
    assert S.load_corpus(os.path.dirname(a))[1] == records  # the folder holding SYNTH_CORPUS works too
    assert [(r["pid"], r["split"]) for r in records[::3]] == [(p, "train" if p < 8 else "held_out") for p in range(10)]
    assert {r["pid"] for r in records if r["split"] == "train"}.isdisjoint({r["pid"] for r in records if r["split"] == "held_out"})
    assert json.load(open(os.path.join(a, "manifest.json")))["counts"] == {"train": 24, "held_out": 6}
    people, outfits, cams, _ = S.corpus._corpus_plan(cfg)
    for r in records:
        assert 0 <= r["outfit"] < 2 and 0 <= r["camera"] < 3
        assert r["attributes"] == S.attributes(people[r["pid"]], outfits[r["pid"]][r["outfit"]])
        assert colour_words(r["caption"]) <= set(r["attributes"].values()), r
    assert len({r["caption"] for r in records}) == 30
    assert (images.std(axis=(1, 2, 3)) > 10).all() and len({im.tobytes() for im in images}) == 30
    edges = np.abs(np.diff(images.astype(int), axis=1)).mean(axis=(0, 1, 3))  # per column: the person has many
    assert edges[24:40].mean() > 2 * max(edges[:8].mean(), edges[-8:].mean())  # centred, background at the sides
    bench_people = S.benchmark._plan(S.SyntheticConfig(seed=CORPUS["seed"]))[0].values()
    assert not any(p == q for p in people.values() for q in bench_people)  # other seed streams: other people


def test_corpus_garment_colours_are_even_over_the_colour_words():
    """The corpus draws each garment's colour word uniformly (the benchmark's hues are mostly green and
    blue), from the benchmark's HSV ranges, and colour_names agrees with colour_name."""
    from collections import Counter

    from synthetic.corpus import _corpus_outfit
    from synthetic.draw import _outfit
    from synthetic.words import colour_names

    rgb = np.random.default_rng(0).integers(0, 256, size=(50, 3))
    assert list(colour_names(rgb)) == [S.colour_name(c) for c in rgb]
    for garment in ("top", "bottom"):
        even = Counter(S.colour_name(_corpus_outfit(np.random.default_rng([7, i]))[garment]) for i in range(1200))
        plain = Counter(S.colour_name(_outfit(np.random.default_rng([7, i]))[garment]) for i in range(1200))
        assert max(plain.values()) > 6 * min(plain.values())  # what the benchmark's draw gives
        # words the range gives at least 1 % of the time are even; rarer ones (white tops) seldom appear
        # among the candidates, so they stay rare
        common = [even[w] for w in even if plain[w] >= 12]
        assert len(common) >= 10 and 0.7 * np.mean(common) < min(common) <= max(common) < 1.3 * np.mean(common), even
        assert set(even) <= set(S.COLOUR_TERMS) and len(even) >= 12
    bottoms = [_corpus_outfit(np.random.default_rng([8, i]))["bottom"] for i in range(300)]
    assert max(max(c) for c in bottoms) <= 0.8 * 255 + 1  # the bottoms' value range (BOTTOM_RANGE)


def test_corpus_regeneration_rule(tmp_path, caplog):
    root = str(tmp_path)
    cfg = S.CorpusConfig(**CORPUS)
    folder = S.generate_corpus(root, cfg)
    marker = os.path.join(folder, "marker.txt")
    open(marker, "w").close()
    assert S.generate_corpus(root, cfg) == folder and os.path.exists(marker)  # the same: reused
    with caplog.at_level(logging.INFO, logger="datasets"):
        S.generate_corpus(root, S.CorpusConfig(**{**CORPUS, "people": 12}))
    assert not os.path.exists(marker) and f"regenerating {folder}: people 10 -> 12" in caplog.messages
    assert len(S.load_corpus(folder)[1]) == 36 and sorted(os.listdir(root)) == ["SYNTH_CORPUS"]
    with open(os.path.join(folder, "records.json"), "w") as f:
        json.dump([], f)
    with pytest.raises(UserError, match="corrupt"):
        S.load_corpus(folder)
    os.remove(os.path.join(folder, "manifest.json"))
    with pytest.raises(UserError, match="no readable manifest"):
        S.generate_corpus(root, cfg)
    with pytest.raises(UserError, match="no corpus in"):
        S.load_corpus(str(tmp_path / "nothing"))
    for bad, msg in (({"people": 1}, "people"), ({"held_out": 1.0}, "held_out"), ({"img_size": (16, 16)}, "img_size"),
                     ({"outfits_per_person": 0}, "outfits_per_person")):
        with pytest.raises(UserError, match=f"synthetic corpus: {msg}"):
            S.CorpusConfig(**bad)


def test_corpus_cli(tmp_path, capsys):
    assert S.main(["--corpus", str(tmp_path), "--corpus-people", "3"]) == 0
    assert "pretraining corpus at" in capsys.readouterr().out
    assert len(S.load_corpus(str(tmp_path))[1]) == 3 * S.CorpusConfig.images_per_person
    for argv, msg in ((["--corpus-people", "3"], "--corpus-people is given but no --corpus"),
                      (["--corpus", str(tmp_path), "--seed", "2"], "parameters (seed) are given but nothing uses them")):
        assert S.main(argv) == 2
        assert msg in capsys.readouterr().err
