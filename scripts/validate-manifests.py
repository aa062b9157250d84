#!/usr/bin/env python3
"""Strict, offline validation of rendered Kubernetes manifests.

Usage: validate-manifests.py [--k8s 1.30 ...] [--chart-policy] [VERSION=]FILE...

Each YAML document of each FILE (the output of `helm template`) is checked
against every --k8s version, or only against VERSION when given as
VERSION=FILE (a file rendered with `helm template --kube-version VERSION`):

1. YAML: parsed with duplicate-key detection (the API server rejects
   duplicate fields under strict field validation; PyYAML would silently keep
   the last one).
2. Schema: kubernetes_validate.validate(doc, version, strict=True) for every
   --k8s version. strict=True rejects unknown fields. ValidationError,
   SchemaNotFoundError (an apiVersion/kind that version does not serve) and any
   other exception are failures; nothing is skipped silently.
3. CRDs: kubernetes-validate has no schema for custom resources. Only the kinds
   in KNOWN_CRDS (an explicit allow-list) bypass step 2, and each is checked by
   its own structural check below; any other unknown kind fails in step 2.
4. --chart-policy: properties the wscluster chart promises (drain timing, probes,
   security context, no node id, no session affinity, selectors that match).

Exit status: 0 when every document passes, 1 otherwise.
"""
import argparse
import re
import sys

import kubernetes_validate
import yaml

DEFAULT_VERSIONS = ["1.30", "1.32", "1.35"]


# --- YAML loading with duplicate-key detection ------------------------------

class StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# --- structural checks for allow-listed CRDs ---------------------------------

DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
SM_SPEC_KEYS = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                "podTargetLabels", "sampleLimit", "targetLimit", "labelLimit",
                "labelNameLengthLimit", "labelValueLengthLimit", "attachMetadata",
                "scrapeProtocols", "keepDroppedTargets", "scrapeClass", "bodySizeLimit",
                "selectorMechanism", "fallbackScrapeProtocol", "nativeHistogramBucketLimit",
                "nativeHistogramMinBucketFactor", "scrapeClassicHistograms",
                "convertClassicHistogramsToNHCB", "scrapeNativeHistograms"}
SM_ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "params", "interval",
                    "scrapeTimeout", "tlsConfig", "bearerTokenFile", "bearerTokenSecret",
                    "authorization", "honorLabels", "honorTimestamps", "trackTimestampsStaleness",
                    "basicAuth", "oauth2", "metricRelabelings", "relabelings", "proxyUrl",
                    "followRedirects", "enableHttp2", "filterRunning", "noProxy",
                    "proxyFromEnvironment", "proxyConnectHeader"}


def check_label_selector(sel, where, errors):
    if not isinstance(sel, dict):
        errors.append("%s: must be an object" % where)
        return
    unknown = set(sel) - {"matchLabels", "matchExpressions"}
    if unknown:
        errors.append("%s: unknown fields %s" % (where, sorted(unknown)))
    ml = sel.get("matchLabels", {})
    if not isinstance(ml, dict) or not all(isinstance(v, str) for v in ml.values()):
        errors.append("%s.matchLabels: must map strings to strings" % where)
    if not sel.get("matchLabels") and not sel.get("matchExpressions"):
        errors.append("%s: empty selector would select every Service" % where)


