"""Learned refinement of packs: block-wise reconstruction and end-to-end distillation."""
