"""The command as users drive it: namespaces, thresholds, suppression, output formats, bad
input and bad usage, each with istioctl's exit code and never a traceback."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.unit.analyze.conftest import Analyze
from ztunnel import cli

pytestmark = pytest.mark.unit

REFERENCE = "https://istio.io/latest/docs/reference/config/analysis"


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_only_the_selected_namespace_is_reported(analyze: Analyze) -> None:
    # ist0127-positive.yaml has findings in shop, empty and istio-system.
    r = analyze("-n", "shop", "ist0127-positive.yaml")
    assert [line.split(")")[0] for line in r.lines] == [
        "Warning [IST0127] (AuthorizationPolicy shop/ratings-viewer ist0127-positive.yaml:22"
    ]
    r = analyze("ist0127-positive.yaml")  # default namespace: nothing there
    assert (r.rc, r.out) == (0, "\n")
    assert r.err == "\u2714 No validation issues found when analyzing ist0127-positive.yaml.\n"


def test_a_namespace_resource_belongs_to_its_own_namespace(analyze: Analyze) -> None:
    r = analyze("-n", "shop", "ambient-sidecar-positive.yaml")
    assert [line.split(" ")[1] for line in r.lines] == ["[IST0123]", "[ZTN0001]"]


def test_resources_without_namespace_take_the_selected_one(analyze: Analyze) -> None:
    r = analyze("-n", "web", "ist0112-positive.yaml")
    assert r.lines[0].startswith("Error [IST0112] (VirtualService web/ratings ")


def test_failure_threshold_and_output_threshold(analyze: Analyze) -> None:
    r = analyze("-A", "--failure-threshold", "warning", "ist0127-positive.yaml")
    assert r.rc == 79
    assert r.err.startswith("Error: Analyzers found issues when analyzing all namespaces.")
    r = analyze("-A", "--output-threshold", "Warning", "ist0118-positive.yaml")
    assert [line[:17] for line in r.lines] == ["Warning [IST0150]"]  # no Info lines...
    assert (r.rc, r.err) == (0, "")
    r = analyze("-A", "--output-threshold", "Error", "ist0118-positive.yaml")
    assert (r.rc, r.out) == (0, "\n")
    assert r.err == "\u2714 No validation issues found when analyzing ist0118-positive.yaml.\n"
    r = analyze("-A", "--output-threshold", "ERROR", "ist0173-positive.yaml")
    assert [line[:15] for line in r.lines] == ["Error [IST0173]"]  # ...nor the warning
    assert r.rc == 79


def test_suppress_by_code_and_resource_with_wildcards(analyze: Analyze) -> None:
    r = analyze("-A", "-S", "IST0127=AuthorizationPolicy shop/*", "ist0127-positive.yaml")
    assert len(r.lines) == 2 and "shop/" not in r.out
    # istioctl's help still shows the older `Kind name.namespace` form: accepted too.
    r = analyze(
        "-A",
        "-S",
        "IST0127=AuthorizationPolicy *.istio-system",
        "--suppress",
        "IST0127=AuthorizationPolicy empty/allow-nothing",
        "ist0127-positive.yaml",
    )
    assert len(r.lines) == 1 and "shop/ratings-viewer" in r.out
    r = analyze("-A", "-S", "IST0109=VirtualService *", "ist0109-positive.yaml")
    assert (r.rc, r.out) == (0, "\n")


def test_suppress_annotation_on_the_resource(analyze: Analyze, tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "svc.yaml",
        """
        apiVersion: v1
        kind: Service
        metadata:
          name: legacy
          annotations: {galley.istio.io/analyze-suppress: "IST0118,IST0101"}
        spec:
          ports: [{name: web, port: 80}]
        """,
    )
    assert analyze(f).out == "\n"


def test_unknown_suppressed_code_is_warned_about(analyze: Analyze) -> None:
    r = analyze("-S", "IST9999=Pod *", "ist0109-negative.yaml")
    assert r.err.startswith(
        "Warning: Supplied message code 'IST9999' is an unknown message code and will not "
        "have any effect.\n"
    )
    assert r.rc == 0
    # a real Istio code this tool does not report is known: no warning
    assert "Warning" not in analyze("-S", "IST0103=Pod *", "ist0109-negative.yaml").err


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "xml", "a.yaml"],
        ["--failure-threshold", "fatal"],
        ["--output-threshold", ""],
        ["-n", "a", "-A"],
        ["-S", "IST0101"],
        ["-S", "IST0101=a=b"],
        ["--no-such-flag"],
        ["--timeout", "soon"],
    ],
)
def test_bad_usage_exits_64(analyze: Analyze, args: list[str]) -> None:
    r = analyze(*args)
    assert r.rc == 64
    assert r.err.startswith("Error: ") and r.err.endswith(
        "Run 'ztunnel analyze --help' for usage.\n"
    )
    assert r.out == ""


def test_missing_input_is_an_error_not_a_traceback(analyze: Analyze) -> None:
    r = analyze("no-such-file.yaml")
    assert (r.rc, r.out) == (1, "")
    assert r.err == "Error: stat no-such-file.yaml: no such file or directory\n"


def test_invalid_yaml_names_file_and_line_and_exits_65(analyze: Analyze) -> None:
    r = analyze("invalid.yaml")
    assert r.rc == 65
    assert r.out == "\n"
    assert r.err == (
        "Error(s) adding files: 1 error occurred:\n"
        "\t* invalid.yaml: line 7, column 7: invalid YAML: expected ',' or ']', but got ':'\n"
        "\n"
        "No validation issues found when analyzing namespace: default (but 1 file could not "
        "be parsed).\n"
        "Error: Some files couldn't be parsed.\n"
    )
    assert analyze("--ignore-unknown", "invalid.yaml").rc == 0


def test_issues_found_win_over_unparsable_files(analyze: Analyze) -> None:
    r = analyze("invalid.yaml", "ist0109-positive.yaml")
    assert r.rc == 79
    assert "Error(s) adding files" in r.err and "couldn't be parsed" not in r.err
    assert len(r.lines) == 2


def test_unknown_kinds_and_documents_without_api_version(analyze: Analyze) -> None:
    r = analyze("ist0106-positive.yaml")
    assert (
        'Skipping ist0106-positive.yaml:31: ConfigMap "settings" is not analyzed '
        "(kind not modelled)\n" in r.err
    )
    assert "\t* ist0106-positive.yaml:37: apiVersion: is required\n" in r.err
    assert [line[:15] for line in r.lines] == ["Error [IST0106]", "Error [IST0106]"]
    assert r.rc == 79


def test_json_output_has_istioctls_shape_and_exit_code(analyze: Analyze) -> None:
    r = analyze("-o", "json", "ist0112-positive.yaml")
    assert json.loads(r.out) == [
        {
            "code": "IST0112",
            "documentationUrl": f"{REFERENCE}/ist0112/?ref=istioctl-analyze",
            "level": "Error",
            "message": 'This VirtualService routes to a service "ratings" that exposes multiple '
            "ports [9080 9090]. Specifying a port in the destination is required to "
            "disambiguate.",
            "origin": "VirtualService default/ratings",
            "reference": "ist0112-positive.yaml:10",
        }
    ]
    assert r.out.startswith('[\n\t{\n\t\t"code": "IST0112",\n')  # MarshalIndent("", "\t")
    assert r.rc == 0  # istioctl sets the exit code in log format only
    assert r.err == ""


def test_json_escapes_html_as_go_does_and_empty_is_a_list(analyze: Analyze, tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "a.yaml",
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: a}
        spec:
          hosts: [a]
          http:
          - route: [{destination: {host: "b&c"}}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: a}
        spec: {ports: [{name: http, port: 80}]}
        """,
    )
    out = analyze("-o", "json", f).out
    assert '"message": "Referenced host not found: \\"b\\u0026c\\""' in out
    r = analyze("-o", "json", "ist0109-negative.yaml")
    assert (r.out, r.rc) == ("[]\n", 0)


