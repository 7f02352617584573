"""One rank of the data-parallel distillation tests (started by mlx.launch from test_refine_e2e).

argv: PACK TEACHER SPEC_JSON OUT [MACHINES_ROOT [DIE_AT [resume]]]

MACHINES_ROOT: each rank's work directory is MACHINES_ROOT/machine<rank>/e2e-work, as if every rank
ran on its own machine (the same path, different file systems); DIE_AT > 0: every rank stops at that
training step (KeyboardInterrupt); "resume": continue from the work directories.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx

from mlx_dupq.refine.e2e import distill_pack
from mlx_dupq.refine.e2e_spec import E2ESpec

if __name__ == "__main__":
    pack, teacher, spec_file, out = sys.argv[1:5]
    machines = sys.argv[5] if len(sys.argv) > 5 else ""
    die_at = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    resume = len(sys.argv) > 7 and sys.argv[7] == "resume"
    spec = E2ESpec.from_dict(json.loads(Path(spec_file).read_text()))
    work = Path(machines) / f"machine{mx.distributed.init().rank()}" / "e2e-work" if machines else None

    def die(phase, done, total, info):
        if phase == "train" and done == die_at:
            raise KeyboardInterrupt

    distill_pack(pack, teacher, spec, out=out, work=work, resume=resume, progress=die if die_at else None)
