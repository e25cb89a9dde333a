"""`ztunnel analyze`: the command-line adapter. Reads files and, with `--kube`, the cluster;
parses them once with the config model; runs the analyzers; prints as `istioctl analyze`
does and exits as it does: 0 clean (or below `--failure-threshold`), 79 issues found, 65 some
input could not be parsed, 64 bad usage, 1 the input or the cluster could not be read."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import IO, NoReturn

from ztunnel.analyze import engine, kube, output, sources
from ztunnel.analyze.messages import KNOWN_CODES, Level
from ztunnel.meshconfig.load import ConfigOptions, parse_documents
from ztunnel.meshconfig.resource import ResourceError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_ISSUES = 79


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


EXAMPLES = """\
examples:
  # Analyze configuration files (directories are read recursively)
  ztunnel analyze a.yaml b.yaml my-app-config/

  # Analyze the live cluster, with files applied on top of it
  ztunnel analyze --kube my-change.yaml

  # Every namespace; suppress a code for some resources
  ztunnel analyze -A -S "IST0118=Service default/*" config/
"""


def build_parser(prog: str = "ztunnel analyze") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Analyze Istio and mesh configuration and print validation messages in "
        "istioctl's words (codes, texts, output and exit codes). For more information about "
        "message codes, refer to: https://istio.io/latest/docs/reference/config/analysis",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="*", metavar="FILE|DIR", help="YAML/JSON files; - for stdin")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        help="namespace to analyze, and of resources in files that name none (default: the "
        "kubeconfig context's with --kube, else default)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="analyze all namespaces")
    p.add_argument("--kube", action="store_true", help="also read the live cluster")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per API request (default 30)"
    )
    p.add_argument("-o", "--output", default="log", choices=output.FORMATS, help="output format")
    levels = [lv.label for lv in Level]
    p.add_argument(
        "--failure-threshold",
        type=_level,
        default=Level.ERROR,
        metavar="LEVEL",
        help=f"severity at which to exit non-zero: {', '.join(levels)} (default Error)",
    )
    p.add_argument(
        "--output-threshold",
        type=_level,
        default=Level.INFO,
        metavar="LEVEL",
        help=f"severity at which to print messages: {', '.join(levels)} (default Info)",
    )
    p.add_argument(
        "-S",
        "--suppress",
        action="append",
        default=[],
        metavar="CODE=RESOURCE",
        help='suppress a code on resources, e.g. "IST0118=Service default/*" (repeatable)',
    )
    p.add_argument("--root-namespace", default="istio-system", help="the mesh's root namespace")
    p.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    p.add_argument(
        "--color",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="color the levels (default: when stdout is a terminal and TERM is not dumb)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list the analyzers run/skipped")
    p.add_argument(
        "-L", "--list-analyzers", action="store_true", help="list the analyzers and exit"
    )
    p.add_argument(
        "--ignore-unknown",
        action="store_true",
        help="do not fail (65) because some input could not be parsed",
    )
    return p


def _level(text: str) -> Level:
    try:
        return Level.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid level option") from None


def list_analyzers() -> str:
    lines = []
    for a in sorted(engine.ALL, key=lambda a: a.name):
        lines.append(f"* {a.name}:\n    {a.description}\n")
    return "".join(lines)


def main(
    argv: Sequence[str],
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    fetch: kube.Fetch | None = None,
) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
        suppressions = [engine.Suppression.parse(s) for s in args.suppress]
    except (UsageError, ValueError) as e:
        print(f"Error: {e}\nRun 'ztunnel analyze --help' for usage.", file=err)
        return EXIT_USAGE
    if args.list_analyzers:
        out.write(list_analyzers())
        return EXIT_OK
    for s in suppressions:
        if s.code not in KNOWN_CODES:
            print(
                f"Warning: Supplied message code '{s.code}' is an unknown message code and will "
                "not have any effect.",
                file=err,
            )
    return _Run(args, suppressions, stdin, out, err, fetch).run()


class _Run:
    def __init__(
        self,
        args: argparse.Namespace,
        suppressions: list[engine.Suppression],
        stdin: IO[str],
        out: IO[str],
        err: IO[str],
        fetch: kube.Fetch | None,
    ) -> None:
        self.args = args
        self.suppressions = suppressions
        self.stdin = stdin
        self.out = out
        self.err = err
        self.fetch = fetch

    def say(self, text: str) -> None:
        print(text, file=self.err)

    def read_stdin(self) -> str:
        if self.stdin.isatty() and self.args.output == "log":
            print("Reading from stdin:", file=self.out)
        return self.stdin.read()

    def run(self) -> int:
        args = self.args
        try:
            inputs = sources.gather(args.files, self.read_stdin, self.say)
        except sources.SourceError as e:
            self.say(f"Error: {e}")
            return EXIT_ERROR
        context_namespace = ""
        cluster: kube.ClusterSnapshot | None = None
        if args.kube:
            try:
                fetch = self.fetch
                if fetch is None:
                    api, context_namespace = kube.connect(args.kubeconfig, args.context)
                    fetch = kube.ClientFetcher(api, args.timeout)
                cluster = kube.snapshot(fetch)
            except kube.KubeError as e:
                self.say(f"Error: {e}")
                return EXIT_ERROR
        namespace: str | None = None
        if not args.all_namespaces:
            namespace = args.namespace or context_namespace or "default"
        defaults_ns = namespace or "default"
        if cluster is not None and namespace is not None and "Namespace" in cluster.available:
            listed = {
                d.obj.get("metadata", {}).get("name")
                for d in cluster.documents
                if d.obj.get("kind") == "Namespace"
            }
            if namespace not in listed:
                self.say(f'namespace "{namespace}" not found')
                return EXIT_OK
        file_docs, file_errors = sources.read_documents(inputs)
        docs = sources.overlay(cluster.documents if cluster else [], file_docs, defaults_ns)
        docs = sources.without_ignored(docs, defaults_ns)
        options = ConfigOptions(
            root_namespace=args.root_namespace,
            domain=args.cluster_domain,
            default_namespace=defaults_ns,
            analysis_kinds=True,
        )
        resource_errors: list[ResourceError] = []
        cs = parse_documents(docs, options, resource_errors)
        bad_files = {e.split(":", 1)[0] for e in file_errors}
        for bad in resource_errors:
            if bad.meta is None:  # not a resource: the document could not be understood
                file_errors.append(str(bad))
                bad_files.add(bad.file)
        if file_errors:
            self.err.write(output.adding_files_errors(file_errors))
        for s in cs.skipped:
            if s.file != kube.CLUSTER:
                what = f'{s.kind} "{s.name}"' if s.kind else "document"
                self.say(f"Skipping {s.file}:{s.line}: {what} is not analyzed ({s.reason})")
        available = engine.available_kinds(cs, cluster.available if cluster else ())
        result = engine.analyze(
            cs,
            available,
            parse_errors=resource_errors,
            namespace=namespace,
            suppressions=self.suppressions,
        )
        if args.verbose:
            self._verbose(namespace, result)
        shown = [m for m in result.messages if m.level.at_least(args.output_threshold)]
        color = args.color if args.color is not None else _color_default(self.out)
        print(output.render(shown, args.output, color), file=self.out)
        if not shown:
            names = [i.name for i in inputs]
            self.say(output.no_issues(namespace, names, len(bad_files)))
        # As istioctl, the exit code reflects issues only in log format (json/yaml: 0).
        if args.output != "log":
            return EXIT_OK
        if any(m.level.at_least(args.failure_threshold) for m in result.messages):
            self.say(output.issues_found(namespace))
            return EXIT_ISSUES
        if bad_files and not args.ignore_unknown:
            self.say(f"Error: {output.FILE_PARSE_ERROR}")
            return EXIT_DATA
        return EXIT_OK

    def _verbose(self, namespace: str | None, result: engine.Result) -> None:
        self.say(f"Analyzed resources in {output.target(namespace)}")
        if result.skipped:
            self.say("Skipped analyzers:")
            for name in result.skipped:
                self.say(f"\t {name}")
        if result.executed:
            self.say("Executed analyzers:")
            for name in result.executed:
                self.say(f"\t {name}")
        self.say("")


def _color_default(stream: IO[str]) -> bool:
    if os.environ.get("TERM", "").lower() == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `analyze` in `ztunnel --help`; `ztunnel.cli.main` hands its arguments to
    `main` before argparse sees them (analyze has its own exit codes, 64 for usage)."""
    p = sub.add_parser(
        "analyze",
        help="find configuration mistakes, in istioctl analyze's words",
        add_help=False,
    )
    p.set_defaults(func=lambda _args: main(["--help"]))
