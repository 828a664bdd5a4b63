"""Words: what the generator drew, as attributes and captions (for text encoders and zero-shot probes):
colour names (CIELAB prototypes), `attributes`, `caption`, `ATTRIBUTE_VALUES`, `zero_shot_prompts`."""
from __future__ import annotations

import re

import numpy as np

from synthetic.draw import BOTTOM_PATTERNS, HAIR_STYLES, SKIN, TOP_PATTERNS
from utils import UserError

# Basic colour terms, each with a few reference colours: one prototype per term leaves dark blues
# named purple and steel blues named grey (CIELAB is least uniform there), hence navy, steel and
# light blue prototypes. A colour is named by its nearest prototype in CIELAB.
COLOUR_PROTOTYPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((20, 20, 20),),
    "white": ((245, 245, 245),),
    "grey": ((128, 128, 128), (85, 85, 85), (180, 180, 180)),
    "red": ((210, 30, 30), (140, 20, 30)),
    "orange": ((240, 130, 30), (200, 100, 40)),
    "yellow": ((240, 220, 40), (210, 190, 90)),
    "green": ((40, 160, 60), (30, 90, 40), (130, 180, 80), (100, 120, 50)),
    "turquoise": ((40, 190, 190), (20, 110, 110)),
    "blue": ((40, 80, 210), (30, 40, 120), (20, 35, 80), (110, 160, 220), (70, 110, 160), (170, 215, 240)),
    "purple": ((130, 50, 180), (70, 30, 90), (170, 130, 210)),
    "pink": ((240, 130, 180), (220, 50, 150), (230, 180, 190)),
    "brown": ((120, 70, 30), (80, 50, 30), (160, 120, 80)),
    "beige": ((225, 200, 160),),
}
COLOUR_TERMS = tuple(COLOUR_PROTOTYPES)
SKIN_TONES = ("pale", "fair", "olive", "tan", "brown", "dark")  # one word per SKIN entry
PATTERN_WORDS = {"solid": "plain", "hstripes": "striped", "vstripes": "vertically striped", "checks": "checked",
                 "dots": "dotted"}