def check_servicemonitor(doc):
    """Minimal structural check of a monitoring.coreos.com/v1 ServiceMonitor."""
    errors = []
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        errors.append("unknown top-level fields %s" % sorted(unknown))
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not DNS_SUBDOMAIN.match(str(meta.get("name", ""))):
        errors.append("metadata.name missing or not a DNS subdomain")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors + ["spec: missing or not an object"]
    unknown = set(spec) - SM_SPEC_KEYS
    if unknown:
        errors.append("spec: unknown fields %s" % sorted(unknown))
    if "selector" not in spec:
        errors.append("spec.selector: required")
    else:
        check_label_selector(spec["selector"], "spec.selector", errors)
    ns = spec.get("namespaceSelector")
    if ns is not None and (not isinstance(ns, dict) or set(ns) - {"any", "matchNames"}):
        errors.append("spec.namespaceSelector: only 'any' and 'matchNames' are allowed")
    eps = spec.get("endpoints")
    if not isinstance(eps, list) or not eps:
        errors.append("spec.endpoints: required, a non-empty list")
        eps = []
    for i, ep in enumerate(eps):
        where = "spec.endpoints[%d]" % i
        if not isinstance(ep, dict):
            errors.append("%s: must be an object" % where)
            continue
        unknown = set(ep) - SM_ENDPOINT_KEYS
        if unknown:
            errors.append("%s: unknown fields %s" % (where, sorted(unknown)))
        if "port" not in ep and "targetPort" not in ep:
            errors.append("%s: needs port (a Service port name) or targetPort" % where)
        if "port" in ep and not isinstance(ep["port"], str):
            errors.append("%s.port: must be a port name (string)" % where)
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not (isinstance(ep[k], str) and DURATION.match(ep[k])):
                errors.append("%s.%s: not a Prometheus duration: %r" % (where, k, ep[k]))
        if "path" in ep and not str(ep["path"]).startswith("/"):
            errors.append("%s.path: must start with /" % where)
    return errors


# Allow-list: (apiVersion, kind) -> structural check. Nothing else skips the schemas.
KNOWN_CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_servicemonitor,
}


# --- chart policy -------------------------------------------------------------

def _env(container):
    return {e.get("name"): e for e in container.get("env") or []}


def _int_env(env, name, where, errors):
    e = env.get(name)
    if e is None or "value" not in e:
        errors.append("%s: env %s must be set to a literal value" % (where, name))
        return None
    try:
        return int(e["value"])
    except (TypeError, ValueError):
        errors.append("%s: env %s=%r is not an integer" % (where, name, e["value"]))
        return None


