"""The job pipeline's view of `prune_unstructured`: its config and `compress`, no job-level hooks."""

from __future__ import annotations

from compression.configs import PruneUnstructuredConfig
from compression.methods.prune_unstructured import compress
from compression.methods.spec import MethodSpec

SPEC = MethodSpec(config_class=PruneUnstructuredConfig, compress=compress, cost=1.0)
