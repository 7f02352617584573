"""Layer duplication (docs/duplication.md): copies of a decoder layer's linears (parallel, residual) or
of the whole layer (serial).

- :mod:`.specs`     CopySpec / DupPlan (options; read by the recipe) and ``diversify``
- :mod:`.scores`, :mod:`.plans`   which layers deserve copies, and how many
- :mod:`.copies`, :mod:`.aggregate`, :mod:`.runtime`   making copies, fitting their mix, running them
  inside an mlx-lm model, and rebuilding them from a pack
- :mod:`.feature`   the convert feature (recipe section ``[duplication]``)
- :mod:`.build`, :mod:`.study`   in-memory quantized models per plan, and the duplication study
"""