def _selects(selector, labels):
    ml = (selector or {}).get("matchLabels") or {}
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def chart_policy(docs):
    """Properties of the wscluster chart; returns a list of error strings."""
    errors = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    if by_kind.get("StatefulSet"):
        errors.append("wscluster nodes must be a Deployment (no ordinals), found a StatefulSet")
    nodes = [d for d in by_kind.get("Deployment", [])
             if any(c.get("name") == "wscluster"
                    for c in d["spec"]["template"]["spec"].get("containers", []))]
    if len(nodes) != 1:
        return errors + ["expected exactly one wscluster node Deployment, found %d" % len(nodes)]
    dep = nodes[0]
    name = dep["metadata"]["name"]
    where = "Deployment/%s" % name
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    c = [c for c in pod["containers"] if c["name"] == "wscluster"][0]
    env = _env(c)

    # No node identity of any kind: nodes make their own id.
    for n in env:
        if re.search(r"(NODE_?ID|ORDINAL|PEERS?|POD_NAME|HOSTNAME)$", n or ""):
            errors.append("%s: env %s looks like a node id/ordinal; nodes self-assign" % (where, n))
    # Settings the node refuses to start without.
    hb = _int_env(env, "WSC_HEARTBEAT_MS", where, errors)
    ttl = _int_env(env, "WSC_LEASE_TTL_MS", where, errors)
    drain = _int_env(env, "WSC_DRAIN_MS", where, errors)
    if hb is not None and ttl is not None and ttl <= 2 * hb:
        errors.append("%s: WSC_LEASE_TTL_MS %d must be > 2 x WSC_HEARTBEAT_MS %d" % (where, ttl, hb))
    if "WSC_REDIS_URL" not in env:
        errors.append("%s: WSC_REDIS_URL is not set (a multi-pod cluster needs Redis)" % where)
    if "WSC_JWT_SECRET" not in env and "WSC_JWT_PUBLIC_KEY" not in env and "WSC_DEV" not in env:
        errors.append("%s: no WSC_JWT_SECRET / WSC_JWT_PUBLIC_KEY / WSC_DEV: the node would refuse to start" % where)
    if env.get("WSC_LOG_FORMAT", {}).get("value") not in ("json", "text"):
        errors.append("%s: WSC_LOG_FORMAT must be json or text" % where)
    # Drain timing: grace > preStop pause + ceil(drain/1000) + 1.
    pre = (c.get("lifecycle") or {}).get("preStop") or {}
    pause = None
    if "sleep" in pre:
        pause = int(pre["sleep"]["seconds"])
    elif "exec" in pre:
        cmd = pre["exec"].get("command") or []
        if len(cmd) == 2 and cmd[0] in ("sleep", "/bin/sleep"):
            pause = int(cmd[1])
    if pause is None:
        errors.append("%s: preStop must be a sleep pause" % where)
    grace = pod.get("terminationGracePeriodSeconds")
    if pause is not None and drain is not None:
        need = pause + (drain + 999) // 1000 + 1
        if grace is None or grace <= need:
            errors.append("%s: terminationGracePeriodSeconds %s must be > preStop %d + drain %d ms + 1 s = %d"
                          % (where, grace, pause, drain, need))
    # Probes and port.
    ports = {p.get("name"): p for p in c.get("ports", [])}
    listen = env.get("WSC_LISTEN", {}).get("value", "")
    if "http" not in ports or not listen.endswith(":%d" % ports["http"]["containerPort"]):
        errors.append("%s: port 'http' must exist and match WSC_LISTEN (%r)" % (where, listen))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        if hg.get("path") != path or hg.get("port") != "http":
            errors.append("%s: %s must be GET %s on port http" % (where, probe, path))
    # Security context (container settings override pod ones).
    psc, sc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    merged = dict(psc, **sc)
    if merged.get("runAsNonRoot") is not True:
        errors.append("%s: runAsNonRoot must be true" % where)
    if sc.get("readOnlyRootFilesystem") is not True:
        errors.append("%s: readOnlyRootFilesystem must be true" % where)
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append("%s: allowPrivilegeEscalation must be false" % where)
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        errors.append("%s: capabilities must drop ALL" % where)
    if (merged.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        errors.append("%s: seccompProfile must be RuntimeDefault" % where)
    if not (c.get("resources") or {}).get("requests"):
        errors.append("%s: resources.requests must be set (the HPA needs them)" % where)
    keys = {t.get("topologyKey") for t in pod.get("topologySpreadConstraints") or []}
    if not {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys:
        errors.append("%s: topologySpreadConstraints must cover zones and hostnames" % where)
    # Secrets referenced from the chart's own Secret must carry the key.
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    for n, e in env.items():
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["name"] in secrets:
            data = dict(secrets[ref["name"]].get("data") or {}, **(secrets[ref["name"]].get("stringData") or {}))
            if ref["key"] not in data and not ref.get("optional"):
                errors.append("%s: env %s refers to key %s missing from Secret %s" % (where, n, ref["key"], ref["name"]))
    # Objects that select the node pods.
    svcs = [s for s in by_kind.get("Service", []) if _selects({"matchLabels": s["spec"].get("selector")}, pod_labels)]
    if len(svcs) != 1:
        errors.append("expected one Service selecting the node pods, found %d" % len(svcs))
    for s in svcs:
        if s["spec"].get("sessionAffinity", "None") != "None":
            errors.append("Service/%s: no session affinity (any node serves any user)" % s["metadata"]["name"])
    for s in by_kind.get("Service", []):
        if s not in svcs and _selects({"matchLabels": s["spec"].get("selector")}, pod_labels):
            errors.append("Service/%s also selects node pods" % s["metadata"]["name"])
    for other in by_kind.get("Deployment", []):
        if other is not dep:
            if _selects(dep["spec"]["selector"], other["spec"]["template"]["metadata"].get("labels", {})):
                errors.append("node selector also matches Deployment/%s" % other["metadata"]["name"])
            ann = other["metadata"].get("annotations") or {}
            if "trial" in other["metadata"]["name"] or other["metadata"]["name"].endswith("-redis"):
                if "for trials only" not in ann.get("wscluster.io/warning", ""):
                    errors.append("Deployment/%s: in-chart Redis must be labelled 'for trials only'" % other["metadata"]["name"])
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", name):
            errors.append("HPA/%s does not target %s" % (h["metadata"]["name"], where))
    if hpas and "replicas" in dep["spec"]:
        errors.append("%s: must leave replicas unset when an HPA owns it" % where)
    if not hpas and dep["spec"].get("replicas", 1) < 1:
        errors.append("%s: replicas must be >= 1" % where)
    for p in by_kind.get("PodDisruptionBudget", []):
        if not _selects(p["spec"].get("selector"), pod_labels):
            errors.append("PDB/%s does not select the node pods" % p["metadata"]["name"])
    for sm in by_kind.get("ServiceMonitor", []):
        if not any(_selects(sm["spec"]["selector"], s["metadata"].get("labels", {})) for s in svcs):
            errors.append("ServiceMonitor/%s does not select the node Service" % sm["metadata"]["name"])
        if not any(ep.get("port") in {p.get("name") for s in svcs for p in s["spec"]["ports"]}
                   for ep in sm["spec"]["endpoints"]):
            errors.append("ServiceMonitor/%s: endpoint port is not a port name of the node Service" % sm["metadata"]["name"])
    return errors


# --- main ---------------------------------------------------------------------

def describe(doc):
    meta = doc.get("metadata") or {}
    return "%s %s/%s" % (doc.get("apiVersion"), doc.get("kind"), meta.get("name"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k8s", action="append", help="Kubernetes version (repeatable); default: %s" % DEFAULT_VERSIONS)
    ap.add_argument("--chart-policy", action="store_true", help="also check the wscluster chart's promises")
    ap.add_argument("files", nargs="+", metavar="[VERSION=]FILE")
    args = ap.parse_args()
    versions = args.k8s or DEFAULT_VERSIONS
    failures = 0
    checked = 0
    for arg in args.files:
        path, file_versions = arg, versions
        m = re.match(r"^(\d+\.\d+(?:\.\d+)?)=(.+)$", arg)
        if m:
            path, file_versions = m.group(2), [m.group(1)]
        try:
            with open(path) as f:
                docs = [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
        except Exception as e:  # noqa: BLE001 - any parse problem is a failure
            print("FAIL %s: YAML: %s" % (path, e))
            failures += 1
            continue
        if not docs:
            print("FAIL %s: no documents" % path)
            failures += 1
            continue
        for doc in docs:
            checked += 1
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                print("FAIL %s: document without apiVersion/kind: %.80r" % (path, doc))
                failures += 1
                continue
            key = (doc["apiVersion"], doc["kind"])
            if key in KNOWN_CRDS:
                errs = KNOWN_CRDS[key](doc)
                for e in errs:
                    print("FAIL %s: %s (CRD structural check): %s" % (path, describe(doc), e))
                failures += bool(errs)
                continue
            for v in file_versions:
                try:
                    kubernetes_validate.validate(doc, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    loc = "/".join(str(p) for p in e.path)
                    print("FAIL %s: %s k8s %s: %s at %s" % (path, describe(doc), v, e.message, loc or "(root)"))
                    failures += 1
                except kubernetes_validate.SchemaNotFoundError as e:
                    print("FAIL %s: %s k8s %s: no schema (unknown apiVersion/kind): %s" % (path, describe(doc), v, e.message))
                    failures += 1
                except Exception as e:  # noqa: BLE001 - anything else is a failure too
                    print("FAIL %s: %s k8s %s: %s: %s" % (path, describe(doc), v, type(e).__name__, getattr(e, "message", e)))
                    failures += 1
        if args.chart_policy:
            try:
                errs = chart_policy([d for d in docs if isinstance(d, dict)])
            except Exception as e:  # noqa: BLE001
                errs = ["policy check crashed: %s: %s" % (type(e).__name__, e)]
            for e in errs:
                print("FAIL %s: chart policy: %s" % (path, e))
            failures += len(errs)
    print("validate-manifests: %d documents in %d files, %d failures" % (checked, len(args.files), failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
