"""Pure array functions of weight quantization: the QTensor type (:mod:`.qtensor`), round-to-nearest
(:mod:`.rtn`), scale / clipping search (:mod:`.scales`), GPTQ (:mod:`.gptq`), rounding variants
(:mod:`.rounding`), activation fake-quant (:mod:`.act`), bit-packing of codes (:mod:`.bitpack`),
stored bits (:mod:`.bpw`) and the one entry point ``quantize_weight`` (:mod:`.methods`)."""
