"""`lorafleet artifacts list | show | verify | push | pull | gc`: the artifact store from the command line.

Settings come from the same environment the operator renders into pods (lorafleet.storage.settings). Exit codes:
0 ok, 1 store error (unreachable, credentials, not found...), 3 checksum mismatch, 4 version exists with other
content, 5 incomplete version. Hook into a parser with `register(subparsers)`; standalone:
`python -m lorafleet.storage.cli artifacts ...`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from lorafleet.storage.errors import ChecksumMismatch, IncompleteVersion, StoreError, VersionExists
from lorafleet.storage.layout import Location, VersionFolder, infer_layout
from lorafleet.storage.manifest import BaseModelRef, DatasetRef, check_digest
from lorafleet.storage.settings import StoreSettings
from lorafleet.storage.store import ArtifactStore

EXIT_CODES: list[tuple[type[StoreError], int]] = [
    (ChecksumMismatch, 3),
    (VersionExists, 4),
    (IncompleteVersion, 5),
    (StoreError, 1),
]
_DURATION = re.compile(r"^(\d+)([smhd]?)$")


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `24h`, `7d`; a bare number is seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 30m, 24h or 7d")
    unit = {"": "seconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
    return timedelta(**{unit: int(m.group(1))})


def _digest(text: str) -> str:
    try:
        return check_digest(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _json_arg(text: str) -> dict[str, Any]:
    """Inline JSON, or @path to a JSON file."""
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _store() -> ArtifactStore:
    return ArtifactStore(StoreSettings.from_env())


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# -- commands -------------------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    versions = _store().list_versions(Location.parse(args.uri), include_incomplete=args.all)
    if args.json:
        _print_json(
            [
                {
                    "uri": v.folder.uri,
                    "complete": v.complete,
                    "digest": v.digest,
                    "kind": v.manifest.kind if v.manifest else None,
                    "totalSize": v.manifest.total_size if v.manifest else None,
                    "createdAt": v.manifest.created_at if v.manifest else None,
                    "uploads": v.uploads,
                }
                for v in versions
            ]
        )
        return 0
    for v in versions:
        if v.manifest:
            m = v.manifest
            print(f"{v.folder.uri}  {m.kind}  {_size(m.total_size)}  {m.created_at}  {v.digest}")
        else:
            print(f"{v.folder.uri}  INCOMPLETE (no manifest; uploads: {', '.join(v.uploads)})")
    return 0


def _show(args: argparse.Namespace) -> int:
    folder = VersionFolder.parse(args.uri)
    manifest, digest, _ = _store().read_manifest(folder)
    if args.json:
        _print_json({"uri": folder.uri, "digest": digest, "manifest": manifest.to_json_obj()})
        return 0
    print(f"{folder.uri}\n  digest:   {digest}\n  kind:     {manifest.kind}  {manifest.name} {manifest.version}")
    print(f"  created:  {manifest.created_at} by lorafleet {manifest.lorafleet_version}")
    print(f"  size:     {_size(manifest.total_size)} in {len(manifest.files)} files")
    if manifest.base_model:
        b = manifest.base_model
        print(f"  base:     {b.name}  {b.uri or ''}  {b.digest or ''}".rstrip())
    if manifest.dataset:
        d = manifest.dataset
        pins = [f"sha256:{d.sha256}" if d.sha256 else "", f"versionId {d.version_id}" if d.version_id else ""]
        pins.append(f"etag {d.etag}" if d.etag else "")
        pin = next((p for p in pins if p), "")
        print(f"  dataset:  {d.uri}  {pin or '(unpinned)'}")
    if manifest.trainer_image:
        print(f"  trainer:  {manifest.trainer_image}")
    for title, values in (("hyperparameters", manifest.hyperparameters), ("metrics", manifest.metrics)):
        if values:
            print(f"  {title}: {json.dumps(values, sort_keys=True)}")
    for f in manifest.files:
        print(f"    {f.sha256[:16]}  {_size(f.size):>10}  {f.path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    folder = VersionFolder.parse(args.uri)
    manifest, digest = _store().verify(folder, digest=args.digest)
    print(f"{folder.uri}: {len(manifest.files)} files, {_size(manifest.total_size)} verified; digest {digest}")
    return 0


def _push(args: argparse.Namespace) -> int:
    folder = VersionFolder.parse(args.uri)
    inferred = infer_layout(folder)
    kind, name, version = args.kind, args.name, args.version
    if inferred is not None:
        for flag, given, found in (
            ("--kind", kind, inferred.kind),
            ("--name", name, inferred.name),
            ("--version", version, inferred.version),
        ):
            if given is not None and given != found:
                raise StoreError(f"{flag} {given!r} contradicts the URI {folder.uri} ({found!r})")
        kind, name, version = kind or inferred.kind, name or inferred.name, version or inferred.version
    if not (kind and name and version):
        raise StoreError(
            f"{folder.uri} is not in the layout <root>/adapters|models/<name>/<version>: give --kind, --name and "
            "--version"
        )
    base = (
        BaseModelRef(name=args.base_model, uri=args.base_model_uri, digest=args.base_model_digest)
        if args.base_model
        else None
    )
    dataset = (
        DatasetRef(
            uri=args.dataset,
            sha256=args.dataset_sha256,
            etag=args.dataset_etag,
            version_id=args.dataset_version_id,
        )
        if args.dataset
        else None
    )

    def progress(path: str) -> None:
        print(f"uploaded {path}", file=sys.stderr)

    result = _store().push(
        args.src,
        folder,
        kind=kind,
        name=name,
        version=version,
        base_model=base,
        dataset=dataset,
        hyperparameters=args.hyperparameters,
        metrics=args.metrics,
        trainer_image=args.trainer_image,
        on_file=progress if args.verbose else None,
    )
    state = "pushed" if result.created else "already there (identical content, nothing uploaded)"
    if args.json:
        _print_json(
            {
                "uri": folder.uri,
                "digest": result.digest,
                "created": result.created,
                "totalSize": result.manifest.total_size,
            }
        )
    else:
        print(f"{folder.uri} {result.digest}")
        print(f"{state}: {len(result.manifest.files)} files, {_size(result.manifest.total_size)}", file=sys.stderr)
    return 0


def _pull(args: argparse.Namespace) -> int:
    folder = VersionFolder.parse(args.uri)
    result = _store().pull(folder, args.dest, digest=args.digest)
    print(
        f"{folder.uri} -> {result.dest}: {len(result.manifest.files)} files verified "
        f"({_size(result.downloaded_bytes)} downloaded, {_size(result.reused_bytes)} already there); "
        f"digest {result.digest}"
    )
    return 0


def _gc(args: argparse.Namespace) -> int:
    removed = _store().gc(Location.parse(args.uri), args.older_than, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for uri in removed:
        print(f"{verb} {uri}")
    print(f"{verb} {len(removed)} unreferenced uploads older than {args.older_than}", file=sys.stderr)
    return 0


# -- wiring ---------------------------------------------------------------------------------------------------


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
            return code
        except StoreError as e:
            print(f"error: {e}", file=sys.stderr)
            return next(code for cls, code in EXIT_CODES if isinstance(e, cls))
        except ValueError as e:  # a malformed URI
            print(f"error: {e}", file=sys.stderr)
            return 1

    return wrapped


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `artifacts` to a parser's subcommands (argparse's add_subparsers() result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "artifacts",
        help="list, show, verify, push, pull or gc adapter and model versions in the artifact store",
        description=__doc__.split("\n")[0] + " Settings: LORAFLEET_STORE_* and AWS_* variables (docs/storage.md).",
    )
    sub = parser.add_subparsers(dest="artifacts_command", required=True)

    p = sub.add_parser("list", help="versions under an s3:// root (or under one name)")
    p.add_argument("uri", help="s3://bucket[/prefix]")
    p.add_argument("--all", action="store_true", help="include incomplete versions (no manifest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(_list))

    p = sub.add_parser("show", help="the manifest and lineage of a version")
    p.add_argument("uri", help="s3:// URI of the version folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_run(_show))

    p = sub.add_parser("verify", help="re-hash every remote file against the manifest")
    p.add_argument("uri", help="s3:// URI of the version folder")
    p.add_argument("--digest", type=_digest, help="also require this manifest digest (sha256:...)")
    p.set_defaults(func=_run(_verify))

    p = sub.add_parser("push", help="upload a local folder as an immutable adapter or model version")
    p.add_argument("src", type=Path, help="local folder")
    p.add_argument("uri", help="s3://bucket/prefix/adapters/<name>/<version> (or models/<name>/<revision>)")
    p.add_argument("--kind", choices=["adapter", "model"], help="needed when the URI is outside the layout")
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--base-model", help="lineage: base model name")
    p.add_argument("--base-model-uri")
    p.add_argument("--base-model-digest", type=_digest)
    p.add_argument("--dataset", help="lineage: dataset URI")
    p.add_argument("--dataset-sha256")
    p.add_argument("--dataset-etag")
    p.add_argument("--dataset-version-id")
    p.add_argument("--hyperparameters", type=_json_arg, help="JSON object or @file")
    p.add_argument("--metrics", type=_json_arg, help="JSON object or @file")
    p.add_argument("--trainer-image")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="print each file as it is uploaded")
    p.set_defaults(func=_run(_push))

    p = sub.add_parser("pull", help="download a version into a folder, verifying every file (resumable)")
    p.add_argument("uri", help="s3:// URI of the version folder")
    p.add_argument("dest", type=Path, help="local folder (created)")
    p.add_argument("--digest", type=_digest, help="refuse the version unless its manifest digest is this")
    p.set_defaults(func=_run(_pull))

    p = sub.add_parser("gc", help="remove interrupted or superseded uploads no manifest references")
    p.add_argument("uri", help="s3://bucket[/prefix] or a version folder")
    p.add_argument("--older-than", type=parse_duration, default=timedelta(hours=24), help="age threshold (default 24h)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=_run(_gc))
    return parser


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