def test_yaml_output(analyze: Analyze) -> None:
    r = analyze("-o", "yaml", "ist0101-subset-positive.yaml", "-n", "bookinfo")
    assert yaml.safe_load(r.out) == [
        {
            "code": "IST0101",
            "documentationUrl": f"{REFERENCE}/ist0101/?ref=istioctl-analyze",
            "level": "Error",
            "message": 'Referenced host+subset in destinationrule not found: "reviews+v3"',
            "origin": "VirtualService bookinfo/reviews",
            "reference": "ist0101-subset-positive.yaml:11",
        }
    ]
    assert r.out.startswith("- code: IST0101\n  documentationUrl: ")
    assert analyze("-o", "yaml", "ist0109-negative.yaml").out == "[]\n\n"


def test_json_file_references_have_no_line(analyze: Analyze, tmp_path: Path) -> None:
    f = tmp_path / "ratings.json"
    f.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "ratings"},
                "spec": {"ports": [{"name": "web", "port": 80}]},
            },
            indent=2,
        )
    )
    r = analyze(str(f))
    assert r.lines == [
        f"Info [IST0118] (Service default/ratings {f}) Port name web (port: 80, "
        "targetPort: 80) doesn't follow the naming convention of Istio port."
    ]


def test_directories_are_read_recursively_and_other_files_skipped(
    analyze: Analyze, tmp_path: Path
) -> None:
    write(tmp_path, "b/vs.yaml", (Path("ist0109-positive.yaml")).read_text())
    write(tmp_path, "a/notes.txt", "not config\n")
    write(
        tmp_path,
        "a/clean.yml",
        (Path("ist0109-negative.yaml")).read_text().replace("helloworld", "other"),
    )
    r = analyze(str(tmp_path))
    assert r.rc == 79
    assert (
        f"Skipping file {tmp_path}/a/notes.txt, recognized file extensions are: [.json .yaml .yml]"
        in r.err
    )
    assert [line[:15] for line in r.lines] == ["Error [IST0109]", "Error [IST0109]"]
    clean = analyze(f"{tmp_path}/a")
    assert clean.err.endswith(
        f"\u2714 No validation issues found when analyzing {tmp_path}/a/clean.yml.\n"
    )


