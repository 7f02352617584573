"""Convert features: the plug-in protocol (:mod:`.protocol`), the recipe-section table (:mod:`.table`)
and the small features that belong to no bigger package (:mod:`.act_ranges`). See docs/architecture.md."""
