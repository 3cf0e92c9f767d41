"""Model bundles shipped with the package (``default.onnx``)."""
