#!/usr/bin/python3
"""Checks that the Kubernetes manifests in deploy/ agree with the driver they deploy.

Parsed as YAML (python3-yaml), every document of every deploy/*.yaml:
* the CSIDriver's name, the StorageClass's provisioner and the VolumeSnapshotClass's driver
  are cairn_csi::DRIVER_NAME (csi/src/lib.rs);
* the StorageClass's parameters are ones CreateVolume takes (`replicas` 1..=3, `fsType` one
  of node/src/csi.rs FS_TYPES), with the sidecars' `csi.storage.k8s.io/` prefix allowed;
* every flag given to cairn-control and cairn-node is one their --help lists (the binaries
  in BIN_DIR, default target/release), with each $(VAR) defined in the container's env;
* each CSI sidecar's --csi-address is the socket of its pod's --csi-endpoint, on a volume
  both mount at the same path; the registrar's kubelet path is the socket's host path;
* every volume mount names a pod volume, every service account, namespace and Service
  a pod names exists, and the URLs cairn-node and cairn-control dial name those Services.

Usage: ci/deploy_check.py [BIN_DIR]. Exits 1 naming every disagreement.
"""

import glob
import os
import re
import subprocess
import sys
from urllib.parse import urlparse

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN_DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release")
SIDECAR_PREFIX = "registry.k8s.io/sig-storage/"
problems = []


def rust_const(path, name):
    text = open(os.path.join(ROOT, path)).read()
    m = re.search(r"pub const %s: &str = \"([^\"]+)\";" % name, text)
    if not m:
        sys.exit("%s: no constant %s" % (path, name))
    return m.group(1)


def rust_str_array(path, name):
    text = open(os.path.join(ROOT, path)).read()
    m = re.search(r"pub const %s: \[&str; \d+\] = \[([^\]]*)\];" % name, text)
    if not m:
        sys.exit("%s: no constant %s" % (path, name))
    return re.findall(r"\"([^\"]+)\"", m.group(1))


DRIVER = rust_const("csi/src/lib.rs", "DRIVER_NAME")
P_REPLICAS = rust_const("csi/src/lib.rs", "PARAM_REPLICAS")
P_FS = rust_const("csi/src/lib.rs", "PARAM_FS_TYPE")
P_K8S = rust_const("csi/src/lib.rs", "PARAM_K8S_PREFIX")
FS_TYPES = rust_str_array("node/src/csi.rs", "FS_TYPES")

docs = []
for f in sorted(glob.glob(os.path.join(ROOT, "deploy", "*.yaml"))):
    for d in yaml.safe_load_all(open(f)):
        if d:
            docs.append((os.path.basename(f), d))
if not docs:
    sys.exit("deploy/: no manifests")


def of_kind(kind):
    return [(f, d) for f, d in docs if d.get("kind") == kind]


def fail(where, what):
    problems.append("%s: %s" % (where, what))


def one(kind):
    found = of_kind(kind)
    if len(found) != 1:
        fail("deploy/", "expected one %s, found %d" % (kind, len(found)))
        return None, {}
    return found[0]


namespaces = {d["metadata"]["name"] for _, d in of_kind("Namespace")}
accounts = {(d["metadata"].get("namespace"), d["metadata"]["name"]) for _, d in of_kind("ServiceAccount")}
services = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for _, d in of_kind("Service")}
for f, d in docs:
    ns = d["metadata"].get("namespace")
    if ns is not None and ns not in namespaces:
        fail(f, "%s %s is in namespace %s, which no manifest makes" % (d["kind"], d["metadata"]["name"], ns))

f, d = one("CSIDriver")
if d and d["metadata"]["name"] != DRIVER:
    fail(f, "CSIDriver is %r, the driver is %r" % (d["metadata"]["name"], DRIVER))
f, d = one("VolumeSnapshotClass")
if d and d.get("driver") != DRIVER:
    fail(f, "VolumeSnapshotClass driver %r is not %r" % (d.get("driver"), DRIVER))
f, d = one("StorageClass")
if d:
    if d.get("provisioner") != DRIVER:
        fail(f, "provisioner %r is not %r" % (d.get("provisioner"), DRIVER))
    for k, v in (d.get("parameters") or {}).items():
        if k == P_REPLICAS:
            if not (str(v).isdigit() and 1 <= int(v) <= 3):
                fail(f, "parameter %s=%r is not 1 to 3" % (k, v))
        elif k == P_FS:
            if v not in FS_TYPES:
                fail(f, "parameter %s=%r is not one of %s" % (k, v, FS_TYPES))
        elif not k.startswith(P_K8S):
            fail(f, "parameter %r is not one CreateVolume takes" % k)

