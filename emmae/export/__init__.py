"""Encoder-only ONNX export and model bundles (PyTorch + onnx)."""
