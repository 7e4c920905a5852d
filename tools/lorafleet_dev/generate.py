"""Every generated file of the repository, written by one command: ``hack/generate``; ``hack/generate --check``
exits 1 naming each stale file (hack/test.sh runs it after lint).

* ``crds/``, ``charts/lorafleet/crds/``, ``deploy/crds/``: the CRDs generated from lorafleet.api
  (``lorafleet.api.kinds.crd_files``, what ``lorafleet crds`` prints for users).
* ``deploy/operator.yaml``: the Helm chart's default render as plain YAML, the kustomize base for GitOps without
  Helm (rendered by the pinned helm, built into ~/.cache/lorafleet on first use by lorafleet_dev.build).
* ``tests/unit/golden/``: what each child-object builder renders
  (``tests.unit.test_builders_golden.golden_files``, the very function the golden test compares against).

A generated folder holds generated files only: a file there that nothing generates any more (a removed kind or
case) is stale too, and writing removes it. ``charts/lorafleet/values.schema.json`` is written by hand (the chart
tests check it against values.yaml).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafleet_dev.paths import CHART, REPO

KUBE_VERSION = "1.34.4"  # the local cluster's (lorafleet_dev.build); helm built from source reports v1.20 unless told
RELEASE = "lorafleet"
NAMESPACE = "lorafleet-system"
OPERATOR_YAML_HEADER = """\
# Generated from charts/lorafleet with its default values (release "lorafleet", namespace lorafleet-system) by
# `hack/generate`; tests/integration/test_chart_kustomize.py checks deploy/ against the chart.
"""


@dataclass(frozen=True)
class Target:
    """Files generated into one folder; ``exclusive``: every ``*.yaml`` there is generated."""

    folder: str  # relative to the repository root
    files: Callable[[], dict[str, str]]  # file name -> text
    exclusive: bool


def crd_files() -> dict[str, str]:
    from lorafleet.api.kinds import crd_files

    return crd_files()


def helm_binary() -> Path:
    from lorafleet_dev.build import Builder

    return Builder(log=lambda line: print(line, file=sys.stderr)).ensure(["helm"])["helm"]


def chart_as_plain_yaml(helm: Path | None = None) -> str:
    """The chart's default render without Helm's own bookkeeping (the chart label, managed-by Helm)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    proc = subprocess.run([str(helm or helm_binary()), *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    lines = []
    for line in proc.stdout.splitlines():
        if line.startswith("# Source:") or "helm.sh/chart:" in line:
            continue
        lines.append(line.replace("app.kubernetes.io/managed-by: Helm", "app.kubernetes.io/managed-by: kustomize"))
    body = "\n".join(lines).strip().removeprefix("---").lstrip("\n")
    return OPERATOR_YAML_HEADER + body + "\n"


def golden_files() -> dict[str, str]:
    # The golden cases build their inputs with tests/unit/objects.py: they live with the tests, in the checkout.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module("tests.unit.test_builders_golden")
    files: dict[str, str] = module.golden_files()
    return files


TARGETS = (
    Target("crds", crd_files, exclusive=True),
    Target("charts/lorafleet/crds", crd_files, exclusive=True),
    Target("deploy/crds", crd_files, exclusive=True),
    Target("deploy", lambda: {"operator.yaml": chart_as_plain_yaml()}, exclusive=False),
    Target("tests/unit/golden", golden_files, exclusive=True),
)


def expected(repo: Path = REPO, targets: Sequence[Target] = TARGETS) -> tuple[dict[Path, str], list[Path]]:
    """(every generated path -> its text, the generated files that nothing generates any more)."""
    files: dict[Path, str] = {}
    leftovers: list[Path] = []
    for target in targets:
        folder = repo / target.folder
        wanted = {folder / name: text for name, text in target.files().items()}
        files.update(wanted)
        if target.exclusive:
            leftovers += sorted(p for p in folder.glob("*.yaml") if p not in wanted)
    return files, leftovers


def stale(files: dict[Path, str], leftovers: list[Path]) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for path, text in files.items():
        if not path.exists():
            out.append((path, "missing"))
        elif path.read_text() != text:
            out.append((path, "differs from what is generated"))
    out += [(path, "no longer generated") for path in leftovers]
    return out


def main(argv: Sequence[str] | None = None, repo: Path = REPO, targets: Sequence[Target] = TARGETS) -> int:
    parser = argparse.ArgumentParser(prog="hack/generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale file")
    args = parser.parse_args(argv)
    files, leftovers = expected(repo, targets)
    found = stale(files, leftovers)
    if args.check:
        for path, why in found:
            print(f"hack/generate: stale: {path.relative_to(repo)} ({why})", file=sys.stderr)
        if found:
            print(
                f"hack/generate: {len(found)} generated file(s) stale; run `hack/generate` and commit the result",
                file=sys.stderr,
            )
            return 1
        return 0
    for path, why in found:
        if path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path])
            print(f"wrote {path.relative_to(repo)}")
        else:
            path.unlink()
            print(f"removed {path.relative_to(repo)} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
