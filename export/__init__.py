"""Offline export: ONNX graphs with parity checks, the model manifest, item features published
to the feature store, and the FAISS index (see export.pipeline)."""
