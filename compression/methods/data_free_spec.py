"""The job pipeline's view of `data_free`: its config and `compress`, no job-level hooks."""

from __future__ import annotations

from compression.configs import DataFreeConfig
from compression.methods.data_free import compress
from compression.methods.spec import MethodSpec

SPEC = MethodSpec(config_class=DataFreeConfig, compress=compress, cost=1.0)
