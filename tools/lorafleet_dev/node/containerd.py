"""containerd for the node: its config, whether a running one (not ours) suits pods, starting ours or sharing that
one, importing the node's images and removing containers the kubelet left behind."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet_dev import images
from lorafleet_dev.node.binaries import _bin_path, build_images
from lorafleet_dev.node.config import (
    CAP_SYS_RESOURCE,
    CNI_BIN_DIR,
    CNI_CONF,
    CONTAINERD_PRIVATE,
    CONTAINERD_ROOT,
    CONTAINERD_SOCK,
    CONTAINERD_STATE,
    CRI_PLUGIN,
    DEFAULT_CONTAINERD_CONFIG,
    DEFAULT_SANDBOX_IMAGE,
    K8S_NAMESPACE,
    PAUSE_IMAGE,
    PAUSE_VERSION,
    NodeError,
    NodeState,
    _run,
)

if TYPE_CHECKING:
    from lorafleet_dev.node.lifecycle import LocalNode


def containerd_config() -> str:
    """The containerd config the node starts containerd with (Debian's settings plus what this VM needs)."""
    return (
        "version = 2\n"
        f'root = "{CONTAINERD_ROOT}"\n'
        f'state = "{CONTAINERD_STATE}"\n'
        f'[grpc]\n  address = "{CONTAINERD_SOCK}"\n'
        f'[plugins."{CRI_PLUGIN}"]\n'
        f'  sandbox_image = "{PAUSE_IMAGE}"\n'
        # Without CAP_SYS_RESOURCE (these VMs) runc cannot give the pause container its oom_score_adj of
        # -998 and every sandbox fails ("can't get final child's PID from pipe"): clamp to containerd's own.
        "  restrict_oom_score_adj = true\n"
        f'  [plugins."{CRI_PLUGIN}".cni]\n'
        f'    bin_dir = "{CNI_BIN_DIR}"\n'
        f'    conf_dir = "{CNI_CONF.parent}"\n'
        + (
            f'  [plugins."{CRI_PLUGIN}".containerd.runtimes.runc]\n'
            '    runtime_type = "io.containerd.runc.v2"\n'
            f'  [plugins."{CRI_PLUGIN}".containerd.runtimes.runc.options]\n'
            f'    Root = "{CONTAINERD_STATE}/runc"\n'
            if CONTAINERD_PRIVATE
            else ""
        )
        + '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{CONTAINERD_ROOT}/opt"\n'
    )


def _has_cap(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def running_containerd(sock: str = CONTAINERD_SOCK) -> tuple[int, Path] | None:
    """(pid, config file) of the running containerd that serves ``sock``, if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if not argv or Path(argv[0]).name != "containerd":
            continue
        config, address = DEFAULT_CONTAINERD_CONFIG, None
        for i, arg in enumerate(argv[1:], 1):
            if arg in ("--config", "-c") and i + 1 < len(argv):
                config = Path(argv[i + 1])
            elif arg.startswith("--config="):
                config = Path(arg.split("=", 1)[1])
            elif arg in ("--address", "-a") and i + 1 < len(argv):
                address = argv[i + 1]
        if address is None:
            with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
                address = tomllib.loads(config.read_text()).get("grpc", {}).get("address")
        if (address or "/run/containerd/containerd.sock") == sock:
            return int(entry.name), config
    return None


def foreign_cri_config() -> tuple[dict[str, Any], list[str]]:
    """The CRI settings of a containerd this harness did not start, and why pods would fail with them."""
    found = running_containerd()
    if found is None:
        return {}, [f"something serves {CONTAINERD_SOCK} but no containerd process is visible"]
    pid, path = found
    try:
        data = tomllib.loads(path.read_text()) if path.exists() else {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        return {}, [f"cannot read the config {path} of containerd pid {pid}: {e}"]
    plugins = data.get("plugins", {})
    cri = plugins.get(CRI_PLUGIN) or plugins.get("cri") or {}
    cni = cri.get("cni", {})
    problems = []
    if not cri.get("restrict_oom_score_adj") and not _has_cap(CAP_SYS_RESOURCE):
        problems.append(
            "it lacks `restrict_oom_score_adj = true` and this machine lacks CAP_SYS_RESOURCE, so every pod "
            "sandbox would fail (runc: can't get final child's PID from pipe)"
        )
    if cni.get("bin_dir", "/opt/cni/bin") != str(CNI_BIN_DIR):
        problems.append(f"its CNI bin_dir is {cni.get('bin_dir', '/opt/cni/bin')}, not {CNI_BIN_DIR}")
    if cni.get("conf_dir", "/etc/cni/net.d") != str(CNI_CONF.parent):
        problems.append(f"its CNI conf_dir is {cni.get('conf_dir')}, not {CNI_CONF.parent}")
    if problems:
        problems = [f"containerd pid {pid} (config {path}, not started by hack/node): {p}" for p in problems]
    return cri, problems


def serving(node: LocalNode) -> bool:
    return Path(CONTAINERD_SOCK).exists() and node._ctr("version", check=False, timeout=10).returncode == 0


def start_or_share(node: LocalNode, st: NodeState, deadline: float) -> None:
    """Use the containerd serving the socket if its settings work for pods, else start ours."""
    if node.containerd_serving():
        cri, problems = foreign_cri_config()
        if problems:
            raise NodeError(
                "; ".join(problems) + ". Stop it, or start it with the config of `hack/node containerd-config`"
            )
        st.foreign_containerd = True
        st.sandbox_image = cri.get("sandbox_image", DEFAULT_SANDBOX_IMAGE)
        node._save(st)
        node.log(f"using the containerd already serving {CONTAINERD_SOCK} (left running by `down`)")
    else:
        config = node.dir / "containerd.toml"
        config.write_text(containerd_config())
        node._spawn(st, "containerd", ["containerd", f"--config={config}"], f"ctr://{CONTAINERD_SOCK}")
        node._wait(st, ["containerd"], deadline)
    plugins = node._ctr("plugins", "ls").stdout
    listed = [line for line in plugins.splitlines() if "io.containerd.grpc.v1" in line and " cri " in f" {line} "]
    if not listed or listed[0].split()[-1] != "ok":
        raise NodeError(f"containerd's CRI plugin is not running: {listed or 'not listed'}")


def import_images(node: LocalNode, pause: Path | None = None, sandbox_image: str = PAUSE_IMAGE) -> dict[str, str]:
    """Build the node's images and import those whose build containerd does not hold yet."""
    built = build_images(pause or _bin_path("pause", PAUSE_VERSION), node.log)
    for image in built.values():
        images.import_image(image, node.log, address=CONTAINERD_SOCK)
    if sandbox_image != PAUSE_IMAGE:
        # A containerd with another sandbox_image (Debian's stock config: registry.k8s.io/pause:3.6).
        node._ctr("-n", K8S_NAMESPACE, "images", "tag", "--force", PAUSE_IMAGE, sandbox_image)
        node.log(f"tagged {PAUSE_IMAGE} as {sandbox_image}, the sandbox image of the running containerd")
    return {ref: image.image_id for ref, image in built.items()}


def remove_leftover_containers(node: LocalNode) -> None:
    """Kill and remove the CRI containers still in containerd (the kubelet could not stop them)."""
    if not node.containerd_serving():
        return
    ids = node._ctr(
        "-n", K8S_NAMESPACE, "containers", "ls", "-q", 'labels."io.kubernetes.pod.uid"', check=False
    ).stdout.split()
    for cid in ids:
        node._ctr("-n", K8S_NAMESPACE, "tasks", "kill", "-s", "SIGKILL", cid, check=False)
    for cid in ids:
        node._ctr("-n", K8S_NAMESPACE, "tasks", "delete", "--force", cid, check=False)
        node._ctr("-n", K8S_NAMESPACE, "containers", "delete", cid, check=False)
    if ids:
        node.log(f"removed {len(ids)} CRI containers the kubelet had not collected (stopped ones, usually)")
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith("cni-") and ids:
            _run(["ip", "netns", "delete", ns], check=False)
