#!/usr/bin/env python3
"""Checks the Kubernetes manifests under deploy/kubernetes.

Usage: python3 tests/python/manifests_test.py MANIFEST_DIR OUT_DIR

Every document parses and names its apiVersion, kind and metadata.name;
workloads select their own pods; every probe and Service targetPort names a
port of the containers; every container that mounts a ConfigMap holding an
agent-lifecycle.toml passes `--config` into that mount. Writes each such
config file to OUT_DIR (as <configmap>.toml) for the caller to start a
server with.

Exits 0 when every check passed, 1 on a failed check, 3 without PyYAML.
"""

import pathlib
import sys

try:
    import yaml
except ImportError:
    print("PyYAML is not installed")
    sys.exit(3)


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def main(manifest_dir, out_dir):
    files = sorted(pathlib.Path(manifest_dir).glob("*.yaml"))
    if not files:
        fail(f"no manifests in {manifest_dir}")
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        configmaps = {}
        for doc in docs:
            for key in ("apiVersion", "kind"):
                if not doc.get(key):
                    fail(f"{path.name}: a document without {key}")
            if not doc.get("metadata", {}).get("name"):
                fail(f"{path.name}: a {doc['kind']} without metadata.name")
            if doc["kind"] == "ConfigMap":
                configmaps[doc["metadata"]["name"]] = doc.get("data", {})
        services = [d for d in docs if d["kind"] == "Service"]
        workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
        if not workloads:
            fail(f"{path.name}: no workload")
        for workload in workloads:
            check_workload(path.name, workload, services, configmaps, out_dir)
        print(f"ok: {path.name}: {len(docs)} objects")


def check_workload(name, workload, services, configmaps, out_dir):
    spec = workload["spec"]
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in selector.items()):
        fail(f"{name}: {workload['metadata']['name']} does not select its own pods")
    pod = spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for probe_key in ("readinessProbe", "livenessProbe"):
            probe = container.get(probe_key)
            if not probe:
                fail(f"{name}: {container['name']} has no {probe_key}")
            port = probe.get("grpc", {}).get("port")
            if port not in ports.values():
                fail(f"{name}: {probe_key} port {port} is not a container port")
        for service in services:
            if any(service["spec"]["selector"].get(k) != v for k, v in selector.items()):
                continue
            for port in service["spec"]["ports"]:
                if port["targetPort"] not in ports:
                    fail(f"{name}: Service port {port['name']} targets {port['targetPort']}, not a port")
        args = container.get("args", [])
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            if volume is None:
                if not any(t["metadata"]["name"] == mount["name"]
                           for t in workload["spec"].get("volumeClaimTemplates", [])):
                    fail(f"{name}: mount {mount['name']} has no volume")
                continue
            configmap = volume.get("configMap", {}).get("name")
            if configmap is None:
                continue
            data = configmaps.get(configmap)
            if data is None or "agent-lifecycle.toml" not in data:
                fail(f"{name}: ConfigMap {configmap} has no agent-lifecycle.toml")
            wanted = mount["mountPath"].rstrip("/") + "/agent-lifecycle.toml"
            if args[args.index("--config") + 1] != wanted:
                fail(f"{name}: --config does not point at {wanted}")
            pathlib.Path(out_dir, f"{configmap}.toml").write_text(data["agent-lifecycle.toml"])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2])
