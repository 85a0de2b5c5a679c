"""What the controller is given to run: one plan per deployment of an application.

Depends only on ``_config``, so the controller never imports the user-facing layer
(``_deployment`` builds these from a bound application).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet._config import DeploymentConfig

# Options whose change does not need new replicas.
LIVE_OPTIONS = frozenset({"num_replicas", "user_config", "autoscaling_config",
                          "logging_config"})


@dataclass
class DeploymentPlan:
    """One deployment of an application, ready for the controller."""

    name: str
    config: DeploymentConfig
    serialized_def: bytes
    code_version: str
    ingress: bool = False
    legacy_refs: bool = False
    oip: dict[str, Any] | None = None   # fleet.oip.model's metadata, if it is one
    calls: tuple[str, ...] = ()         # deployments it holds handles to (the graph)

    @property
    def version(self) -> str:
        """Changes when replicas must be replaced (code, arguments or restart options)."""
        opts = self.config.model_dump(exclude=set(LIVE_OPTIONS))
        h = hashlib.sha1(self.code_version.encode())
        h.update(repr(sorted(opts.items())).encode())
        return h.hexdigest()[:12]
