"""Searches over recipes: per-module sensitivity (:mod:`.sensitivity`), the mixed-precision allocation
under a bits budget (:mod:`.allocate`, ``mlx-dupq allocate``) and the duplication-plan search
(:mod:`.dup_search`, ``mlx-dupq search-dup``)."""
