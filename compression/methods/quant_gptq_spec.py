"""The job pipeline's view of `quant_gptq`: its config and `compress`, no job-level hooks."""

from __future__ import annotations

from compression.configs import GPTQConfig
from compression.methods.quant_gptq import compress
from compression.methods.spec import MethodSpec

SPEC = MethodSpec(config_class=GPTQConfig, compress=compress, cost=3.0)
