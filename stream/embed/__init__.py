"""Embedding models: torch/transformers encoders behind one small interface, and their pool."""
