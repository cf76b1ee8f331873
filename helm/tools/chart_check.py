#!/usr/bin/env python3
"""Checks the rungen-gateway Helm chart with real Helm (helm-python-sdk) and the gateway itself.

Run by .ci/helm-check.sh (which provides the virtualenv and the binary). For the default values
and every helm/rungen-gateway/ci/*.yaml:

  1. strict lint (Helm's own linter; any warning or error fails),
  2. render (offline, as `helm template` would),
  3. validate every rendered manifest against the Kubernetes OpenAPI schemas (kubernetes-validate,
     strict: unknown fields fail) for each version in KUBE_VERSIONS; the ServiceMonitor CRD has no
     schema there and gets a structural check of its own,
  4. chart invariants (labels, probes, security context, grace period, mounts, ports, NOTES),
  5. `rungen-gateway check-config` on the gateway.toml of the rendered ConfigMap, with every file
     it references laid out as the rendered Deployment mounts it (real content from chart-rendered
     ConfigMaps/Secrets, stubs for Secrets that live outside the chart, a throwaway certificate
     for TLS).

Plus, once: schema negative tests, the restart-checksum semantics, and the Dockerfile's
consistency with the repository and the chart.

Exit status 0 when everything passed, 1 otherwise (every failure is printed).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

# Kubernetes versions whose schemas every manifest must satisfy: the oldest and the newest that
# the installed kubernetes-validate ships, capped to what the chart declares.
RELEASE = "rg-ci"
NAMESPACE = "rungen-ci"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)


class CapturedStderr:
    """Captures file descriptor 2 (Go's log output from the Helm library) while active."""

    def __enter__(self) -> "CapturedStderr":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


class Checker:
    def __init__(self, repo: Path, chart_dir: Path, binary: Path) -> None:
        self.repo = repo
        self.chart_dir = chart_dir
        self.binary = binary
        self.failures: list[str] = []
        self.case = "-"
        self.tmp = Path(tempfile.mkdtemp(prefix="helm-check-"))
        self._pem: tuple[str, str] | None = None
        # Every manifest is validated against the newest schemas kubernetes-validate ships and
        # against the oldest Kubernetes the chart supports (Chart.yaml kubeVersion), or a newer
        # minimum that a ci values file declares for an opt-in feature with a line
        # "# helm-check: min-kube-version 1.30".
        self.latest_kube = kubernetes_validate.utils.latest_version()
        chart_yaml = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
        m = re.search(r">=\s*v?([0-9]+\.[0-9]+)", str(chart_yaml.get("kubeVersion", "")))
        self.min_kube = m[1] if m else self.latest_kube
        self.kube_versions = [self.min_kube, self.latest_kube]

    # -- reporting ---------------------------------------------------------------------------

    def fail(self, msg: str) -> None:
        line = f"[{self.case}] {msg}"
        self.failures.append(line)
        print(f"  FAIL {msg}", flush=True)

    def ok(self, msg: str) -> None:
        print(f"  ok   {msg}", flush=True)

    # -- helpers -----------------------------------------------------------------------------

    def render(self, values: dict[str, Any]) -> dict[str, str]:
        with helm.Chart.load(self.chart_dir) as chart:
            return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)

    def rendered_docs(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        """The rendered manifests (NOTES.txt left out)."""
        return [d for path, text in self.render(values).items() if not path.endswith("NOTES.txt")
                for d in yaml.safe_load_all(text) if d]

    def deployment(self, values: dict[str, Any]) -> dict[str, Any]:
        return next(d for d in self.rendered_docs(values) if d.get("kind") == "Deployment")

    def pem_pair(self) -> tuple[str, str]:
        """A throwaway self-signed certificate and key (PEM), for TLS stubs."""
        if self._pem is None:
            key = self.tmp / "stub.key"
            crt = self.tmp / "stub.crt"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2",
                 "-subj", "/CN=rungen-gateway.ci", "-addext", "subjectAltName=DNS:rungen-gateway.ci"],
                check=True, capture_output=True,
            )
            self._pem = (crt.read_text(), key.read_text())
        return self._pem

    def jwks_stub(self) -> str:
        """A JWKS document holding the public half of the throwaway P-256 key."""
        _, key_pem = self.pem_pair()
        der = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"], input=key_pem.encode(),
                             check=True, capture_output=True).stdout
        point = der[-65:]  # a P-256 SubjectPublicKeyInfo ends with the point 04 || x || y
        if point[0] != 4:
            raise ValueError("unexpected P-256 public key encoding")
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        return json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "ci",
                                     "x": b64(point[1:33]), "y": b64(point[33:])}]})

    # -- per values file -----------------------------------------------------------------------

    def check_case(self, name: str, values: dict[str, Any], min_kube: str | None = None) -> None:
        self.case = name
        min_kube = min_kube or self.min_kube
        self.kube_versions = sorted({min_kube, self.latest_kube}, key=lambda v: [int(x) for x in v.split(".")])
        print(f"== chart: {name}", flush=True)

        # 1. strict lint
        before = len(self.failures)
        with CapturedStderr() as err:
            report = helm.lint(self.chart_dir, values, strict=True, namespace=NAMESPACE,
                               kube_version=f"v{min_kube}.0")
        # Helm lints in "lint mode", where `fail` and `required` only log (a real install would
        # stop there): count them as lint errors.
        for msg in sorted(set(re.findall(r'funcMap (?:fail|required) message="(.*)"', err.text))):
            self.fail(f"lint: the templates call fail/required: {msg}")
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        for m in bad:
            sev = {2: "warning", 3: "error"}.get(m["severity"], str(m["severity"]))
            self.fail(f"lint {sev}: {m['path']}: {m['error'].strip()}")
        for e in report.get("errors", []):
            if not any(e.strip() in m["error"] for m in bad):
                self.fail(f"lint error: {e.strip()}")
        if len(self.failures) == before:
            infos = "; ".join(m["error"] for m in report.get("messages", []))
            self.ok(f"strict lint ({infos or 'no findings'})")

        # 2. render
        try:
            rendered = self.render(values)
        except helm.HelmError as e:
            self.fail(f"render: {e}")
            return
        notes = ""
        docs: list[tuple[str, dict[str, Any]]] = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                notes = text
                continue
            try:
                for doc in yaml.safe_load_all(text):
                    if doc:
                        docs.append((path, doc))
            except yaml.YAMLError as e:
                self.fail(f"{path}: rendered YAML does not parse: {e}")
        kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in docs if "kind" in d)
        self.ok(f"rendered {len(docs)} manifests: {', '.join(kinds)}")

        # 3. Kubernetes schemas
        self.validate_manifests(docs)

        # 4. invariants, 5. check-config
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for _, d in docs:
            by_kind.setdefault(d.get("kind", "?"), []).append(d)
        self.check_invariants(values, by_kind, notes)
        self.check_config(by_kind, notes)

    def validate_manifests(self, docs: list[tuple[str, dict[str, Any]]]) -> None:
        count = 0
        before = len(self.failures)
        for path, doc in docs:
            for field in ("apiVersion", "kind", "metadata"):
                if field not in doc:
                    self.fail(f"{path}: manifest without {field}")
            if doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "ServiceMonitor":
                self.check_service_monitor(path, doc)
                continue
            for version in self.kube_versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    self.fail(f"{path}: {doc['kind']} invalid for Kubernetes {version}: {where}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    self.fail(f"{path}: {e.message} (not a core kind: add a structural check for it)")
            count += 1
        if len(self.failures) > before:
            return
        self.ok(f"{count} manifests valid (strict) against Kubernetes {', '.join(self.kube_versions)} schemas"
                + (" + ServiceMonitor structural check" if any(d.get('kind') == 'ServiceMonitor' for _, d in docs) else ""))

    def check_service_monitor(self, path: str, doc: dict[str, Any]) -> None:
        """kubernetes-validate ships no CRD schemas: check the fields we use by hand."""
        spec = doc.get("spec") or {}
        allowed_spec = {"endpoints", "selector", "namespaceSelector", "jobLabel", "targetLabels",
                        "podTargetLabels", "sampleLimit", "attachMetadata"}
        extra = set(spec) - allowed_spec
        if extra:
            self.fail(f"{path}: ServiceMonitor spec has unexpected fields {sorted(extra)}")
        if not isinstance(spec.get("selector", {}).get("matchLabels"), dict):
            self.fail(f"{path}: ServiceMonitor spec.selector.matchLabels missing")
        eps = spec.get("endpoints")
        if not isinstance(eps, list) or not eps:
            self.fail(f"{path}: ServiceMonitor spec.endpoints must be a non-empty list")
            return
        allowed_ep = {"port", "path", "scheme", "interval", "scrapeTimeout", "metricRelabelings",
                      "relabelings", "honorLabels"}
        for i, ep in enumerate(eps):
            if set(ep) - allowed_ep:
                self.fail(f"{path}: endpoints[{i}] has unexpected fields {sorted(set(ep) - allowed_ep)}")
            if not isinstance(ep.get("port"), str):
                self.fail(f"{path}: endpoints[{i}].port must be a Service port name")
            for f in ("interval", "scrapeTimeout"):
                if f in ep and not re.fullmatch(r"([0-9]+(ms|s|m|h))+", str(ep[f])):
                    self.fail(f"{path}: endpoints[{i}].{f} `{ep[f]}` is not a Prometheus duration")

    def check_invariants(self, values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], notes: str) -> None:
        problems_before = len(self.failures)
        merged = self.merged(values)
        for kind, docs in by_kind.items():
            for d in docs:
                labels = d["metadata"].get("labels") or {}
                missing = [l for l in STANDARD_LABELS if l not in labels]
                if missing:
                    self.fail(f"{kind}/{d['metadata']['name']}: missing standard labels {missing}")
        deps = by_kind.get("Deployment", [])
        if len(deps) != 1:
            self.fail(f"expected one Deployment, got {len(deps)}")
            return
        dep = deps[0]
        pod = dep["spec"]["template"]["spec"]
        ctr = next((c for c in pod["containers"] if c["name"] == "gateway"), None)
        if ctr is None:
            self.fail("Deployment has no `gateway` container")
            return
        # probes on the admin port
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/readyz")):
            get = (ctr.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") != "admin":
                self.fail(f"{probe} must be GET {path} on the admin port, is {get}")
        # security context
        sc = ctr.get("securityContext") or {}
        psc = pod.get("securityContext") or {}
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            self.fail("runAsNonRoot is not set")
        if sc.get("readOnlyRootFilesystem") is not True:
            self.fail("readOnlyRootFilesystem is not true")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            self.fail("capabilities.drop does not contain ALL")
        if sc.get("allowPrivilegeEscalation") is not False:
            self.fail("allowPrivilegeEscalation is not false")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            self.fail(f"seccompProfile is {seccomp}, not RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            self.fail("pod automountServiceAccountToken is not false")
        for sa in by_kind.get("ServiceAccount", []):
            if sa.get("automountServiceAccountToken") is not False:
                self.fail("ServiceAccount automountServiceAccountToken is not false")
        if not pod.get("topologySpreadConstraints") and (merged.get("topologySpread") or {}).get("enabled"):
            self.fail("topologySpread.enabled but no topologySpreadConstraints")
        annotations = dep["spec"]["template"]["metadata"].get("annotations") or {}
        if not re.fullmatch(r"[0-9a-f]{64}", str(annotations.get("checksum/restart-settings", ""))):
            self.fail("pod template lacks the checksum/restart-settings annotation")
        for m in ctr.get("volumeMounts", []):
            if m.get("subPath") or m.get("subPathExpr"):
                self.fail(f"volumeMount {m['name']} uses subPath: kubelet never updates it, hot reload breaks")
        # replicas: the HPA owns the count when enabled
        hpa = by_kind.get("HorizontalPodAutoscaler", [])
        if hpa and "replicas" in dep["spec"]:
            self.fail("Deployment sets replicas although an HPA manages it")
        replicas = dep["spec"].get("replicas", 1)
        if hpa:
            replicas = max(replicas, hpa[0]["spec"].get("minReplicas", 1), hpa[0]["spec"]["maxReplicas"])
        cluster = bool(((merged.get("config") or {}).get("cluster") or {}).get("enabled"))
        if cluster:
            if "PER REPLICA" in notes:
                self.fail("config.cluster is on but NOTES.txt still warns about per-replica limits")
            if "Cluster mode" not in notes:
                self.fail("config.cluster is on but NOTES.txt does not describe cluster mode")
        elif replicas > 1 and "PER REPLICA" not in notes:
            self.fail("several replicas but NOTES.txt lacks the per-replica cache/limits warning")
        if replicas <= 1 and "PER REPLICA" in notes:
            self.fail("NOTES.txt warns about replicas with a single replica")
        # cluster: the NetworkPolicy's egress must open the Redis port
        redis_port = (((merged.get("networkPolicy") or {}).get("egress") or {}).get("redis") or {}).get("port")
        for np_ in by_kind.get("NetworkPolicy", []):
            egress_ports = [p.get("port") for r in np_["spec"].get("egress", []) for p in r.get("ports", [])]
            if cluster and redis_port not in egress_ports:
                self.fail(f"config.cluster is on but the NetworkPolicy has no egress to the Redis port {redis_port}")
        for word in ("new-token", "Authorization: Bearer"):
            if word not in notes:
                self.fail(f"NOTES.txt does not mention `{word}`")
        # Service: a public and a separate admin port; the admin API only on a ClusterIP Service
        svcs = by_kind.get("Service", [])
        names = {p["name"] for s in svcs for p in s["spec"]["ports"]}
        if not {"http", "admin"} <= names:
            self.fail(f"Service ports are {sorted(names)}, need http and admin")
        admin_svcs = [s for s in svcs if "admin" in {p["name"] for p in s["spec"]["ports"]}]
        for s in admin_svcs:
            if s["spec"].get("type", "ClusterIP") != "ClusterIP":
                self.fail(f"Service {s['metadata']['name']} of type {s['spec']['type']} exposes the admin port")
        # PodDisruptionBudget: the value asked for, an explicit 0 included
        pdb_values = merged.get("podDisruptionBudget") or {}
        for pdb in by_kind.get("PodDisruptionBudget", []):
            if pdb_values.get("minAvailable") is None:
                want = 1 if pdb_values.get("maxUnavailable") is None else pdb_values["maxUnavailable"]
                if pdb["spec"].get("maxUnavailable") != want:
                    self.fail(f"PodDisruptionBudget maxUnavailable is {pdb['spec'].get('maxUnavailable')}, values ask {want}")
        # [admin] protect_reads as asked
        want_protect = bool(((merged.get("config") or {}).get("admin") or {}).get("protectReads"))
        for cm in by_kind.get("ConfigMap", []):
            text = (cm.get("data") or {}).get("gateway.toml")
            if text is not None:
                got = tomllib.loads(text).get("admin", {}).get("protect_reads", False)
                if got != want_protect:
                    self.fail(f"gateway.toml has protect_reads = {got}, values ask {want_protect}")
        # helm test pod
        tests = [p for p in by_kind.get("Pod", [])
                 if (p["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
        if not tests or not any("/readyz" in " ".join(c.get("command", []) + c.get("args", []))
                                for t in tests for c in t["spec"]["containers"]):
            self.fail("no helm test pod calling /readyz")
        admin_hosts = {f"{s['metadata']['name']}.{s['metadata'].get('namespace')}.svc" for s in admin_svcs}
        for t in tests:
            words = " ".join(w for c in t["spec"]["containers"] for w in c.get("command", []) + c.get("args", []))
            if not any(h in words for h in admin_hosts):
                self.fail(f"the helm test pod does not call the Service that has the admin port ({sorted(admin_hosts)})")
        for t in tests:
            for c in t["spec"]["containers"]:
                tsc = c.get("securityContext") or {}
                if tsc.get("readOnlyRootFilesystem") is not True or "ALL" not in (tsc.get("capabilities") or {}).get("drop", []):
                    self.fail("the helm test pod's container is not locked down")
            if not (t["spec"].get("securityContext") or {}).get("runAsNonRoot"):
                self.fail("the helm test pod does not run as non-root")
            # Not one of the gateway's pods: else the gateway's NetworkPolicy
            # (egress to the upstream only) would block its call to /readyz.
            selectors = [dep["spec"]["selector"].get("matchLabels") or {}]
            selectors += [n["spec"]["podSelector"].get("matchLabels") or {} for n in by_kind.get("NetworkPolicy", [])]
            selectors += [b["spec"]["selector"].get("matchLabels") or {} for b in by_kind.get("PodDisruptionBudget", [])]
            tl = t["metadata"].get("labels") or {}
            for sel in selectors:
                if sel and all(tl.get(k) == v for k, v in sel.items()):
                    self.fail(f"the helm test pod matches the gateway's selector {sel}")
        # NetworkPolicy: ingress and egress, DNS included
        for np_ in by_kind.get("NetworkPolicy", []):
            types = set(np_["spec"].get("policyTypes", []))
            if types != {"Ingress", "Egress"}:
                self.fail(f"NetworkPolicy policyTypes {sorted(types)}")
            ports = [p.get("port") for r in np_["spec"].get("egress", []) for p in r.get("ports", [])]
            if 53 not in ports:
                self.fail("NetworkPolicy egress does not allow DNS")
        if len(self.failures) == problems_before:
            self.ok("chart invariants (labels, probes, security, grace period, mounts, NOTES, test pod)")

    def merged(self, values: dict[str, Any]) -> dict[str, Any]:
        with helm.Chart.load(self.chart_dir) as chart:
            return chart.merge_values(values)

    def check_config(self, by_kind: dict[str, list[dict[str, Any]]], notes: str) -> None:
        """check-config on the rendered gateway.toml, laid out as the Deployment mounts it."""
        dep = by_kind["Deployment"][0]
        pod = dep["spec"]["template"]["spec"]
        ctr = next(c for c in pod["containers"] if c["name"] == "gateway")
        args = ctr.get("args", [])
        if args[:1] != ["serve"] or "--config" not in args:
            self.fail(f"container args must run `serve --config FILE`, are {args}")
            return
        config_path = args[args.index("--config") + 1]
        configmaps = {c["metadata"]["name"]: c.get("data") or {} for c in by_kind.get("ConfigMap", [])}
        secrets = {}
        for s in by_kind.get("Secret", []):
            data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
            data.update(s.get("stringData") or {})
            secrets[s["metadata"]["name"]] = data
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = sorted(ctr.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))

        def resolve(path: str, role: str) -> str | None:
            """The content `path` has in the pod, a stub when it comes from outside the chart,
            or None (failure recorded) when nothing mounts it."""
            m = next((m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
            if m is None:
                self.fail(f"{role}: {path} is not under any volumeMount of the gateway container")
                return None
            key = path[len(m["mountPath"].rstrip("/")) + 1:]
            vol = volumes.get(m["name"])
            if vol is None:
                self.fail(f"volumeMount {m['name']} has no volume")
                return None
            if "projected" in vol:
                # Several ConfigMaps/Secrets in one directory: the source that projects `key`
                # (explicit items first, then a chart-rendered whole source holding it, then a
                # whole source from outside the chart, then a chart-rendered one without it).
                choice = None
                whole: list[tuple[int, str, str, dict[str, Any]]] = []
                for source in vol["projected"].get("sources", []):
                    kind = "configMap" if "configMap" in source else "secret" if "secret" in source else None
                    if kind is None:
                        continue
                    src_name = source[kind]["name"]
                    src_pool = configmaps if kind == "configMap" else secrets
                    label = "ConfigMap" if kind == "configMap" else "Secret"
                    items = source[kind].get("items")
                    if items:
                        item = next((i for i in items if i["path"] == key), None)
                        if item is not None and choice is None:
                            choice = (label, src_name, src_pool, item["key"])
                        continue
                    rank = 0 if key in src_pool.get(src_name, {}) else 1 if src_name not in src_pool else 2
                    whole.append((rank, label, src_name, src_pool))
                if choice is None and whole:
                    _, label, src_name, src_pool = min(whole, key=lambda w: w[0])
                    choice = (label, src_name, src_pool, key)
                if choice is None:
                    self.fail(f"{role}: {path}: projected volume {m['name']} does not project {key}")
                    return None
                src, name, pool, key = choice
            elif "configMap" in vol:
                src, name, pool = "ConfigMap", vol["configMap"]["name"], configmaps
            elif "secret" in vol:
                src, name, pool = "Secret", vol["secret"]["secretName"], secrets
            else:
                self.fail(f"{role}: {path} is on a {sorted(vol)} volume")
                return None
            items = (vol.get("configMap") or vol.get("secret") or {}).get("items")
            if items and "projected" not in vol:
                item = next((i for i in items if i["path"] == key), None)
                if item is None:
                    self.fail(f"{role}: {path}: volume {m['name']} does not project {key}")
                    return None
                key = item["key"]
            if name in pool:
                if key in pool[name]:
                    return pool[name][key]
                if src == "Secret" and role.startswith("teams"):
                    # The chart made the Secret without this scope's key: the operator must
                    # supply it, and NOTES.txt must say so.
                    if "ACTION NEEDED" not in notes:
                        self.fail(f"{role}: chart Secret {name} lacks key {key} and NOTES.txt does not say so")
                    print(f"  note {role}: chart Secret {name} has no key `{key}` (NOTES.txt asks for it); stubbed")
                    return f"ci-stub-{key}"
                self.fail(f"{role}: {path}: the chart's {src} {name} has no key {key}")
                return None
            # A ConfigMap/Secret that lives outside the chart (existingSecret, cert-manager...):
            # a stub the gateway accepts for that role.
            kind = role.split(".")[-1]
            if kind in ("cert", "key", "ca"):
                crt, pk = self.pem_pair()
                return {"cert": crt, "key": pk, "ca": crt}[kind]
            if kind == "redis_url":
                return "redis://redis:6379\n"
            if kind == "hmac_secret":
                return f"ci-stub-hmac-{key}-".ljust(48, "x") + "\n"
            if kind == "token_sha256":
                # A valid hash, distinct per key (the gateway refuses two clients with one hash).
                return hashlib.sha256(f"ci-stub-token-{key}".encode()).hexdigest() + "\n"
            if kind == "jwks_file":
                return self.jwks_stub()
            return f"ci-stub-{key}"

        text = resolve(config_path, "config")
        if text is None:
            return
        try:
            toml = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            self.fail(f"the rendered gateway.toml is not TOML: {e}")
            return
        referenced: list[tuple[str, str]] = []
        for i, team in enumerate(toml.get("teams", [])):
            key = team.get("api_key")
            if isinstance(key, dict) and "file" in key:
                referenced.append((f"teams[{i}].api_key", key["file"]))
            else:
                self.fail(f"teams[{i}].api_key is not a {{ file = ... }} reference: {key!r}")
        tls = (toml.get("server") or {}).get("tls") or {}
        for field, role in (("cert", "cert"), ("key", "key"), ("client_ca", "ca")):
            if field in tls:
                referenced.append((f"server.tls.{role}", tls[field]))
        if "ca_file" in (toml.get("upstream") or {}):
            referenced.append(("upstream.ca", toml["upstream"]["ca_file"]))
        cluster = toml.get("cluster")
        if cluster is not None:
            url = cluster.get("redis_url")
            if isinstance(url, dict) and set(url) == {"file"}:
                referenced.append(("cluster.redis_url", url["file"]))
            else:
                self.fail(f"cluster.redis_url is not a {{ file = ... }} reference (it is a secret): {url!r}")
        for i, client in enumerate(toml.get("clients", [])):
            token = client.get("token_sha256")
            if isinstance(token, dict):
                if set(token) == {"file"}:
                    referenced.append((f"clients[{i}].token_sha256", token["file"]))
                else:
                    self.fail(f"clients[{i}].token_sha256 is neither inline nor a {{ file = ... }} reference: {token!r}")
            jwt = client.get("jwt")
            if not isinstance(jwt, dict):
                continue
            if "hmac_secret" in jwt:
                h = jwt["hmac_secret"]
                if isinstance(h, dict) and set(h) == {"file"}:
                    referenced.append((f"clients[{i}].jwt.hmac_secret", h["file"]))
                else:
                    self.fail(f"clients[{i}].jwt.hmac_secret is not a {{ file = ... }} reference: {h!r}")
            if "jwks_file" in jwt:
                referenced.append((f"clients[{i}].jwt.jwks_file", jwt["jwks_file"]))

        root = self.tmp / self.case
        rewritten = text
        for role, path in referenced:
            content = resolve(path, role)
            if content is None:
                continue
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            rewritten = rewritten.replace(json.dumps(path), json.dumps(str(target)))
        cfg = root / config_path.lstrip("/")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(rewritten)

        # The listen ports in the config must be the container ports the probes and Service use.
        ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
        server = toml.get("server") or {}
        for name, addr in (("http", server.get("listen")), ("admin", (toml.get("admin") or {}).get("listen")),
                           ("plaintext", server.get("plaintext_listen"))):
            if addr is None:
                if name in ports:
                    self.fail(f"container port {name} exists but the config has no listener for it")
                continue
            port = int(str(addr).rsplit(":", 1)[1])
            if ports.get(name) != port:
                self.fail(f"config listens on {addr} for {name}, container port is {ports.get(name)}")
            if str(addr).startswith("127.") or str(addr).startswith("[::1]"):
                self.fail(f"{name} listens on loopback ({addr}): unreachable for probes/Services")
        # Grace period vs the drain the config asks for.
        def secs(d: str) -> float:
            m = re.fullmatch(r"([0-9]+)(ms|s|m)", d)
            if not m:
                self.fail(f"cannot read duration {d!r}")
                return 0
            return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]]
        drain = secs(server.get("drain_delay", "5s")) + secs(server.get("shutdown_timeout", "30s"))
        pre = ((ctr.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace <= drain + pre:
            self.fail(f"terminationGracePeriodSeconds {grace} <= preStop {pre}s + drain_delay + shutdown_timeout ({drain}s)")

        result = subprocess.run([str(self.binary), "check-config", "--config", str(cfg)],
                                capture_output=True, text=True)
        out = (result.stdout + result.stderr).strip().replace(str(root), "")
        if result.returncode != 0:
            self.fail(f"rungen-gateway check-config refused the rendered config:\n{out}\n--- gateway.toml ---\n{text}")
        else:
            self.ok("check-config: " + out.replace("\n", "\n         "))

    # -- once ----------------------------------------------------------------------------------

    def check_schema_rejects(self) -> None:
        self.case = "schema"
        print("== chart: values.schema.json rejects bad values", flush=True)
        bad_cases = {
            "unknown top-level key": {"replicas": 3},
            "wrong type (replicaCount string)": {"replicaCount": "3"},
            "wrong type (port string)": {"ports": {"http": "8080", "admin": 9090, "plaintext": 8081}},
            "unknown nested key": {"config": {"cache": {"maxbytes": 1}}},
            "bad duration": {"config": {"upstream": {"connectTimeout": 2}}},
            "quota with both rates": {"config": {"rateLimit": {"default": {"perSecond": 1, "perMinute": 60}}}},
            "bad token hash": {"clients": [{"name": "a", "tokenSha256": "xyz", "teams": ["personal"]}]},
            "token hash both inline and from a Secret": {"clients": [{"name": "a", "tokenSha256": "a" * 64,
                                                                      "tokenSha256Secret": {"existingSecret": "s"},
                                                                      "teams": ["personal"]}]},
            "token hash Secret without existingSecret": {"clients": [{"name": "a", "tokenSha256Secret": {"key": "k"},
                                                                      "teams": ["personal"]}]},
            "jwt client with a token hash Secret": {"clients": [{"name": "a", "teams": ["personal"],
                                                                 "tokenSha256Secret": {"existingSecret": "s"},
                                                                 "jwt": {"issuer": "https://i", "audience": "x",
                                                                         "jwksUrl": "https://i/jwks"}}]},
            "bad team name": {"teams": [{"name": "../etc"}]},
            "unknown key in config.cluster": {"config": {"cluster": {"redisURL": "redis://r:6379"}}},
            "cluster without a Redis URL": {"config": {"cluster": {"enabled": True}}},
            "public client without origins": {"clients": [{"name": "a", "public": True, "teams": ["personal"]}]},
            "public client with a token": {"clients": [{"name": "a", "public": True, "allowedOrigins": ["https://a.example"],
                                                        "tokenSha256": "a" * 64, "teams": ["personal"]}]},
            "origin with a path": {"clients": [{"name": "a", "public": True, "allowedOrigins": ["https://a.example/x"],
                                                "teams": ["personal"]}]},
            "ipRateLimit on a token client": {"clients": [{"name": "a", "tokenSha256": "a" * 64, "teams": ["personal"],
                                                           "ipRateLimit": {"perSecond": 1}}]},
            "jwt without a key source": {"clients": [{"name": "a", "teams": ["personal"],
                                                      "jwt": {"issuer": "https://i", "audience": "x"}}]},
            "jwt with two key sources": {"clients": [{"name": "a", "teams": ["personal"], "jwt": {
                "issuer": "https://i", "audience": "x", "jwksUrl": "https://i/jwks",
                "hmacSecret": {"existingSecret": "s"}}}]},
            "jwt HMAC value under 32 bytes": {"clients": [{"name": "a", "teams": ["personal"], "jwt": {
                "issuer": "https://i", "audience": "x", "hmacSecret": {"value": "short"}}}]},
            "unknown key in server": {"config": {"server": {"maxConnectionPerIp": 5}}},
            "negative retries": {"config": {"upstream": {"retries": -1}}},
            "2000 worker threads": {"config": {"server": {"workerThreads": 2000}}},
            "protectReads without an admin token": {"config": {"admin": {"protectReads": True}}},
        }
        with helm.Chart.load(self.chart_dir) as chart:
            for what, vals in bad_cases.items():
                try:
                    chart.validate_schema(chart.merge_values(vals))
                    self.fail(f"the schema accepts {what}: {vals}")
                except helm.HelmError:
                    pass
        self.ok(f"{len(bad_cases)} bad values files rejected")

    def check_restart_checksum(self) -> None:
        self.case = "checksum"
        print("== chart: checksum/restart-settings covers only restart-needing settings", flush=True)

        def checksum(values: dict[str, Any]) -> str:
            dep = self.deployment(values)
            return dep["spec"]["template"]["metadata"]["annotations"]["checksum/restart-settings"]

        base = checksum({})
        hot = {
            "clients": {"clients": [{"name": "x", "tokenSha256": "a" * 64, "teams": ["personal"]}]},
            "client token hash in a Secret": {"clients": [{"name": "x", "teams": ["personal"],
                                                           "tokenSha256Secret": {"existingSecret": "t", "key": "x"}}]},
            "teams": {"teams": [{"name": "personal"}, {"name": "acme", "teamId": "t"}]},
            "rate limits": {"config": {"rateLimit": {"maxInFlight": 10}}},
            "upstream": {"config": {"upstream": {"requestTimeout": "5s"}}},
            "api keys": {"apiKeys": {"keys": {"personal": "k2"}}},
            "admin token": {"config": {"admin": {"tokenSha256": "b" * 64}}},
            "public client": {"clients": [{"name": "p", "public": True, "allowedOrigins": ["https://a.example"],
                                           "teams": ["personal"]}]},
            "jwt client": {"clients": [{"name": "j", "teams": ["personal"], "jwt": {
                "issuer": "https://i", "audience": "x", "hmacSecret": {"value": "v" * 40}}}]},
            "upstream retries/breaker": {"config": {"upstream": {"retries": 0, "breakerFailures": 0, "bodyTimeout": "5s"}}},
            "body limits": {"config": {"server": {"maxBodyBytes": 10, "maxUriBytes": 100,
                                                  "allowChunkedRequests": True}}},
            "cache routes": {"config": {"cache": {"routes": {"/app": {"ttl": "1s"}}}}},
            "public per-IP quota": {"config": {"rateLimit": {"publicPerIp": {"perMinute": 10}}}},
            "cluster settings while off": {"config": {"cluster": {"timeout": "1s"}}},
        }
        cold = {
            "http port": {"ports": {"http": 8443, "admin": 9090, "plaintext": 8081}},
            "cache size": {"config": {"cache": {"maxBytes": 2097152}}},
            "log level": {"config": {"logging": {"level": "debug"}}},
            "shutdown timeout": {"shutdown": {"timeoutSeconds": 10}},
            "server limits": {"config": {"server": {"maxConnections": 5}}},
            "connections per IP": {"config": {"server": {"maxConnectionsPerIp": 5}}},
            "requests per connection": {"config": {"server": {"maxRequestsPerConnection": 5}}},
            "worker threads": {"config": {"server": {"workerThreads": 2}}},
            # Its response-stall half is a connection setting, read at start.
            "body read timeout": {"config": {"server": {"bodyReadTimeout": "5s"}}},
            "coalesce timeout": {"config": {"cache": {"coalesceTimeout": "5s"}}},
            "cluster on": {"config": {"cluster": {"enabled": True, "redisUrl": {"existingSecret": "r"}}}},
        }
        on = {"enabled": True, "redisUrl": {"existingSecret": "r"}}
        cluster_base = checksum({"config": {"cluster": on}})
        for what, change in (("cluster timeout", {"timeout": "1s"}), ("cluster heartbeat", {"heartbeat": "5s"}),
                             ("cluster key prefix", {"keyPrefix": "other"}),
                             ("Redis URL Secret", {"redisUrl": {"existingSecret": "r2"}})):
            cold[what] = {"config": {"cluster": {**on, **change}}}
            if checksum(cold[what]) == cluster_base:
                self.fail(f"changing {what} (read at start only) would not restart the pods")
        for what, vals in hot.items():
            if checksum(vals) != base:
                self.fail(f"changing {what} (hot reloaded) would restart the pods")
        for what, vals in cold.items():
            if checksum(vals) == base:
                self.fail(f"changing {what} (read at start only) would not restart the pods")
        self.ok(f"{len(hot)} hot-reloaded changes keep the checksum, {len(cold)} start-time changes change it")

    def check_dockerfile(self) -> None:
        self.case = "dockerfile"
        print("== Dockerfile: paths exist and match the chart", flush=True)
        before = len(self.failures)
        dockerfile = self.repo / "Dockerfile"
        if not dockerfile.is_file():
            self.fail("no Dockerfile")
            return
        lines = []
        for raw in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines():
            raw = raw.strip()
            if raw and not raw.startswith("#"):
                lines.append(raw)
        ignore = []
        di = self.repo / ".dockerignore"
        if di.is_file():
            ignore = [l.strip() for l in di.read_text().splitlines() if l.strip() and not l.startswith("#")]

        def ignored(rel: str) -> bool:
            hit = False
            for pat in ignore:
                neg = pat.startswith("!")
                p = pat[1:] if neg else pat
                p = p.strip("/")
                if fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split("/")[0], p) or rel.startswith(p + "/"):
                    hit = not neg
            return hit

        stages: list[dict[str, Any]] = []
        copied: set[str] = set()
        for line in lines:
            instr, _, rest = line.partition(" ")
            instr = instr.upper()
            if instr == "FROM":
                m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
                stages.append({"image": m[1], "name": (m[2] or "").lower(), "lines": []})
                continue
            if not stages:
                if instr != "ARG":
                    self.fail(f"instruction before FROM: {line}")
                continue
            stages[-1]["lines"].append((instr, rest))
            if instr in ("COPY", "ADD"):
                parts = [p for p in shlex.split(rest) if not p.startswith("--")]
                if "--from" in rest:
                    continue
                for src in parts[:-1]:
                    src_rel = src.lstrip("./").rstrip("/") or "."
                    if not (self.repo / src_rel).exists():
                        self.fail(f"`{instr} {rest}`: {src} does not exist in the repository")
                    elif src_rel != "." and ignored(src_rel):
                        self.fail(f"`{instr} {rest}`: {src} is excluded by .dockerignore")
                    copied.add(src_rel)
        if len(stages) < 2:
            self.fail("the Dockerfile is not multi-stage (build + runtime)")
            return
        # Files compiled into the binary must be in the build context.
        for rs in (self.repo / "src").rglob("*.rs"):
            for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', rs.read_text()):
                target = (rs.parent / inc).resolve().relative_to(self.repo.resolve()).as_posix()
                if not any(target == c or target.startswith(c + "/") for c in copied):
                    self.fail(f"{rs.relative_to(self.repo)} includes {target}, which the Dockerfile does not COPY")
        cargo = tomllib.loads((self.repo / "Cargo.toml").read_text())
        for kind in ("bench", "test", "example"):
            for t in cargo.get(kind, []):
                default_dir = {"bench": "benches", "test": "tests", "example": "examples"}[kind]
                p = t.get("path") or f"{default_dir}/{t['name']}.rs"
                top = p.split("/")[0]
                if top not in copied:
                    self.fail(f"Cargo.toml declares [[{kind}]] {t['name']} at {p}; cargo needs it but the Dockerfile does not COPY {top}")
        for member in (cargo.get("workspace") or {}).get("members", []):
            top = member.split("/")[0]
            if member != "." and top not in copied:
                self.fail(f"Cargo.toml has workspace member {member}, which the Dockerfile does not COPY")
        build = " ".join(r for i, r in stages[0]["lines"] if i == "RUN")
        # The shipped binary: the `dist` profile (release + LTO), from the lockfile.
        if "cargo build" not in build or "--profile dist" not in build or "--locked" not in build:
            self.fail("the build stage does not run `cargo build --profile dist --locked`")
        dist = (tomllib.loads((self.repo / "Cargo.toml").read_text()).get("profile") or {}).get("dist") or {}
        if dist.get("inherits") != "release" or "target/dist/" not in build:
            self.fail("Cargo.toml has no [profile.dist] inheriting release, or the Dockerfile does not install target/dist/")
        # A script the build runs (benches/pgo.sh, the default PGO build) must be in the
        # build context and build the same profile from the lockfile.
        for script in re.findall(r"bash (\S+\.sh)", build):
            path = self.repo / script
            if not path.is_file() or script.split("/")[0] not in copied:
                self.fail(f"the build stage runs {script}, which is missing or not COPYed")
                continue
            text = path.read_text()
            if "PROFILE=${PROFILE:-dist}" not in text or "--locked" not in text:
                self.fail(f"{script} does not build the dist profile (PROFILE=${{PROFILE:-dist}}) with --locked")
        bins = [b["name"] for b in cargo.get("bin", [])] or [cargo["package"]["name"]]
        # The runtime stage
        final = stages[-1]
        runtime: dict[str, Any] = {}
        for instr, rest in final["lines"]:
            runtime.setdefault(instr, []).append(rest)
        helpers = (self.chart_dir / "templates" / "_helpers.tpl").read_text()
        chart_binary = re.search(r'define "rungen-gateway.binary" -}}([^{]+){{', helpers)[1].strip()
        dep = self.deployment({})
        ctr = dep["spec"]["template"]["spec"]["containers"][0]
        chart_args = ctr["args"]
        try:
            entrypoint = json.loads(runtime.get("ENTRYPOINT", ["null"])[-1])
            cmd = json.loads(runtime.get("CMD", ["null"])[-1])
        except json.JSONDecodeError:
            self.fail("ENTRYPOINT and CMD must use the exec (JSON) form")
            return
        if entrypoint != [chart_binary]:
            self.fail(f"ENTRYPOINT {entrypoint} is not [{chart_binary!r}] (the path the chart and NOTES use)")
        if cmd != chart_args[: len(cmd)] or "--config" not in (cmd or []):
            self.fail(f"CMD {cmd} differs from the chart's args {chart_args} (config path / log format)")
        copies = [c for c in runtime.get("COPY", []) if "--from" in c]
        if not any(shlex.split(c)[-1] == chart_binary and any(b in c for b in bins) for c in copies):
            self.fail(f"the runtime stage does not COPY the {bins} binary to {chart_binary}")
        user = (runtime.get("USER") or [""])[-1].split(":")[0]
        chart_user = (self.merged({}).get("podSecurityContext") or {}).get("runAsUser")
        if not user.isdigit():
            self.fail(f"USER `{user}` must be numeric (runAsNonRoot cannot verify a user name)")
        elif int(user) == 0:
            self.fail("the image runs as root")
        elif chart_user is not None and int(user) != int(chart_user):
            self.fail(f"image USER {user} differs from the chart's runAsUser {chart_user}")
        exposed = {int(p.split("/")[0]) for e in runtime.get("EXPOSE", []) for p in e.split()}
        ports = self.merged({})["ports"]
        if not {ports["http"], ports["admin"]} <= exposed:
            self.fail(f"EXPOSE {sorted(exposed)} lacks the chart's ports {ports['http']}, {ports['admin']}")
        if ignore and not any(p.strip("/") in ("target", "/target") for p in ignore):
            self.fail(".dockerignore does not exclude target/")
        if len(self.failures) == before:
            self.ok(f"multi-stage ({' -> '.join(s['image'] for s in stages)}), COPY sources exist, "
                    f"entrypoint {chart_binary}, CMD {' '.join(cmd)}, USER {user}, EXPOSE {sorted(exposed)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".", type=Path)
    ap.add_argument("--chart", default="helm/rungen-gateway", type=Path)
    ap.add_argument("--binary", default="target/debug/rungen-gateway", type=Path)
    args = ap.parse_args()
    helm.disable_logging()
    start = time.monotonic()
    checker = Checker(args.repo.resolve(), args.chart.resolve(), args.binary.resolve())
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}"
          f" (schemas {checker.min_kube}..{checker.latest_kube}), gateway {args.binary}")
    cases: list[tuple[str, dict[str, Any], str | None]] = [("default values", {}, None)]
    for f in sorted((args.chart / "ci").glob("*.yaml")):
        text = f.read_text()
        m = re.search(r"^# helm-check: min-kube-version ([0-9]+\.[0-9]+)\s*$", text, re.M)
        cases.append((f"ci/{f.name}", yaml.safe_load(text) or {}, m[1] if m else None))
    if len(cases) < 4:
        checker.fail(f"expected at least 3 files in {args.chart}/ci, found {len(cases) - 1}")
    for name, values, min_kube in cases:
        try:
            checker.check_case(name, values, min_kube)
        except Exception as e:  # a bug in a check must fail CI, not pass it
            checker.fail(f"check crashed: {type(e).__name__}: {e}")
    for step in (checker.check_schema_rejects, checker.check_restart_checksum, checker.check_dockerfile):
        try:
            step()
        except Exception as e:
            checker.fail(f"check crashed: {type(e).__name__}: {e}")
    shutil.rmtree(checker.tmp, ignore_errors=True)
    took = time.monotonic() - start
    if checker.failures:
        print(f"\nhelm-check: {len(checker.failures)} failure(s) in {took:.1f}s:")
        for f in checker.failures:
            print(f"  - {f}")
        return 1
    print(f"\nhelm-check: all chart checks passed ({len(cases)} values sets) in {took:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
