"""A real S3 server for tests and benchmarks: MinIO built from source through the Go module proxy.

    python -m lorafleet_dev.s3server build    # build (once) into ${LORAFLEET_CACHE:-~/.cache/lorafleet}/bin/
    python -m lorafleet_dev.s3server up       # start on 127.0.0.1, a free port, a temp dir; prints env to use
    python -m lorafleet_dev.s3server env      # print the env of the running server again (eval "$(...)")
    python -m lorafleet_dev.s3server status
    python -m lorafleet_dev.s3server down     # stop it and remove its data

MinIO publishes no semver tags on the Go module proxy, so the version is a pseudo-version of a commit on its
main branch. ``go install module@version`` refuses modules whose go.mod has replace directives (minio 13713: older
releases had some); the pinned one has none, and if a newer one does, the build goes through a wrapper module
that copies the non-local replace directives (as ``lorafleet_dev.build`` does for Kubernetes). See docs/storage.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorafleet_dev.build import BuildError, cache_dir

MINIO_MODULE = "github.com/minio/minio"
# MinIO's main branch of 2026-02-12 (commit 7aac2a2c5b7c); its go.mod has no replace directives.
MINIO_VERSION = os.environ.get("LORAFLEET_MINIO_VERSION", "v0.0.0-20260212201848-7aac2a2c5b7c")
DEFAULT_ACCESS_KEY = "lorafleet"

_REPLACE_BLOCK = re.compile(r"^replace\s*\((.*?)^\)", re.MULTILINE | re.DOTALL)
_REPLACE_LINE = re.compile(r"^replace\s+(.+)$", re.MULTILINE)


def binary_path(version: str = MINIO_VERSION) -> Path:
    return cache_dir() / "bin" / f"minio-{version}" / "minio"


def replace_directives(gomod: str) -> list[str]:
    """The replace directives of a go.mod, one `old [v] => new [v]` string each."""
    lines = [ln.strip() for block in _REPLACE_BLOCK.findall(gomod) for ln in block.splitlines()]
    lines += [m.strip() for m in _REPLACE_LINE.findall(gomod) if not m.strip().startswith("(")]
    return [ln for ln in lines if "=>" in ln and not ln.startswith("//")]


def _go(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    if shutil.which("go") is None:
        raise BuildError("the Go toolchain (go >= 1.24) is needed to build MinIO: install it and retry")
    proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"go {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def build(version: str = MINIO_VERSION, log: Any = print, force: bool = False) -> Path:
    """Build MinIO at version into the cache (a no-op when it is there) and return the binary."""
    target = binary_path(version)
    if target.exists() and not force:
        return target
    log(f"building MinIO {version} from the Go module proxy (first time only; a few minutes)")
    info = json.loads(_go(["mod", "download", "-json", f"{MINIO_MODULE}@{version}"]))
    replaces = replace_directives(Path(info["GoMod"]).read_text())
    work = Path(tempfile.mkdtemp(prefix="minio-build-", dir=_ensure(cache_dir() / "src")))
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-trimpath -buildvcs=false"}
    try:
        if not replaces:
            _go(["install", f"{MINIO_MODULE}@{version}"], env={**env, "GOBIN": str(work)})
        else:
            local = [r for r in replaces if r.split("=>", 1)[1].strip().startswith((".", "/"))]
            if local:
                raise BuildError(f"MinIO {version} replaces modules with local paths ({local}): pick another version")
            log(f"MinIO's go.mod has {len(replaces)} replace directives: building through a wrapper module")
            gomod = f"module lorafleet_dev/minio-wrapper\n\ngo 1.24\n\nrequire {MINIO_MODULE} {version}\n\n"
            gomod += "".join(f"replace {r}\n" for r in replaces)
            (work / "go.mod").write_text(gomod)
            (work / "tools.go").write_text(f'//go:build tools\n\npackage tools\n\nimport _ "{MINIO_MODULE}"\n')
            _go(["mod", "tidy"], cwd=work, env=env)
            _go(["build", "-o", str(work / "minio"), MINIO_MODULE], cwd=work, env=env)
        _ensure(target.parent)
        os.replace(work / "minio", target)  # atomic: a concurrent build never sees a half-written binary
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"built {target}")
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class S3Server:
    """One MinIO process on loopback. start()/stop() may be called repeatedly (same port, same data)."""

    data_dir: Path
    binary: Path = field(default_factory=binary_path)
    host: str = "127.0.0.1"
    port: int = 0
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    # A static KMS key so that SSE-S3 (AES256) and aws:kms requests work as on a production MinIO.
    kms_key: str = field(default_factory=lambda: "lorafleet-test:" + base64.b64encode(secrets.token_bytes(32)).decode())
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def env(self) -> dict[str, str]:
        """The variables a lorafleet client (or the aws CLI) needs to talk to this server."""
        return {
            "LORAFLEET_STORE_ENDPOINT": self.endpoint,
            "LORAFLEET_STORE_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def start(self, timeout: float = 60.0, detach: bool = False) -> None:
        if not self.binary.exists():
            raise BuildError(f"{self.binary} is missing: run `python -m lorafleet_dev.s3server build`")
        _ensure(self.data_dir)
        self.port = self.port or free_port(self.host)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_KMS_SECRET_KEY": self.kms_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",  # a data dir on the root disk is fine here
            "MINIO_API_REQUESTS_DEADLINE": "2m",
        }
        cmd = [
            str(self.binary),
            "server",
            str(self.data_dir),
            "--address",
            f"{self.host}:{self.port}",
            "--console-address",
            f"{self.host}:{free_port(self.host)}",
            "--quiet",
        ]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach
            )
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MinIO exited with {self.proc.returncode}: {self._log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"MinIO did not become ready on {self.endpoint} in {timeout:.0f}s: {self._log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the process (SIGKILL with kill=True, as a crash would); the data stays for a restart."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        elif self.pid is not None and _alive(self.pid):  # started by another process (`up`)
            os.kill(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def create_bucket(self, name: str) -> None:
        from lorafleet.storage.client import make_client

        make_client(self.store_settings()).create_bucket(Bucket=name)

    def store_settings(self) -> Any:
        from lorafleet.storage.settings import StoreSettings

        return StoreSettings.from_env(self.env())

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def to_state(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "proc"}
        return {k: str(v) if isinstance(v, Path) else v for k, v in state.items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> S3Server:
        return cls(**{**state, "data_dir": Path(state["data_dir"]), "binary": Path(state["binary"])})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def state_path() -> Path:
    return cache_dir() / "run" / "s3server.json"


def _load_state() -> S3Server | None:
    try:
        return S3Server.from_state(json.loads(state_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _print_env(server: S3Server) -> None:
    for k, v in server.env().items():
        print(f"export {k}={v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafleet_dev.s3server", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build MinIO into the cache")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    up = sub.add_parser("up", help="start a server in the background")
    up.add_argument("--port", type=int, default=0)
    up.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    sub.add_parser("down", help="stop the server and remove its data")
    sub.add_parser("status", help="is it running?")
    sub.add_parser("env", help="print the environment of the running server")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:  # stdout is kept for `eval "$(... up)"`
        print(msg, file=sys.stderr)

    try:
        if args.command == "build":
            print(build(log=log, force=args.force))
            return 0
        current = _load_state()
        if args.command == "up":
            if current and current.pid and _alive(current.pid) and current.ready():
                log(f"already running at {current.endpoint} (pid {current.pid})")
                _print_env(current)
                return 0
            build(log=log)
            server = S3Server(data_dir=Path(tempfile.mkdtemp(prefix="lorafleet-s3-")) / "data", port=args.port)
            server.start(detach=True)
            for bucket in args.bucket:
                server.create_bucket(bucket)
            _ensure(state_path().parent)
            state_path().write_text(json.dumps(server.to_state(), indent=2))
            state_path().chmod(0o600)  # holds the secret key
            log(f"MinIO {MINIO_VERSION} at {server.endpoint} (pid {server.pid}), data in {server.data_dir}")
            _print_env(server)
            return 0
        if current is None:
            log("no server started by `up`")
            return 1 if args.command in ("status", "env") else 0
        if args.command == "down":
            current.stop()
            shutil.rmtree(current.data_dir.parent, ignore_errors=True)
            state_path().unlink(missing_ok=True)
            log(f"stopped {current.endpoint}")
            return 0
        running = bool(current.pid and _alive(current.pid) and current.ready())
        if args.command == "status":
            print(f"{'running' if running else 'not running'}: {current.endpoint} pid {current.pid}")
            return 0 if running else 1
        _print_env(current)
        return 0
    except (BuildError, RuntimeError) as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
