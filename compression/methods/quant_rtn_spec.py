"""The job pipeline's view of `quant_rtn`: its config and `compress`, no job-level hooks."""

from __future__ import annotations

from compression.configs import RTNConfig
from compression.methods.quant_rtn import compress
from compression.methods.spec import MethodSpec

SPEC = MethodSpec(config_class=RTNConfig, compress=compress, cost=1.0)