helps = {}


def help_of(binary):
    if binary not in helps:
        path = os.path.join(BIN_DIR, binary)
        try:
            helps[binary] = subprocess.run([path, "--help"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit("%s --help: %s (build it first: cargo build --release)" % (path, e))
    return helps[binary]


def flag_value(args, flag):
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def service_of(url, where):
    """The (namespace, name) of the Service a URL's host names, checked to exist with the port."""
    u = urlparse(url)
    parts = (u.hostname or "").split(".")
    if len(parts) >= 2 and parts[1] == "cairn-etcd":
        key = ("cairn-system", parts[1])
    elif len(parts) >= 2:
        key = (parts[1], parts[0])
    else:
        key = ("cairn-system", parts[0])
    svc = services.get(key)
    if svc is None:
        fail(where, "%s names Service %s/%s, which no manifest makes" % (url, key[0], key[1]))
        return
    ports = [p["port"] for p in svc["spec"].get("ports", [])]
    if u.port not in ports:
        fail(where, "%s: Service %s has ports %s" % (url, key[1], ports))


checked_flags = 0
for f, d in docs:
    if d["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
        continue
    ns = d["metadata"].get("namespace")
    pod = d["spec"]["template"]["spec"]
    where = "%s %s" % (f, d["metadata"]["name"])
    sa = pod.get("serviceAccountName")
    if sa and (ns, sa) not in accounts:
        fail(where, "service account %s/%s is not made by any manifest" % (ns, sa))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for claim in d["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = claim
    socket_mounts = {}
    endpoint = None
    for c in pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        for path, name in mounts.items():
            if name not in volumes:
                fail(where, "container %s mounts %s, which is not a pod volume" % (c["name"], name))
        cmd = (c.get("command") or [None])[0]
        args = c.get("args", [])
        if cmd in ("cairn-control", "cairn-node"):
            text = help_of(cmd)
            env = {e["name"] for e in c.get("env", [])}
            for a in args:
                flag = a.split("=", 1)[0]
                checked_flags += 1
                if not re.search(r"(^|\s|,)%s([\s=<\[]|$)" % re.escape(flag), text, re.M):
                    fail(where, "%s has no flag %s (its --help does not list it)" % (cmd, flag))
                for var in re.findall(r"\$\((\w+)\)", a):
                    if var not in env:
                        fail(where, "%s uses $(%s), which the container's env does not define" % (a, var))
            ep = flag_value(args, "--csi-endpoint")
            if ep is None:
                fail(where, "%s has no --csi-endpoint" % cmd)
                continue
            sock = ep[len("unix://"):]
            sock_dir = os.path.dirname(sock)
            if sock_dir not in mounts:
                fail(where, "the CSI socket %s is not on a mounted volume" % sock)
                continue
            endpoint = (sock, mounts[sock_dir])
            url = flag_value(args, "--control")
            if url:
                for u in url.split(","):
                    service_of(u, where)
            etcd = flag_value(args, "--etcd")
            if etcd:
                for u in etcd.split(","):
                    service_of(u, where)
        elif c.get("image", "").startswith(SIDECAR_PREFIX):
            addr = flag_value(args, "--csi-address")
            if addr is None:
                fail(where, "sidecar %s has no --csi-address" % c["name"])
                continue
            socket_mounts[c["name"]] = (addr, mounts.get(os.path.dirname(addr)))
            reg = flag_value(args, "--kubelet-registration-path")
            if reg is not None:
                plugin = mounts.get(os.path.dirname(addr))
                host = volumes.get(plugin, {}).get("hostPath", {}).get("path")
                if host is None or os.path.join(host, os.path.basename(addr)) != reg:
                    fail(where, "registrar path %s is not the socket's host path %s/%s" % (reg, host, os.path.basename(addr)))
    for name, (addr, vol) in socket_mounts.items():
        if endpoint is None:
            fail(where, "sidecar %s but no cairn process serving CSI in the pod" % name)
        elif (addr, vol) != endpoint:
            fail(where, "sidecar %s dials %s on volume %s; the plugin serves %s on volume %s" % (name, addr, vol, endpoint[0], endpoint[1]))

if checked_flags == 0:
    fail("deploy/", "no cairn-control or cairn-node container found")
if problems:
    print("deploy/ disagrees with the driver:")
    for p in problems:
        print("  " + p)
    sys.exit(1)
print("deploy/: %d manifests agree with driver %s (%d cairn flags checked against --help)" % (len(docs), DRIVER, checked_flags))