BAG_WORDS = {None: "no bag", "shoulder": "shoulder bag", "backpack": "backpack"}

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB colours, shape (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (linear @ _SRGB_TO_XYZ.T) / _WHITE_D65
    d = 6 / 29
    f = np.where(t > d ** 3, np.cbrt(t), t / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PROTOTYPE_TERMS = [term for term, refs in COLOUR_PROTOTYPES.items() for _ in refs]
_PROTOTYPE_LAB = srgb_to_lab([rgb for refs in COLOUR_PROTOTYPES.values() for rgb in refs])
_SKIN_LAB = srgb_to_lab(SKIN)


def colour_names(rgb) -> np.ndarray:
    """The basic colour terms nearest to 8-bit RGB colours [..., 3] (CIELAB distance to the prototypes)."""
    lab = srgb_to_lab(rgb)[..., None, :]  # [..., 1, 3] against [prototypes, 3]
    return np.asarray(_PROTOTYPE_TERMS)[((_PROTOTYPE_LAB - lab) ** 2).sum(-1).argmin(-1)]


def colour_name(rgb) -> str:
    """The basic colour term nearest to an 8-bit RGB colour."""
    return str(colour_names(rgb))


def _skin_tone(rgb) -> str:
    """The word of the SKIN entry the jittered colour came from (the entries are far apart)."""
    return SKIN_TONES[int(np.argmin(((_SKIN_LAB - srgb_to_lab(rgb)) ** 2).sum(-1)))]


ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "hair colour": COLOUR_TERMS,
    "hair style": tuple(dict.fromkeys(HAIR_STYLES)),
    "skin tone": SKIN_TONES,
    "glasses": ("glasses", "no glasses"),
    "bag": ("backpack", "shoulder bag", "no bag"),
    "bag colour": COLOUR_TERMS,
    "shoe colour": COLOUR_TERMS,
    "top colour": COLOUR_TERMS,
    "top pattern": tuple(dict.fromkeys(PATTERN_WORDS[p] for p in TOP_PATTERNS)),
    "top pattern colour": COLOUR_TERMS,
    "sleeves": ("long", "short"),
    "bottom colour": COLOUR_TERMS,
    "bottom type": ("trousers", "shorts", "skirt"),
    "bottom pattern": tuple(dict.fromkeys(PATTERN_WORDS[p] for p in BOTTOM_PATTERNS)),
    "bottom pattern colour": COLOUR_TERMS,
}


def attributes(person: dict, outfit: dict) -> dict[str, str]:
    """What the generator drew, in words, keys in ATTRIBUTE_VALUES order.

    Four keys can be absent, as their part is not drawn: "bag colour" without a bag, "hair colour"
    for bald people and the pattern colours of plain garments. A pattern covers about a quarter of
    its garment (dots a fifth), and captions name its colour too ("a red-striped beige top").
    """
    a = {"hair colour": colour_name(person["hair"]), "hair style": person["style"],
         "skin tone": _skin_tone(person["skin"]), "glasses": "glasses" if person["glasses"] else "no glasses",
         "bag": BAG_WORDS[person["bag"]], "bag colour": colour_name(person["bag_colour"]),
         "shoe colour": colour_name(person["shoes"]), "top colour": colour_name(outfit["top"]),
         "top pattern": PATTERN_WORDS[outfit["top_pattern"]], "top pattern colour": colour_name(outfit["top2"]),
         "sleeves": outfit["sleeves"],
         "bottom colour": colour_name(outfit["bottom"]), "bottom type": outfit["bottom_type"],
         "bottom pattern": PATTERN_WORDS[outfit["bottom_pattern"]], "bottom pattern colour": colour_name(outfit["bottom2"])}
    for part in ("top", "bottom"):
        if outfit[f"{part}_pattern"] == "solid":
            del a[f"{part} pattern colour"]
    if person["bag"] is None:
        del a["bag colour"]
    if person["style"] == "bald":
        del a["hair colour"]
    return a


# Phrases shared by captions and zero-shot prompts, so that both use the same words. Each takes
# the attributes and the set of keys to mention; None means there is nothing to say.
_HAIR = {"short": "short {c}hair", "long": "long {c}hair", "bun": "{c}hair in a bun", "spiky": "spiky {c}hair",
         "ponytail": "a {c}ponytail", "afro": "a {c}afro", "bald": "a bald head"}


def _a(phrase: str) -> str:
    """Fix the article in front of a vowel: 'a orange top' -> 'an orange top'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", phrase)


def _words(attrs: dict, keep: set, *keys: str) -> str:
    """The kept values of keys, each followed by a space ('' when none is kept)."""
    return "".join(f"{attrs[k]} " for k in keys if k in keep and k in attrs)


def _pattern_words(attrs: dict, keep: set, part: str) -> str:
    """The kept pattern of a garment with its colour, 'red-striped ' or 'vertically red-striped '
    ('' when the pattern is not kept)."""
    pattern = _words(attrs, keep, f"{part} pattern")
    colour = attrs.get(f"{part} pattern colour")
    if not pattern or colour is None:
        return pattern
    *head, last = pattern.split()
    return " ".join([*head, f"{colour}-{last}"]) + " "


def _hair_phrase(attrs: dict, keep: set) -> str | None:
    colour = _words(attrs, keep, "hair colour")
    if "hair style" in keep:
        return _a(_HAIR[attrs["hair style"]].format(c=colour))
    return f"{colour}hair" if colour else None


def _bag_phrase(attrs: dict, keep: set) -> str | None:
    colour = _words(attrs, keep, "bag colour")
    if "bag" in keep:
        return "no bag" if attrs["bag"] == "no bag" else _a(f"a {colour}{attrs['bag']}")
    return _a(f"a {colour}bag") if colour else None  # a colour without the kind: a generic bag


def _top_phrase(attrs: dict, keep: set, noun: str, sleeves_after: bool) -> str | None:
    words = _pattern_words(attrs, keep, "top") + _words(attrs, keep, "top colour")
    if not (words or "sleeves" in keep):
        return None  # "a shirt" says nothing
    sleeves = attrs["sleeves"] if "sleeves" in keep else None
    if sleeves and sleeves_after:
        return _a(f"a {words}{noun} with {sleeves} sleeves")
    return _a(f"a {sleeves + '-sleeved ' if sleeves else ''}{words}{noun}")


def _bottom_phrase(attrs: dict, keep: set, trousers: str) -> str | None:
    """Trousers, shorts, a skirt; 'bottoms' (the shop word for all three) when the type is left out."""
    words = _pattern_words(attrs, keep, "bottom") + _words(attrs, keep, "bottom colour")
    if "bottom type" not in keep:
        return f"{words}bottoms" if words else None
    kind = attrs["bottom type"]
    return _a(f"a {words}skirt") if kind == "skirt" else f"{words}{trousers if kind == 'trousers' else kind}"


def _shoes_phrase(attrs: dict, keep: set) -> str | None:
    return f"{attrs['shoe colour']} shoes" if "shoe colour" in keep else None


def _skin_phrase(attrs: dict, keep: set) -> str | None:
    return f"{attrs['skin tone']} skin" if "skin tone" in keep else None


def _glasses_phrase(attrs: dict, keep: set) -> str | None:
    return attrs["glasses"] if "glasses" in keep else None


# Who someone is and what they wear (METHOD.md section 11): the traits a person keeps across outfits
# are "person" words, the outfit's are "clothes" words. Shoes and bag stay with the person in this
# world (synthetic.draw draws them from the person, not the outfit), so they are person traits.
PERSON_ATTRIBUTES = ("hair colour", "hair style", "skin tone", "glasses", "bag", "bag colour", "shoe colour")
CLOTHES_ATTRIBUTES = ("top colour", "top pattern", "top pattern colour", "sleeves", "bottom colour", "bottom type",
                      "bottom pattern", "bottom pattern colour")

_PHRASE = {  # attribute -> the phrase of that attribute alone
    "hair colour": _hair_phrase, "hair style": _hair_phrase, "skin tone": _skin_phrase,
    "glasses": _glasses_phrase, "bag": _bag_phrase, "bag colour": _bag_phrase, "shoe colour": _shoes_phrase,
    "top colour": lambda a, k: _top_phrase(a, k, "top", False), "top pattern": lambda a, k: _top_phrase(a, k, "top", False),
    "sleeves": lambda a, k: _top_phrase(a, k, "top", False),
    "bottom colour": lambda a, k: _bottom_phrase(a, k, "trousers"),
    "bottom type": lambda a, k: _bottom_phrase(a, k, "trousers"),
    "bottom pattern": lambda a, k: _bottom_phrase(a, k, "trousers"),
}


def _bare(phrase: str) -> str:
    """A phrase without its article, to sit between "the" and "clothes": 'a red top' -> 'red top'."""
    return re.sub(r"^an? ", "", phrase)


# what the zero-shot report prompts: a pattern's colour has no words of its own apart from its
# pattern's ("red-striped", "red-dotted"), so it is not prompted alone
ZERO_SHOT_ATTRIBUTES = tuple(a for a in ATTRIBUTE_VALUES if not a.endswith("pattern colour"))


def zero_shot_prompts(attribute: str) -> dict[str, str]:
    """One prompt per value of `attribute`, in the shape of SCI's prompt for its kind: a person
    trait as "a photo of a person with short hair", a clothes attribute as "a photo of the red top
    clothes"; the prompts of one attribute differ only in the value's words."""
    if attribute not in ZERO_SHOT_ATTRIBUTES:
        raise UserError(f"no zero-shot prompts for {attribute!r}; valid: {', '.join(ZERO_SHOT_ATTRIBUTES)}")
    phrase = _PHRASE[attribute]
    if attribute in CLOTHES_ATTRIBUTES:
        return {v: f"a photo of the {_bare(phrase({attribute: v}, {attribute}))} clothes"
                for v in ATTRIBUTE_VALUES[attribute]}
    verb = "wearing" if attribute == "shoe colour" else "with"
    return {v: f"a photo of a person {verb} {phrase({attribute: v}, {attribute})}" for v in ATTRIBUTE_VALUES[attribute]}


def _outfit_words(attrs: dict[str, str], keep: set | None = None) -> str:
    """The outfit without articles, e.g. 'long-sleeved striped red top and blue trousers'."""
    keep = set(CLOTHES_ATTRIBUTES) if keep is None else keep
    parts = [_top_phrase(attrs, keep, "top", False), _bottom_phrase(attrs, keep, "trousers")]
    return " and ".join(_bare(p) for p in parts if p)


def _trait_words(attrs: dict[str, str]) -> str:
    hair = f"{attrs['hair colour']}-haired" if "hair colour" in attrs else "bald"
    return f"{attrs['skin tone']}-skinned {hair} {attrs['shoe colour']}-shoed"


def template_prompts(attrs: dict[str, str]) -> dict[str, str]:
    """SCI's two prompt shapes filled with words instead of learnt tokens (the pretraining report's
    template test, and captions of the corpus): "clothes", "A photo of the {outfit words} clothes."
    (top and bottom: what changes with an outfit), and "person", "A photo of a {trait words} person."
    (skin, hair, shoes: what a person keeps)."""
    keep = {"top colour", "bottom colour", "bottom type"}
    return {"clothes": f"A photo of the {_outfit_words(attrs, keep)} clothes.",
            "person": _a(f"A photo of a {_trait_words(attrs)} person.")}


# "person" is kept for captions of person traits alone (person_caption), so that the word means who
# someone is, as it does in SCI's identity prompt; a caption that names clothes says someone else
_SUBJECTS = ("someone", "a pedestrian", "a passer-by")
_WEAR = ("wearing", "in", "dressed in")
# {s} subject, {w} wear verb, {i} identity traits (with ...), {o} clothes and what else is worn
_TEMPLATES = ("{s} with {i}, {w} {o}.", "{s} {w} {o}, with {i}.", "{s} {w} {o}. they have {i}.",
              "a photo of {s} with {i} {w} {o}.", "{o} on {s} with {i}.")


def _mention_chance(key: str, value: str) -> float:
    """Clothes colours nearly always, absences and plainness seldom (people rarely say them), the rest often."""
    if key in ("top colour", "bottom colour"):
        return 0.9
    return 0.35 if value in ("plain", "no bag", "no glasses") else 0.7


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A sentence describing `attrs`: template, subject, verb, synonyms, clause order and the
    attributes it leaves out all vary, so that a text encoder has to learn the words rather than
    their positions. Changing a colour leaves the random draws, so the sentence, as they were."""
    draws = rng.random(len(ATTRIBUTE_VALUES))  # one per attribute, present or not: the same draws for any values
    keep = {k for k, u in zip(ATTRIBUTE_VALUES, draws) if k in attrs and u < _mention_chance(k, attrs[k])}
    if not keep:  # never say nothing
        keep = {"top colour"}
    template, subject, wear = (_TEMPLATES[rng.integers(len(_TEMPLATES))], _SUBJECTS[rng.integers(len(_SUBJECTS))],
                               _WEAR[rng.integers(len(_WEAR))])
    noun = ("top", "shirt", "sweater" if attrs["sleeves"] == "long" else "t-shirt")[rng.integers(3)]  # only true ones
    sleeves_after, trousers = bool(rng.random() < 0.5), ("trousers", "pants")[rng.integers(2)]
    identity = [_hair_phrase(attrs, keep), _skin_phrase(attrs, keep), _bag_phrase(attrs, keep),
                _glasses_phrase(attrs, keep), _shoes_phrase(attrs, keep)]  # what the person keeps
    worn = [_top_phrase(attrs, keep, noun, sleeves_after), _bottom_phrase(attrs, keep, trousers)]  # the outfit
    identity, worn = [p for p in identity if p], [p for p in worn if p]
    identity = [identity[i] for i in rng.permutation(len(identity))]
    worn = [worn[i] for i in rng.permutation(len(worn))]
    if not identity:
        template = "{s} {w} {o}."
    elif not worn:
        template = "{s} with {i}."
    return template.format(s=subject, w=wear, i=_join(identity) if identity else "", o=_join(worn) if worn else "")


_PERSON_FRAMES = ("a photo of a {t} person.", "a {t} person.", "a person with {i}.", "a photo of a person with {i}.",
                  "a {t} person with {i}.")
_CLOTHES_FRAMES = ("a photo of the {o} clothes.", "the {o} clothes.", "the clothes: {w}.", "the clothes are {w}.",
                   "{w}: the clothes of {s}.")


def person_caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A caption of the person alone, with the word "person" and never a clothes attribute: the
    identity prompt's shape "a photo of a {trait words} person." or a sentence of the traits."""
    draws = rng.random(len(PERSON_ATTRIBUTES))
    keep = {k for k, u in zip(PERSON_ATTRIBUTES, draws) if k in attrs and u < 0.75} or {"skin tone"}
    phrases = [p for p in (_hair_phrase(attrs, keep), _skin_phrase(attrs, keep), _glasses_phrase(attrs, keep),
                           _bag_phrase(attrs, keep), _shoes_phrase(attrs, keep)) if p]
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    frame = _PERSON_FRAMES[rng.integers(len(_PERSON_FRAMES))]
    return _a(frame.format(t=_trait_words(attrs), i=_join(phrases)))


def clothes_caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A caption of the outfit alone, with "the ... clothes" and never a person trait: the clothes
    prompt's shape "a photo of the {outfit words} clothes." or a sentence of the outfit."""
    draws = rng.random(len(CLOTHES_ATTRIBUTES))
    keep = {k for k, u in zip(CLOTHES_ATTRIBUTES, draws)
            if k in ("top colour", "bottom colour") or (k in attrs and u < _mention_chance(k, attrs[k]))}
    # half of them name one garment alone: "the red top clothes" must then find a red top, not a red
    # skirt, which a caption naming both colours does not ask (it binds each colour to its garment)
    alone = ("top", "bottom", None, None)[rng.integers(4)]
    if alone is not None:
        keep = {k for k in keep if k.startswith(alone) or (alone, k) == ("top", "sleeves")}
    noun = ("top", "shirt", "sweater" if attrs["sleeves"] == "long" else "t-shirt")[rng.integers(3)]
    trousers = ("trousers", "pants")[rng.integers(2)]
    frame = _CLOTHES_FRAMES[rng.integers(len(_CLOTHES_FRAMES))]
    sleeves_after = "{o}" not in frame and bool(rng.random() < 0.5)  # "the ... with long sleeves clothes" is no English
    worn = [_top_phrase(attrs, keep, noun, sleeves_after), _bottom_phrase(attrs, keep, trousers)]
    worn = [p for p in (worn[i] for i in rng.permutation(2)) if p]
    return frame.format(o=" and ".join(_bare(p) for p in worn), w=_join(worn), s=_SUBJECTS[rng.integers(len(_SUBJECTS))])


CAPTION_KINDS = {"full": caption, "person": person_caption, "clothes": clothes_caption}
