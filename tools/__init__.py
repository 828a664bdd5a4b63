"""Small applications of a trained model, each with its own CLI (python tools/NAME.py --help): search.py
(your own image folders), export.py (torch.export / ONNX), profile.py (parameters and FLOPs)."""
