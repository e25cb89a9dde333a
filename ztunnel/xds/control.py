"""The agent's side of istiod as one part for the composition root: the xDS client (when
`--xds-address` is set) and the Istio CA source (when `--ca-address` is set), with what
readiness waits for and what `/config_dump` shows about them."""

from __future__ import annotations

from typing import Any

from prometheus_client.registry import CollectorRegistry

from ztunnel.config import Settings
from ztunnel.istioca import IstioCaSource
from ztunnel.state import WorkloadStore
from ztunnel.xds.client import XdsClient
from ztunnel.xds.config import istiod_config


class ControlPlane:
    def __init__(self, settings: Settings, store: WorkloadStore, registry: CollectorRegistry):
        self.config = istiod_config(settings)
        self.xds = XdsClient(self.config, store, registry) if self.config.xds else None
        self.ca = IstioCaSource(self.config) if self.config.ca else None

    async def run(self) -> None:
        """Keep the xDS stream (the CA is asked on demand: nothing to run for it)."""
        if self.xds is not None:
            await self.xds.run()

    def pending(self) -> list[str]:
        """Readiness: the first complete sync of both xDS types."""
        return self.xds.pending() if self.xds is not None else []

    def status(self) -> dict[str, Any]:
        return {
            "xds": self.xds.status() if self.xds is not None else None,
            "ca": self.ca.status() if self.ca is not None else None,
            "token": self.config.token.describe(),
            "cluster_id": self.config.cluster_id,
        }

    async def close(self) -> None:
        if self.xds is not None:
            self.xds.stop()
        if self.ca is not None:
            await self.ca.close()
