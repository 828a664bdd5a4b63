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


def colour_name(rgb) -> str:
    """The basic colour term nearest to an 8-bit RGB colour (CIELAB distance to the prototypes)."""
    return _PROTOTYPE_TERMS[int(np.argmin(((_PROTOTYPE_LAB - srgb_to_lab(rgb)) ** 2).sum(-1)))]


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
    "sleeves": ("long", "short"),
    "bottom colour": COLOUR_TERMS,
    "bottom type": ("trousers", "shorts", "skirt"),
    "bottom pattern": tuple(dict.fromkeys(PATTERN_WORDS[p] for p in BOTTOM_PATTERNS)),
}


def attributes(person: dict, outfit: dict) -> dict[str, str]:
    """What the generator drew, in words, keys in ATTRIBUTE_VALUES order.

    Two keys can be absent, as their part is not drawn: "bag colour" without a bag and
    "hair colour" for bald people.
    """
    a = {"hair colour": colour_name(person["hair"]), "hair style": person["style"],
         "skin tone": _skin_tone(person["skin"]), "glasses": "glasses" if person["glasses"] else "no glasses",
         "bag": BAG_WORDS[person["bag"]], "bag colour": colour_name(person["bag_colour"]),
         "shoe colour": colour_name(person["shoes"]), "top colour": colour_name(outfit["top"]),
         "top pattern": PATTERN_WORDS[outfit["top_pattern"]], "sleeves": outfit["sleeves"],
         "bottom colour": colour_name(outfit["bottom"]), "bottom type": outfit["bottom_type"],
         "bottom pattern": PATTERN_WORDS[outfit["bottom_pattern"]]}
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
    words = _words(attrs, keep, "top pattern", "top colour")
    if not (words or "sleeves" in keep):
        return None  # "a shirt" says nothing
    sleeves = attrs["sleeves"] if "sleeves" in keep else None
    if sleeves and sleeves_after:
        return _a(f"a {words}{noun} with {sleeves} sleeves")
    return _a(f"a {sleeves + '-sleeved ' if sleeves else ''}{words}{noun}")


def _bottom_phrase(attrs: dict, keep: set, trousers: str) -> str | None:
    """Trousers, shorts, a skirt; 'bottoms' (the shop word for all three) when the type is left out."""
    words = _words(attrs, keep, "bottom pattern", "bottom colour")
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


_PROMPT = {  # attribute -> (template, phrase of that attribute alone)
    "hair colour": ("with {}", _hair_phrase), "hair style": ("with {}", _hair_phrase),
    "skin tone": ("with {}", _skin_phrase), "glasses": ("with {}", _glasses_phrase),
    "bag": ("with {}", _bag_phrase), "bag colour": ("with {}", _bag_phrase),
    "shoe colour": ("wearing {}", _shoes_phrase),
    "top colour": ("wearing {}", lambda a, k: _top_phrase(a, k, "top", False)),
    "top pattern": ("wearing {}", lambda a, k: _top_phrase(a, k, "top", False)),
    "sleeves": ("wearing {}", lambda a, k: _top_phrase(a, k, "top", False)),
    "bottom colour": ("wearing {}", lambda a, k: _bottom_phrase(a, k, "trousers")),
    "bottom type": ("wearing {}", lambda a, k: _bottom_phrase(a, k, "trousers")),
    "bottom pattern": ("wearing {}", lambda a, k: _bottom_phrase(a, k, "trousers")),
}


def zero_shot_prompts(attribute: str) -> dict[str, str]:
    """One caption-like prompt per value of `attribute`, e.g. top colour red -> 'a photo of a person
    wearing a red top'; the prompts of one attribute differ only in the value's words."""
    if attribute not in ATTRIBUTE_VALUES:
        raise UserError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTE_VALUES)}")
    template, phrase = _PROMPT[attribute]
    return {v: "a photo of a person " + template.format(phrase({attribute: v}, {attribute}))
            for v in ATTRIBUTE_VALUES[attribute]}


def template_prompts(attrs: dict[str, str]) -> dict[str, str]:
    """SCI's two prompt shapes filled with words instead of learnt tokens (the pretraining report's
    template test): "clothes", "A photo of the {outfit words} clothes." (top and bottom: what changes
    with an outfit), and "person", "A photo of a {trait words} person." (skin, hair, shoes: what a
    person keeps)."""
    outfit = f"{attrs['top colour']} top and {attrs['bottom colour']} {attrs['bottom type']}"
    hair = f"{attrs['hair colour']}-haired" if "hair colour" in attrs else "bald"
    traits = f"{attrs['skin tone']}-skinned {hair} {attrs['shoe colour']}-shoed"
    return {"clothes": f"A photo of the {outfit} clothes.", "person": _a(f"A photo of a {traits} person.")}


_SUBJECTS = ("a person", "someone", "a pedestrian")
_WEAR = ("wearing", "in", "dressed in")
# {s} subject, {w} wear verb, {i} identity traits (with ...), {o} clothes and what else is worn
_TEMPLATES = ("{s} with {i}, {w} {o}.", "{s} {w} {o}, with {i}.", "{s} {w} {o}. this person has {i}.",
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
    identity = [_hair_phrase(attrs, keep), _skin_phrase(attrs, keep), _bag_phrase(attrs, keep)]
    worn = [_top_phrase(attrs, keep, noun, sleeves_after), _bottom_phrase(attrs, keep, trousers),
            _shoes_phrase(attrs, keep)]
    glasses = _glasses_phrase(attrs, keep)  # "glasses" are worn, "no glasses" is a trait
    (worn if attrs["glasses"] == "glasses" else identity).append(glasses)
    identity, worn = [p for p in identity if p], [p for p in worn if p]
    identity = [identity[i] for i in rng.permutation(len(identity))]
    worn = [worn[i] for i in rng.permutation(len(worn))]
    if not identity:
        template = "{s} {w} {o}."
    elif not worn:
        template = "{s} with {i}."
    return template.format(s=subject, w=wear, i=_join(identity) if identity else "", o=_join(worn) if worn else "")
