"""Reports rendered from the result files in ``bench/results/``: the results report (:mod:`.collect`,
:mod:`.render`), the MoE report (:mod:`.moe`) and the duplication report (:mod:`.dup`)."""
