"""Shipped assets: the demo language model (demo_lm/) and its held-out texts (demo_texts/)."""
