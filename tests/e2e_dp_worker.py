"""One rank of the data-parallel distillation test (started by mlx.launch from test_refine_e2e).

argv: PACK TEACHER SPEC_JSON OUT
"""

import json
import sys
from pathlib import Path

from mlx_dupq.refine.e2e import distill_pack
from mlx_dupq.refine.e2e_spec import E2ESpec

if __name__ == "__main__":
    pack, teacher, spec_file, out = sys.argv[1:5]
    spec = E2ESpec.from_dict(json.loads(Path(spec_file).read_text()))
    distill_pack(pack, teacher, spec, out=out)
