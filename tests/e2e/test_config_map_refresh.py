"""A changed ConfigMap reaches a running pod's volume without anyone touching the pod, within the kubelet's periodic
sync: how a serving replica learns its new desired-adapter set now that the operator may not patch pods
(resources/adapterdeployment.py, build_adapters_config_map). The delays are printed: they are the price of
least privilege."""

from __future__ import annotations

import time
import uuid

from kubernetes import client

from lorafleet_dev.testing import wait_until
from tests.e2e.conftest import NodeHandle

# kubelet syncFrequency (1 minute by default) plus its jitter and the ConfigMap watch: well under this.
MAX_DELAY_SECONDS = 150.0


def test_config_map_volume_refreshes_without_a_pod_change(node: NodeHandle, namespace: str) -> None:
    name = f"desired-{uuid.uuid4().hex[:5]}"
    core = node.cluster.core
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"v": "0"})
    )
    # Prints the file's content each time it changes (as the sidecar's 100 ms stat poll notices it).
    watch = 'old=; while true; do new=$(cat /cfg/v); [ "$new" != "$old" ] && echo "v=$new" && old=$new; sleep 0.2; done'
    pod = node.pod(name, ["sh", "-c", watch])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "cfg", "mountPath": "/cfg"}]
    pod["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": name}}]
    node.create_pod(namespace, pod)
    node.wait_phase(namespace, name, ("Running",))
    wait_until(lambda: "v=0" in node.logs(namespace, name), timeout=30, what="the first value")
    uid = core.read_namespaced_pod(name, namespace).metadata.uid

    delays = []
    for value in ("1", "2"):
        core.patch_namespaced_config_map(name, namespace, {"data": {"v": value}})
        start = time.monotonic()
        wait_until(
            lambda v=value: f"v={v}" in node.logs(namespace, name),  # type: ignore[misc]
            timeout=MAX_DELAY_SECONDS,
            interval=0.5,
            what=f"value {value} in the pod's volume",
        )
        delays.append(time.monotonic() - start)
    print(f"ConfigMap change seen in the pod's volume after {', '.join(f'{d:.1f}' for d in delays)} s")
    after = core.read_namespaced_pod(name, namespace)
    assert after.metadata.uid == uid and not after.metadata.annotations  # nobody touched the pod
