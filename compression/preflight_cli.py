"""`python -m compression.preflight_cli` reads a JSON request on stdin and prints the pre-flight JSON.

The API runs this in a subprocess (when torch is installed beside it) so the API process itself never
imports torch; the request names local files only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

from compression.pipeline.context import json_safe
from compression.pipeline.preflight import preflight


def main() -> int:
    request = json.load(sys.stdin)
    paths = {k: Path(request[k]) if request.get(k) else None for k in ("calibration_path", "evaluation_path")}
    with TemporaryDirectory(prefix="modelpress-preflight-") as work_dir:
        result = preflight(
            Path(request["model_path"]),
            request["method"],
            request.get("config") or {},
            paths["calibration_path"],
            paths["evaluation_path"],
            work_dir=Path(work_dir),
        )
    json.dump(json_safe(result), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
