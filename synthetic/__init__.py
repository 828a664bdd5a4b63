"""The synthetic cloth-changing benchmark: people with persistent identity traits wearing
several outfits, seen by cameras that differ in background, light, colour cast, scale, blur and
noise, drawn procedurally and deterministically from a seed and written in the LTCC layout
(the `datasets` package reads it with the LTCC parser: `build_dataset("synthetic", root)`).

Every image also has words and parts: its attributes and a caption (`attributes`, `caption`; the
corpus also has `person_caption` and `clothes_caption`, "person" and "clothes" in SCI's sense; in
SYNTH_CC/annotations.json, read by `load_annotations`; `ATTRIBUTE_VALUES` and
`zero_shot_prompts` for zero-shot probes) and a part label map (`PARTS`; in
SYNTH_CC/masks/{split}/, read by `load_mask`). A separate corpus of captioned people, none of
them in the benchmark, is for pretraining a small CLIP (`generate_corpus`, `load_corpus`).

The package: draw.py (people, outfits, cameras, one rendered image and its parts), words.py (colour
words, attributes, captions), benchmark.py (parameters, plan, the folder and its manifest), corpus.py
(the pretraining corpus), preview.py, cli.py (`python -m synthetic`) and pretrain.py (the small CLIP,
`python -m synthetic.pretrain`). It does not import the datasets package, which imports it only for
`--dataset synthetic`; the colour-histogram check of the clothes shortcut lives in
benchmarks/colour_histogram.py.

    python -m synthetic --make data --preview preview.png          # make the benchmark under data/
    python -m synthetic --preview preview.png --root data          # preview of the benchmark there
    python -m synthetic --corpus data [--corpus-people 3000]       # the pretraining corpus: data/SYNTH_CORPUS
"""
from synthetic.benchmark import (ANNOTATIONS, MASK_FOLDER, SYNTH_FOLDER, SYNTH_VERSION, SyntheticConfig, config_for,
                                 existing_params, generate_synthetic, load_annotations, load_mask, mask_path)
from synthetic.cli import add_parameter_flags, given_params, main
from synthetic.corpus import CORPUS_FOLDER, CORPUS_VERSION, CorpusConfig, generate_corpus, load_corpus
from synthetic.draw import CLOTHES_PARTS, HAIR, IDENTITY_PARTS, PARTS, SHOES, SKIN
from synthetic.preview import PART_COLOURS, coloured_mask, gallery_shots, save_preview
from synthetic.words import (ATTRIBUTE_VALUES, CAPTION_KINDS, CLOTHES_ATTRIBUTES, COLOUR_TERMS, PERSON_ATTRIBUTES,
                             SKIN_TONES, ZERO_SHOT_ATTRIBUTES, attributes, caption, clothes_caption, colour_name,
                             person_caption, srgb_to_lab, template_prompts, zero_shot_prompts)

__all__ = ["ANNOTATIONS", "ATTRIBUTE_VALUES", "CAPTION_KINDS", "CLOTHES_ATTRIBUTES", "CLOTHES_PARTS", "PERSON_ATTRIBUTES",
           "clothes_caption", "person_caption", "ZERO_SHOT_ATTRIBUTES", "COLOUR_TERMS", "CORPUS_FOLDER", "CORPUS_VERSION",
           "CorpusConfig", "HAIR", "IDENTITY_PARTS", "MASK_FOLDER", "PARTS", "PART_COLOURS", "SHOES", "SKIN",
           "SKIN_TONES", "SYNTH_FOLDER", "SYNTH_VERSION", "SyntheticConfig", "add_parameter_flags", "attributes",
           "caption", "colour_name", "coloured_mask", "config_for", "existing_params", "gallery_shots",
           "generate_corpus", "generate_synthetic", "given_params", "load_annotations", "load_corpus", "load_mask",
           "main", "mask_path", "save_preview", "srgb_to_lab", "template_prompts", "zero_shot_prompts"]
