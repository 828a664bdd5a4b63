"""A vendored CLIP (OpenAI's architecture and checkpoints) with Re-ID adaptations.

    model, preprocess = clip.load("RN50", last_stride=1, input_size=(384, 192))
    text = clip.tokenize(["a photo of a person"])
"""
from .clip import MEAN, STD, CheckpointError, available_models, build_model, load, tiny_state_dict
from .model import CLIP
from .tokenizer import SimpleTokenizer, tokenize

__all__ = [
    "CLIP", "CheckpointError", "MEAN", "STD", "SimpleTokenizer",
    "available_models", "build_model", "load", "tiny_state_dict", "tokenize",
]
