"""Learned refinement of packs: block-wise reconstruction and end-to-end distillation.

- :mod:`.fakequant`: trainable fake quantization of every stored format, and back to a QTensor;
- :mod:`.block`: block-wise reconstruction of one decoder layer (EfficientQAT's Block-AP);
- :mod:`.stage` / :mod:`.feature`: that as a convert stage (``[refine.block]`` in a recipe);
- :mod:`.spec`: the recipe options; :mod:`.e2e`: end-to-end distillation (``mlx-dupq refine``).
"""
