"""Identity-based L4 authorization: the policy model, its parsing and the decision engine.

`policy` holds the frozen model (mirroring `istio.security.Authorization`) and
`select_policies`; `config` reads policies from local configuration (`istio` converts Istio
`AuthorizationPolicy`/`PeerAuthentication` resources); `engine` holds the indexed
`Authorizer` and its `Decision`; `explain` says why a connection got its verdict. No I/O here.
"""

from ztunnel.authz.config import parse_istio_resources, parse_local_policies, policy_to_dict
from ztunnel.authz.engine import Authorizer, Decision, DecisionReason, decide_naive
from ztunnel.authz.explain import Explanation
from ztunnel.authz.policy import (
    Action,
    AuthorizationPolicy,
    Clause,
    ConnectionAttrs,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
    WorkloadSelector,
    select_policies,
)

__all__ = [
    "Action",
    "AuthorizationPolicy",
    "Authorizer",
    "Clause",
    "ConnectionAttrs",
    "Decision",
    "DecisionReason",
    "Explanation",
    "Match",
    "Rule",
    "Scope",
    "ServiceAccountMatch",
    "StringMatch",
    "StringMatchKind",
    "WorkloadSelector",
    "decide_naive",
    "parse_istio_resources",
    "parse_local_policies",
    "policy_to_dict",
    "select_policies",
]
