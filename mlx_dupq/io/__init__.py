"""Inputs and outputs: model sources (:mod:`.base`, :mod:`.source`, GGUF in :mod:`.gguf`, named models in
:mod:`.models`), loading anything (:mod:`.loader`) and the pack format (:mod:`.pack`, its module
formats in ``MODULE_LOADERS``). See docs/models.md and docs/architecture.md ("Pack formats")."""
