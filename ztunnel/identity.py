"""SPIFFE identities of mesh workloads: `spiffe://<trust domain>/ns/<namespace>/sa/<account>`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztunnel.errors import IdentityError

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"

_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%-]+$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A workload identity in Istio's SPIFFE form."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise IdentityError(f"invalid trust domain {self.trust_domain!r}")
        for part, value in (
            ("namespace", self.namespace),
            ("service account", self.service_account),
        ):
            if not value or not _SEGMENT.match(value):
                raise IdentityError(f"invalid {part} {value!r} in SPIFFE identity")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse `spiffe://td/ns/N/sa/S`; anything else raises IdentityError."""
        if not uri.startswith("spiffe://"):
            raise IdentityError(f"not a SPIFFE URI: {uri!r}")
        rest = uri[len("spiffe://") :]
        parts = rest.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(f"SPIFFE URI is not of the form spiffe://TD/ns/N/sa/S: {uri!r}")
        return cls(parts[0], parts[2], parts[4])

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The identity as authorization policies name it: the URI without `spiffe://`."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri
