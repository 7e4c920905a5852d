"""A real local Kubernetes control plane for tests, without Docker: ``python -m lorafleet_dev.cluster``.

Commands (also via ``hack/cluster``)::

    up          build what is missing, start the cluster, wait until every component is healthy (idempotent)
    down        stop every process that ``up`` started and delete the cluster's state
    status      print what runs
    kubeconfig  print the admin kubeconfig path (``export KUBECONFIG=$(hack/cluster kubeconfig)``)
    build       build/cache binaries only (``build --node`` adds kubelet and kube-proxy, ``build kubelet``)
    manifests   print our kwok Stages and fake Nodes (hack/kind-up.sh applies them to a kind cluster)

What runs, all on 127.0.0.1 with free ports: etcd, kube-apiserver (TLS from a throwaway CA, client-cert
auth, ``--authorization-mode=Node,RBAC``, service-account signing keys), kube-controller-manager (all
controllers: service-account tokens, garbage collector, job, deployment, replicaset, endpoint(slice), ...),
kube-scheduler, and kwok running fake nodes out of cluster. Binaries are pinned upstream releases built
from source through the Go module proxy (see ``lorafleet_dev.build``), cached under
``${LORAFLEET_CACHE:-~/.cache/lorafleet}/bin``; state (PKI, etcd data, logs, pids) lives in
``${LORAFLEET_CACHE}/cluster/<name>``.

Fake nodes (kwok, untainted): ``lorafleet-gpu-0`` and ``lorafleet-gpu-1`` with ``nvidia.com/gpu: 8`` and
labels ``nvidia.com/gpu.present=true``, ``nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3``,
``lorafleet.io/node-pool=gpu``; ``lorafleet-cpu-0`` with ``lorafleet.io/node-pool=cpu``.
Pods become Running; Job pods succeed after 2 s; a pod annotated ``lorafleet.io/kwok-fail: "true"``
fails (exit code 1) after 1 s; ``lorafleet.io/kwok-duration: "10s"`` changes either delay and
``lorafleet.io/kwok-exit-code`` the exit code (details in ``lorafleet_dev.kwok``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_dev import kwok
from lorafleet_dev.build import (
    CONTROL_PLANE,
    DEFAULT_BUILD,
    KUBERNETES_VERSION,
    NODE_COMPONENTS,
    Builder,
    BuildError,
    cache_dir,
)
from lorafleet_dev.pki import PKI

LOOPBACK = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR = "10.244.0.1/16"
DEFAULT_NAME = os.environ.get("LORAFLEET_CLUSTER_NAME", "lorafleet")
# Start order; `down` stops them in reverse.
PROCESSES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they cannot collide with each other)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None  # field 22 of stat(5): start time, guards against pid reuse


def _alive(pid: int, start_ticks: int | None = None) -> bool:
    stat = _proc_stat(pid)
    if stat is None:
        return False
    if stat[0] == "Z":
        return False
    return start_ticks is None or int(stat[19]) == start_ticks


def _me() -> str:
    pid = os.getpid()
    return f"{pid}-{_start_ticks(pid)}"


def _user_alive(user: str) -> bool:
    pid, _, ticks = user.partition("-")
    return pid.isdigit() and ticks.isdigit() and _alive(int(pid), int(ticks))


def _client_flags(kubeconfig: Path) -> list[str]:
    """Flags shared by kube-controller-manager and kube-scheduler."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={LOOPBACK}",
        "--leader-elect=false",
    ]


def spawn_logged(args: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a component with its output appended to `log`, in its own session (process group), so `down` can
    signal the whole group."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
        )


@dataclass
class Proc:
    name: str
    pid: int
    start_ticks: int
    log: str
    args: list[str]
    health: str = ""  # URL polled for readiness


@dataclass
class State:
    name: str
    ports: dict[str, int]
    processes: dict[str, Proc] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # Started by `hack/cluster up` (kept until `down`) rather than by a test session (stopped by its last user).
    persistent: bool = True

    def dump(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ports": self.ports,
            "persistent": self.persistent,
            "versions": self.versions,
            "processes": {k: vars(p) for k, p in self.processes.items()},
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> State:
        procs = {k: Proc(**v) for k, v in data.get("processes", {}).items()}
        return cls(data["name"], data["ports"], procs, data.get("versions", {}), data.get("persistent", True))


def run_command(
    args: Sequence[str], error: type[Exception] = ClusterError, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion with its output captured; with check, a failure raises `error` naming the
    command and what it printed."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise error(f"{' '.join(args)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def stop_processes(
    procs: Sequence[Proc],
    grace: float,
    alive: Callable[[Proc], bool],
    children: dict[int, subprocess.Popen[bytes]],
    log: Callable[[str], None],
) -> None:
    """SIGTERM each process group at once, give them `grace` seconds together, SIGKILL what is left, and reap the
    ones this process started (in `children`)."""
    for proc in procs:
        if alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    for proc in procs:
        while alive(proc) and time.monotonic() < end:
            time.sleep(0.1)
        if alive(proc):
            log(f"{proc.name} did not stop in {grace:.0f}s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        child = children.pop(proc.pid, None)
        if child:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)


class LocalCluster:
    """One named local cluster. ``up()`` is idempotent; ``down()`` leaves no process or state behind."""

    def __init__(
        self,
        name: str = DEFAULT_NAME,
        state_dir: Path | None = None,
        builder: Builder | None = None,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.name = name
        self.dir = state_dir or Path(os.environ.get("LORAFLEET_CLUSTER_STATE") or cache_dir() / "cluster" / name)
        self.log = log
        self.builder = builder or Builder(log=log)
        self.pki = PKI(self.dir / "pki")
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- paths ----------------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> State | None:
        try:
            return State.load(json.loads(self.state_file.read_text()))
        except (OSError, ValueError, KeyError):
            return None

    def _save(self, state: State) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.dump(), indent=2) + "\n")
        tmp.replace(self.state_file)

    # -- health -----------------------------------------------------------------------------------------

    def _ssl_admin(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(*map(str, self.pki.pair("admin")))
        return ctx

    def _get(self, url: str, admin: bool = False, timeout: float = 3.0) -> tuple[int, str]:
        ctx: ssl.SSLContext | None = None
        if admin:
            ctx = self._ssl_admin()
        elif url.startswith("https://"):
            # kube-controller-manager / kube-scheduler serve self-signed certs; loopback only.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, ssl.SSLError) as e:
            return 0, str(e)

    def alive(self, proc: Proc) -> bool:
        child = self._children.get(proc.pid)
        if child is not None:  # our own child: poll() also reaps it and keeps its exit code
            return child.poll() is None
        return _alive(proc.pid, proc.start_ticks)

    def healthy(self, proc: Proc) -> bool:
        code, body = self._get(proc.health, admin=proc.name == "kube-apiserver")
        if proc.name == "etcd":
            return code == 200 and '"health":"true"' in body.replace(" ", "")
        return code == 200

    def is_up(self) -> bool:
        st = self.state()
        if not st or set(st.processes) != set(PROCESSES):
            return False
        return all(self.alive(p) for p in st.processes.values()) and self.healthy(st.processes["kube-apiserver"])

    # -- lifecycle ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down/acquire/release between processes (e.g. concurrent pytest sessions)."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dir.parent / f".{self.dir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def up(self, timeout: float = 180.0, persistent: bool = True) -> bool:
        """Start the cluster unless it already runs. Returns True if this call started it.

        ``persistent=False`` (test sessions, via ``acquire``) lets the last ``release`` stop it; a persistent
        cluster (``hack/cluster up``) runs until ``down``.
        """
        with self._locked():
            return self._up(timeout, persistent)

    def _up(self, timeout: float, persistent: bool) -> bool:
        st = self.state()
        if st and self.is_up():
            if persistent and not st.persistent:
                st.persistent = True
                self._save(st)
            self.log(f"cluster {self.name!r} already up; KUBECONFIG={self.kubeconfig}")
            return False
        if self.dir.exists():
            self.log(f"cleaning up leftovers of a previous run in {self.dir}")
            self._down()
        t0 = time.monotonic()
        bins = self.binaries()
        t_bins = time.monotonic() - t0
        deadline = time.monotonic() + timeout
        try:
            self._start(bins, deadline, persistent)
        except BaseException:
            self._dump_logs()
            self.log("start failed: stopping what was started")
            self._down()
            raise
        self.log(
            f"cluster {self.name!r} ready in {time.monotonic() - t0:.1f}s "
            f"(binaries {t_bins:.1f}s); KUBECONFIG={self.kubeconfig}"
        )
        return True

    def _users(self) -> Path:
        return self.dir / "users"

    def acquire(self, timeout: float = 180.0) -> bool:
        """Use the cluster from this process (start it, non-persistent, if needed). Pair with ``release``."""
        with self._locked():
            started = self._up(timeout, persistent=False)
            self._users().mkdir(exist_ok=True)
            (self._users() / _me()).touch()
            return started

    def release(self, keep: bool = False) -> bool:
        """Stop using it; stop the cluster if it is not persistent and no other live process uses it."""
        with self._locked():
            with contextlib.suppress(FileNotFoundError):
                (self._users() / _me()).unlink()
            st = self.state()
            if keep or not st or st.persistent:
                return False
            users = self._users().iterdir() if self._users().exists() else []
            if any(_user_alive(u.name) for u in users):
                return False
            self._down()
            return True

    def binaries(self) -> dict[str, Path]:
        """Paths of the control-plane binaries, built first if missing (Debian etcd as a fallback)."""
        bins = self.builder.ensure([c for c in CONTROL_PLANE if c != "etcd"])
        try:
            bins.update(self.builder.ensure(["etcd"]))
        except BuildError as e:
            fallback = shutil.which("etcd")
            if not fallback:
                raise
            self.log(f"building etcd failed, falling back to {fallback}: {e}")
            bins["etcd"] = Path(fallback)
        return bins

    def _start(self, bins: dict[str, Path], deadline: float, persistent: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        state = State(self.name, dict(zip(names, _free_ports(len(names)), strict=True)))
        state.versions = {c: self.builder.version(c) for c in CONTROL_PLANE}
        state.persistent = persistent
        self._save(state)
        p = state.ports
        server = f"https://{LOOPBACK}:{p['apiserver']}"
        self._write_pki(server)
        pki, d = self.pki, self.dir

        etcd_url = f"http://{LOOPBACK}:{p['etcd']}"
        peer_url = f"http://{LOOPBACK}:{p['etcd-peer']}"
        self._spawn(
            state,
            "etcd",
            [
                str(bins["etcd"]),
                "--name=lorafleet",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=lorafleet={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            f"{etcd_url}/health",
        )
        self._wait(state, ["etcd"], deadline)
        _age_etcd(p["etcd"])

        serving_crt, serving_key = pki.pair("apiserver")
        kubelet_crt, kubelet_key = pki.pair("apiserver-kubelet-client")
        proxy_crt, proxy_key = pki.pair("front-proxy-client")
        self._spawn(
            state,
            "kube-apiserver",
            [
                str(bins["kube-apiserver"]),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={p['apiserver']}",
                f"--tls-cert-file={serving_crt}",
                f"--tls-private-key-file={serving_key}",
                f"--cert-dir={pki.dir}",
                f"--client-ca-file={pki.ca_crt}",
                f"--kubelet-client-certificate={kubelet_crt}",
                f"--kubelet-client-key={kubelet_key}",
                # As kubeadm: reach a kubelet (lorafleet_dev.node) at its InternalIP, not its unresolvable name.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                # Front-proxy (aggregated APIs such as metrics-server); also lets the controller-manager
                # and scheduler read the requestheader CA they look for.
                f"--requestheader-client-ca-file={pki.ca_crt}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={proxy_crt}",
                f"--proxy-client-key-file={proxy_key}",
                "--enable-aggregator-routing=true",  # no kube-proxy: reach aggregated APIs via endpoints
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                # Endpoints validation rejects loopback addresses for the `kubernetes` Service.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
            f"{server}/readyz",
        )
        self._wait(state, ["kube-apiserver"], deadline)

        self._spawn(
            state,
            "kube-controller-manager",
            [
                str(bins["kube-controller-manager"]),
                *_client_flags(d / "controller-manager.kubeconfig"),
                f"--secure-port={p['controller-manager']}",
                f"--cert-dir={d / 'controller-manager'}",
                "--controllers=*",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_crt}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki.ca_crt}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cluster-name={self.name}",
            ],
            f"https://{LOOPBACK}:{p['controller-manager']}/healthz",
        )
        self._spawn(
            state,
            "kube-scheduler",
            [
                str(bins["kube-scheduler"]),
                *_client_flags(d / "scheduler.kubeconfig"),
                f"--secure-port={p['scheduler']}",
                f"--cert-dir={d / 'scheduler'}",
            ],
            f"https://{LOOPBACK}:{p['scheduler']}/readyz",
        )
        kwok_config = kwok.write_config(d / "kwok.yaml", self.builder.kwok_stages_dir())
        self._spawn(
            state,
            "kwok",
            [
                str(bins["kwok"]),
                f"--config={kwok_config}",
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={kwok.FAKE_NODE_SELECTOR}",
                "--node-lease-duration-seconds=40",
                f"--cidr={POD_CIDR}",
                f"--server-address={LOOPBACK}:{p['kwok']}",
            ],
            f"http://{LOOPBACK}:{p['kwok']}/healthz",
        )
        self._wait(state, ["kube-controller-manager", "kube-scheduler", "kwok"], deadline)

        nodes = kwok.write_nodes(d / "nodes.yaml")
        self.kubectl(str(bins["kubectl"]), "apply", "-f", str(nodes))
        left = max(1, int(deadline - time.monotonic()))
        self.kubectl(
            str(bins["kubectl"]),
            "wait",
            "--for=condition=Ready",
            "nodes",
            "-l",
            "type=kwok",
            f"--timeout={left}s",
        )
        # The service-account controller is the last piece a pod needs; wait for its first result.
        self._until(
            deadline,
            "default ServiceAccount",
            lambda: self._get(f"{server}/api/v1/namespaces/default/serviceaccounts/default", admin=True)[0] == 200,
            state,
        )

    def _write_pki(self, server: str) -> None:
        pki = self.pki
        pki.create_ca()
        pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ips=(LOOPBACK, SERVICE_IP),
        )
        pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",), client=True)
        pki.issue("front-proxy-client", "front-proxy-client", client=True)
        pki.issue("admin", "lorafleet-admin", ("system:masters",), client=True)
        pki.issue("controller-manager", "system:kube-controller-manager", client=True)
        pki.issue("scheduler", "system:kube-scheduler", client=True)
        pki.kubeconfig(self.kubeconfig, server, "lorafleet-admin", "admin", self.name)
        pki.kubeconfig(
            self.dir / "controller-manager.kubeconfig",
            server,
            "system:kube-controller-manager",
            "controller-manager",
            self.name,
        )
        pki.kubeconfig(self.dir / "scheduler.kubeconfig", server, "system:kube-scheduler", "scheduler", self.name)

    def _spawn(self, state: State, name: str, args: list[str], health: str) -> None:
        log = self.dir / "logs" / f"{name}.log"
        child = spawn_logged(args, log, self.dir)
        self._children[child.pid] = child
        state.processes[name] = Proc(name, child.pid, _start_ticks(child.pid) or 0, str(log), args, health)
        self._save(state)

    def _until(self, deadline: float, what: str, ok: Callable[[], bool], state: State) -> None:
        while True:
            if ok():
                return
            for name, proc in state.processes.items():
                if not self.alive(proc):
                    code = self._children[proc.pid].poll() if proc.pid in self._children else None
                    raise ClusterError(f"{name} exited (code {code}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def _wait(self, state: State, names: list[str], deadline: float) -> None:
        t0 = time.monotonic()
        for n in names:
            proc = state.processes[n]
            self._until(deadline, f"{n} to become healthy", functools.partial(self.healthy, proc), state)
        self.log(f"{', '.join(names)} healthy ({time.monotonic() - t0:.1f}s)")

    def restart_apiserver(self, down_for: float = 0.0, timeout: float = 60.0) -> float:
        """SIGKILL kube-apiserver, leave it down `down_for` seconds, start it again with the same flags (etcd keeps
        the data) and wait until it is ready; returns the seconds it was unreachable. For tests of what survives an
        API server restart: run it on a private cluster, since every client of this one sees the outage."""
        with self._locked():
            st = self.state()
            if st is None or "kube-apiserver" not in st.processes:
                raise ClusterError(f"cluster {self.name!r} is not up")
            old = st.processes["kube-apiserver"]
            killed = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old.pid, signal.SIGKILL)
            while self.alive(old):
                if time.monotonic() > killed + timeout:
                    raise ClusterError(f"kube-apiserver (pid {old.pid}) did not exit after SIGKILL")
                time.sleep(0.05)
            child = self._children.pop(old.pid, None)
            if child:
                child.wait(timeout=5)
            time.sleep(max(0.0, down_for - (time.monotonic() - killed)))
            self._spawn(st, "kube-apiserver", old.args, old.health)
            self._wait(st, ["kube-apiserver"], killed + timeout)
            return time.monotonic() - killed

    def kubectl(self, kubectl: str, *args: str) -> str:
        proc = subprocess.run([kubectl, f"--kubeconfig={self.kubeconfig}", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def _dump_logs(self, lines: int = 25) -> None:
        for log in sorted((self.dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            self.log(f"--- last {len(tail)} lines of {log.name} ---")
            for line in tail:
                print(f"    {line}", file=sys.stderr)

    def down(self, grace: float = 10.0) -> None:
        """Stop every recorded process group (SIGTERM, then SIGKILL) and delete the state directory."""
        with self._locked():
            self._down(grace)

    def _down(self, grace: float = 10.0) -> None:
        st = self.state()
        procs = [st.processes[n] for n in reversed(PROCESSES) if st and n in st.processes]
        stop_processes(procs, grace, self.alive, self._children, self.log)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        if procs:
            self.log(f"cluster {self.name!r} down")

    def status(self) -> dict[str, Any]:
        st = self.state()
        if not st:
            return {"name": self.name, "up": False, "processes": {}}
        procs = {
            n: {
                "pid": p.pid,
                "alive": self.alive(p),
                "healthy": self.alive(p) and self.healthy(p),
                "health": p.health,
                "log": p.log,
            }
            for n, p in st.processes.items()
        }
        return {
            "name": self.name,
            "up": self.is_up(),
            "server": f"https://{LOOPBACK}:{st.ports['apiserver']}",
            "kubeconfig": str(self.kubeconfig),
            "persistent": st.persistent,
            "users": sorted(u.name for u in self._users().iterdir()) if self._users().exists() else [],
            "versions": st.versions,
            "processes": procs,
        }


# -- etcd's JSON gateway (plain HTTP on loopback) ----------------------------------------------------------------

# An API server started on an empty etcd builds its watch caches at a revision close to 1, so a watch from an
# old resourceVersion such as "1" is still served instead of answered with 410 Gone, as any real cluster would.
# The harness moves a new etcd past this many revisions before the API server starts.
MIN_ETCD_REVISION = 100


def _etcd_post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}/v3/{path}", json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def _etcd_revision(port: int) -> int:
    return int(_etcd_post(port, "kv/range", {"key": "AA==", "limit": 1})["header"]["revision"])


def _age_etcd(port: int) -> None:
    """Bump a new etcd's revision past MIN_ETCD_REVISION (one key outside the API server's /registry prefix)."""
    key = "L2xvcmFmbGVldC1oYXJuZXNzL2FnZQ=="  # base64("/lorafleet-harness/age")
    for _ in range(max(0, MIN_ETCD_REVISION - _etcd_revision(port))):
        _etcd_post(port, "kv/put", {"key": key, "value": "MQ=="})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="cluster name (state dir name)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (idempotent)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    sub.add_parser("down", help="stop and delete state")
    sub.add_parser("status", help="print what runs (JSON)")
    sub.add_parser("kubeconfig", help="print the admin kubeconfig path")
    sub.add_parser("manifests", help="print our kwok Stages and fake Nodes (for an in-cluster kwok)")
    build = sub.add_parser("build", help="build and cache binaries")
    build.add_argument("components", nargs="*", help=f"default: {' '.join(DEFAULT_BUILD)}")
    build.add_argument("--node", action="store_true", help="also kubelet and kube-proxy")
    args = parser.parse_args(argv)

    cluster = LocalCluster(args.name)
    try:
        if args.cmd == "up":
            cluster.up(timeout=args.timeout)
        elif args.cmd == "down":
            cluster.down()
        elif args.cmd == "status":
            st = cluster.status()
            print(json.dumps(st, indent=2))
            return 0 if st["up"] else 3
        elif args.cmd == "kubeconfig":
            if not cluster.kubeconfig.exists():
                _log(f"cluster {args.name!r} is not up (run `hack/cluster up`)")
                return 1
            print(cluster.kubeconfig)
        elif args.cmd == "manifests":
            print(kwok.dump([*kwok.custom_stages(), *kwok.nodes()]), end="")
        elif args.cmd == "build":
            wanted = list(args.components or DEFAULT_BUILD) + (list(NODE_COMPONENTS) if args.node else [])
            t0 = time.monotonic()
            for name, path in cluster.builder.ensure(wanted).items():
                print(f"{name}\t{cluster.builder.version(name)}\t{path}")
            _log(f"build done in {time.monotonic() - t0:.0f}s (Kubernetes {KUBERNETES_VERSION})")
    except (BuildError, ClusterError) as e:
        _log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
