"""The job pipeline's view of `quant_decoupleq`: its config and `compress`, no job-level hooks."""

from __future__ import annotations

from compression.configs import DecoupleQConfig
from compression.methods.quant_decoupleq import compress
from compression.methods.spec import MethodSpec

SPEC = MethodSpec(config_class=DecoupleQConfig, compress=compress, cost=8.0)
