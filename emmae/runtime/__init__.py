"""The torch-free runtime: preprocessing, encoding, clustering and picking."""