def test_several_clean_files_are_listed(analyze: Analyze) -> None:
    r = analyze("ist0109-negative.yaml", "ist0130-negative.yaml")
    assert r.err == (
        "\u2714 No validation issues found when analyzing:\n"
        "  - ist0109-negative.yaml\n  - ist0130-negative.yaml\n"
    )


def test_list_and_verbose(analyze: Analyze) -> None:
    listing = analyze("-L").out
    assert (
        "* virtualservice.ConflictingMeshGatewayHostsAnalyzer:\n    Checks if multiple" in listing
    )
    assert "* ambient.WaypointBindingAnalyzer:\n" in listing
    r = analyze("-v", "ist0109-positive.yaml")
    assert r.err.startswith("Analyzed resources in namespace: default\nSkipped analyzers:\n")
    # files without Services: the analyzers that need them are skipped, as istioctl's are
    skipped = r.err.split("Executed analyzers:")[0]
    assert "\t virtualservice.DestinationHostAnalyzer\n" in skipped
    assert "\t virtualservice.ConflictingMeshGatewayHostsAnalyzer\n" not in skipped


def test_color_only_when_asked_or_on_a_terminal(analyze: Analyze) -> None:
    r = analyze("--color", "ist0109-positive.yaml")
    assert r.lines[0].startswith("\033[1;31mError\033[0m [IST0109] ")
    assert analyze("ist0109-positive.yaml").lines[0].startswith("Error [IST0109] ")


def test_ztunnel_cli_hands_analyze_its_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.analyze.conftest import TESTDATA

    monkeypatch.chdir(TESTDATA)
    assert cli.main(["analyze", "ist0109-positive.yaml"]) == 79
    assert cli.main(["analyze", "--bogus"]) == 64
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "analyze" in capsys.readouterr().out
