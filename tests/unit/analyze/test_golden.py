"""Golden tests: each analyzer on a fixture where it must speak (exact output lines, kept in
`testdata/<fixture>.golden`, reviewed against istioctl's templates) and on one where it must
stay silent; and the example people hit first, checked line for line against istioctl."""

from __future__ import annotations

import pytest

from tests.unit.analyze.conftest import TESTDATA, Analyze
from ztunnel.analyze import kube

pytestmark = pytest.mark.unit

REFERENCE = "https://istio.io/latest/docs/reference/config/analysis"
ISSUES = (
    "Error: Analyzers found issues when analyzing all namespaces.\n"
    f"See {REFERENCE} for more information about causes and resolutions.\n"
)

# (fixture, exit code): 79 where an Error is found, 0 where only warnings/info are.
POSITIVE = [
    ("ist0101-host-positive", 79),
    ("ist0101-subset-positive", 79),
    ("ist0101-gateway-positive", 79),
    ("ist0101-namespace-positive", 79),
    ("ist0106-positive", 79),
    ("ist0109-positive", 79),
    ("ist0112-positive", 79),
    ("ist0118-positive", 0),
    ("ist0127-positive", 0),
    ("ist0130-positive", 0),
    ("ist0133-positive", 0),
    ("ist0140-positive", 0),
    ("ist0173-positive", 79),
    ("ambient-l7-policy-positive", 0),
    ("ambient-waypoint-positive", 79),
    ("ambient-sidecar-positive", 0),
    ("ambient-waypoint-routes-positive", 0),
    ("conditions-positive", 0),
]
NEGATIVE = sorted(p.stem for p in TESTDATA.glob("*-negative.yaml"))


@pytest.mark.parametrize(("fixture", "rc"), POSITIVE)
def test_positive_fixture_prints_exactly_the_golden_lines(
    analyze: Analyze, fixture: str, rc: int
) -> None:
    r = analyze("-A", f"{fixture}.yaml")
    golden = (TESTDATA / f"{fixture}.golden").read_text()
    assert r.lines == golden.splitlines()
    assert r.out == golden  # the block, then the newline istioctl's Println adds
    assert r.rc == rc
    assert r.err.endswith(ISSUES) == (rc == 79)


@pytest.mark.parametrize("fixture", NEGATIVE)
def test_negative_fixture_is_clean(analyze: Analyze, fixture: str) -> None:
    r = analyze("-A", f"{fixture}.yaml")
    assert (r.rc, r.out) == (0, "\n")
    assert r.err == f"\u2714 No validation issues found when analyzing {fixture}.yaml.\n"


def test_every_analyzer_family_has_both_fixtures() -> None:
    positives = {f.removesuffix("-positive") for f, _ in POSITIVE}
    negatives = {f.removesuffix("-negative") for f in NEGATIVE}
    assert positives == negatives


VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
  namespace: default
spec:
  hosts:
  - helloworld.default.svc.cluster.local
  http:
  - route:
    - destination:
        host: helloworld.default.svc.cluster.local
"""
HELLOWORLD = VS.format(name="helloworld-v1") + "---\n" + VS.format(name="helloworld-v2")
CONFLICT = (
    "The VirtualServices default/helloworld-v1,default/helloworld-v2 associated with mesh "
    "gateway define the same host */helloworld.default.svc.cluster.local which can lead to "
    "undefined behavior. This can be fixed by merging the conflicting VirtualServices into a "
    "single resource."
)


def test_two_virtual_services_for_one_host_as_istioctl_prints_it(analyze: Analyze) -> None:
    """istioctl: one IST0109 per VirtualService naming both, sorted by name, the `*/` scope
    before the FQDN (istio/istio#42561 and #39634 show it verbatim), the summary on stderr
    (cobra's `Error: ` + AnalyzerFoundIssuesError), exit 79. From a file, the origin also
    names file:line of metadata.name; from stdin the file is `-`."""
    r = analyze("-", stdin=HELLOWORLD)
    assert r.out == (
        f"Error [IST0109] (VirtualService default/helloworld-v1 -:4) {CONFLICT}\n"
        f"Error [IST0109] (VirtualService default/helloworld-v2 -:17) {CONFLICT}\n"
    )
    assert r.err == (
        "Error: Analyzers found issues when analyzing namespace: default.\n"
        f"See {REFERENCE} for more information about causes and resolutions.\n"
    )
    assert r.rc == 79


def test_the_same_from_the_cluster_has_no_file_reference(analyze: Analyze) -> None:
    import yaml

    items = [dict(d) for d in yaml.safe_load_all(HELLOWORLD)]

    listed = {
        "VirtualService": [
            {k: v for k, v in i.items() if k not in ("apiVersion", "kind")} for i in items
        ],
        "Namespace": [{"metadata": {"name": "default"}}],
        "Service": [
            {
                "metadata": {"name": "helloworld", "namespace": "default"},
                "spec": {"ports": [{"name": "http", "port": 5000, "targetPort": 5000}]},
            }
        ],
    }

    def fetch(spec: kube.KubeList, token: str) -> dict[str, object]:
        return {"items": listed.get(spec.kind, [])}

    r = analyze("--kube", fetch=fetch)
    assert r.lines == [
        f"Error [IST0109] (VirtualService default/helloworld-v1) {CONFLICT}",
        f"Error [IST0109] (VirtualService default/helloworld-v2) {CONFLICT}",
    ]
    assert r.rc == 79
