#!/usr/bin/env bash
# Check the Helm chart of the distributed runtime (helm/payos-workflows) without a cluster:
#
#   1. helm: $HELM, else `helm` on the PATH (v3), else built once from the Go module proxy
#      (`go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION`) and cached;
#   2. `helm lint --strict` with the default values and with each helm/payos-workflows/ci/*-values.yaml;
#   3. `helm template` of each, and checks of what it renders (python3 + PyYAML): the expected
#      objects, subcommands, flags, env, probes, hooks, security context, config checksums; and
#      against the source: every variable the chart sets is one the Rust code reads, every key of
#      the rendered config file is a field of crates/payos-workflows/src/config.rs, the probe path
#      is a route of producer-api;
#   4. every rendered object decodes strictly (unknown fields, wrong types) into its Kubernetes
#      API type, with valid names and labels and matching selectors (a small Go program against
#      k8s.io/api, built once and cached);
#   5. values.schema.json rejects bad values.
#
#   scripts/helm-check.sh          # all of the above
#   scripts/helm-check.sh --run    # also run the rendered setup Job and one process per
#                                  # Deployment against DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS
#                                  # (e.g. `eval "$(cargo run -q -p workflow-testkit --example
#                                  # services)"`), with $PAYOS_WORKFLOWS_BIN (default
#                                  # target/debug/payos-workflows): the api must answer its probes,
#                                  # every process stay up, then drain on SIGTERM within its grace.
#
# Environment: HELM (a helm binary to use), HELM_VERSION (default v3.22.0), HELM_CHECK_CHART
# (default helm/payos-workflows), HELM_CHECK_CACHE (default ~/.cache/payos-helm-check: GOPATH, Go
# build cache and binaries, about 1.3 GB once helm is built).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CHART="${HELM_CHECK_CHART:-helm/payos-workflows}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE="${HELM_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/payos-helm-check}"
RUN=false
for arg in "$@"; do
    case "$arg" in
        --run) RUN=true ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

START=$(date +%s)
step() { printf '==> [+%ds] %s\n' "$(($(date +%s) - START))" "$*"; }

# Go with everything (module cache, build cache, GOPATH) under $CACHE.
cached_go() {
    env GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/pkg/mod" GOCACHE="$CACHE/go-build" \
        GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local go "$@"
}

# --- 1. helm -------------------------------------------------------------------------------------
find_helm() {
    if [[ -n "${HELM:-}" ]]; then
        echo "$HELM"
    elif [[ -x "$CACHE/bin/helm-$HELM_VERSION" ]]; then
        echo "$CACHE/bin/helm-$HELM_VERSION"
    elif command -v helm >/dev/null 2>&1 && helm version --short 2>/dev/null | grep -q '^v3\.'; then
        command -v helm
    fi
}
HELM_BIN="$(find_helm)"
if [[ -z "$HELM_BIN" ]]; then
    command -v go >/dev/null 2>&1 || { echo "no helm and no go to build it with" >&2; exit 1; }
    step "building helm $HELM_VERSION from the Go module proxy into $CACHE (once)"
    built_at=$(date +%s)
    mkdir -p "$CACHE/bin"
    # The Kubernetes version helm assumes without a cluster (`helm template`, lint) is set at link
    # time from its client-go version, as helm's Makefile does: v0.X.Y -> 1.X.
    gomod="$(cached_go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
    k8s_minor="$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod" | head -n 1)"
    [[ -n "$k8s_minor" ]] || { echo "cannot read client-go's version from $gomod" >&2; exit 1; }
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
    done
    GOBIN="$CACHE/bin/.build" cached_go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv "$CACHE/bin/.build/helm" "$CACHE/bin/helm-$HELM_VERSION"
    HELM_BIN="$CACHE/bin/helm-$HELM_VERSION"
    echo "built helm in $(($(date +%s) - built_at))s"
fi
step "helm: $HELM_BIN ($("$HELM_BIN" version --short))"

# --- the Kubernetes type checker ---------------------------------------------------------------
KUBECHECK_SRC="$(cat <<'GO'
// kubecheck: decode every object of a rendered manifest (stdin) into its Kubernetes API type,
// rejecting unknown fields and wrong types; check names, labels, env names, volume mounts and
// that each Deployment's selector matches its pod template.
package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

var problems []string

func fail(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

func checkMeta(where string, m metav1.ObjectMeta, dns1035 bool) {
	var errs []string
	switch {
	case m.Name == "" && strings.HasSuffix(where, "pod template"):
	case dns1035:
		errs = validation.IsDNS1035Label(m.Name)
	default:
		errs = validation.IsDNS1123Subdomain(m.Name)
	}
	for _, e := range errs {
		fail("%s: name %q: %s", where, m.Name, e)
	}
	for k, v := range m.Labels {
		for _, e := range validation.IsQualifiedName(k) {
			fail("%s: label key %q: %s", where, k, e)
		}
		for _, e := range validation.IsValidLabelValue(v) {
			fail("%s: label %s=%q: %s", where, k, v, e)
		}
	}
	for k := range m.Annotations {
		for _, e := range validation.IsQualifiedName(k) {
			fail("%s: annotation key %q: %s", where, k, e)
		}
	}
}

func checkPod(where string, t corev1.PodTemplateSpec) {
	checkMeta(where+" pod template", t.ObjectMeta, false)
	if len(t.Spec.Containers) == 0 {
		fail("%s: no containers", where)
	}
	volumes := map[string]bool{}
	for _, v := range t.Spec.Volumes {
		volumes[v.Name] = true
	}
	all := append(append([]corev1.Container{}, t.Spec.InitContainers...), t.Spec.Containers...)
	for _, c := range all {
		for _, e := range validation.IsDNS1123Label(c.Name) {
			fail("%s: container name %q: %s", where, c.Name, e)
		}
		if c.Image == "" {
			fail("%s/%s: no image", where, c.Name)
		}
		for _, e := range c.Env {
			for _, msg := range validation.IsEnvVarName(e.Name) {
				fail("%s/%s: env %q: %s", where, c.Name, e.Name, msg)
			}
		}
		for _, p := range c.Ports {
			for _, msg := range validation.IsValidPortName(p.Name) {
				fail("%s/%s: port name %q: %s", where, c.Name, p.Name, msg)
			}
		}
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				fail("%s/%s: volumeMount %q has no volume", where, c.Name, m.Name)
			}
		}
	}
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		panic(err)
	}
	count := 0
	for _, doc := range bytes.Split(data, []byte("\n---")) {
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			fail("unparsable document: %v", err)
			continue
		}
		if head.Kind == "" {
			continue
		}
		count++
		var obj any
		switch head.APIVersion + " " + head.Kind {
		case "apps/v1 Deployment":
			obj = &appsv1.Deployment{}
		case "batch/v1 Job":
			obj = &batchv1.Job{}
		case "v1 Service":
			obj = &corev1.Service{}
		case "v1 ConfigMap":
			obj = &corev1.ConfigMap{}
		case "v1 Secret":
			obj = &corev1.Secret{}
		case "v1 ServiceAccount":
			obj = &corev1.ServiceAccount{}
		case "policy/v1 PodDisruptionBudget":
			obj = &policyv1.PodDisruptionBudget{}
		default:
			fail("unexpected object %s %s", head.APIVersion, head.Kind)
			continue
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			fail("%s: %v", head.Kind, err)
			continue
		}
		switch o := obj.(type) {
		case *appsv1.Deployment:
			where := "Deployment " + o.Name
			checkMeta(where, o.ObjectMeta, false)
			checkPod(where, o.Spec.Template)
			sel, err := metav1.LabelSelectorAsSelector(o.Spec.Selector)
			if err != nil || !sel.Matches(labels.Set(o.Spec.Template.Labels)) {
				fail("%s: selector does not match its pod template", where)
			}
		case *batchv1.Job:
			checkMeta("Job "+o.Name, o.ObjectMeta, false)
			checkPod("Job "+o.Name, o.Spec.Template)
			if p := o.Spec.Template.Spec.RestartPolicy; p != corev1.RestartPolicyNever && p != corev1.RestartPolicyOnFailure {
				fail("Job %s: restartPolicy %q", o.Name, p)
			}
		case *corev1.Service:
			checkMeta("Service "+o.Name, o.ObjectMeta, true)
		case *corev1.ConfigMap:
			checkMeta("ConfigMap "+o.Name, o.ObjectMeta, false)
		case *corev1.Secret:
			checkMeta("Secret "+o.Name, o.ObjectMeta, false)
		case *corev1.ServiceAccount:
			checkMeta("ServiceAccount "+o.Name, o.ObjectMeta, false)
		case *policyv1.PodDisruptionBudget:
			checkMeta("PodDisruptionBudget "+o.Name, o.ObjectMeta, false)
		}
	}
	if count == 0 {
		fail("no objects")
	}
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, "kubecheck:", p)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
	fmt.Printf("kubecheck: %d objects decode strictly into their Kubernetes types\n", count)
}
GO
)"
KUBECHECK_MOD='module payos.local/kubecheck

go 1.24

require (
	k8s.io/api v0.37.0
	k8s.io/apimachinery v0.37.0
	sigs.k8s.io/yaml v1.6.0
)
'
kubecheck_id="$(printf '%s\n%s' "$KUBECHECK_SRC" "$KUBECHECK_MOD" | sha256sum | cut -c1-16)"
KUBECHECK="$CACHE/bin/kubecheck-$kubecheck_id"
if [[ ! -x "$KUBECHECK" ]]; then
    step "building the Kubernetes type checker (once)"
    src="$CACHE/kubecheck-src"
    rm -rf "$src"
    mkdir -p "$src" "$CACHE/bin"
    printf '%s\n' "$KUBECHECK_SRC" >"$src/main.go"
    printf '%s' "$KUBECHECK_MOD" >"$src/go.mod"
    (cd "$src" && cached_go mod tidy && cached_go build -trimpath -o "$KUBECHECK.tmp" .)
    mv "$KUBECHECK.tmp" "$KUBECHECK"
fi

python3 -c 'import yaml' 2>/dev/null || {
    echo "python3 with PyYAML is needed (Debian: python3-yaml; pip: pyyaml)" >&2
    exit 1
}

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# --- 2. lint -------------------------------------------------------------------------------------
step "helm lint --strict"
"$HELM_BIN" lint --strict "$CHART"
for values in "$CHART"/ci/*-values.yaml; do
    "$HELM_BIN" lint --strict "$CHART" -f "$values"
done

# --- 3. template and checks --------------------------------------------------------------------
step "helm template"
"$HELM_BIN" template check "$CHART" --namespace payos >"$OUT/default.yaml"
for values in "$CHART"/ci/*-values.yaml; do
    case_name="$(basename "$values" -values.yaml)"
    "$HELM_BIN" template check "$CHART" --namespace payos -f "$values" >"$OUT/$case_name.yaml"
done
for rendered in "$OUT"/*.yaml; do printf '%s ' "$(basename "$rendered")"; done
echo

step "checks of the rendered objects"
python3 - "$CHART" "$OUT" <<'PY'
import base64, glob, hashlib, os, re, sys, tomllib, yaml

chart, out = sys.argv[1], sys.argv[2]
failures = []
def check(cond, msg):
    if not cond:
        failures.append(msg)
    return cond

POOLS = ["approval", "condition", "action", "wait", "notification", "transfers"]
CONFIG_PATH = "/etc/payos-workflows/config.toml"
FULL = "check-payos-workflows"

# --- What the source says ----------------------------------------------------------------------
def read(path):
    return open(path, encoding="utf-8").read()

rust = []
for pattern in ["crates/*/src/**/*.rs", "producer-api/src/**/*.rs", "step-workers/src/**/*.rs", "scheduler/src/**/*.rs"]:
    rust += [f for f in glob.glob(pattern, recursive=True) if "testkit" not in f]
rust_text = "\n".join(read(f) for f in rust)
main_rs = read("crates/payos-workflows/src/main.rs")
config_rs = read("crates/payos-workflows/src/config.rs")
routes = set(re.findall(r'\.route\(\s*"([^"]+)"', read("producer-api/src/lib.rs")))

def env_is_read(name):
    if name == "RUST_LOG":  # tracing_subscriber's EnvFilter::try_from_default_env
        return "try_from_default_env" in main_rs
    return f'"{name}"' in rust_text

# The config file's shape: struct FileConfig and the structs of its tables.
structs = {}
for name, body in re.findall(r"struct (\w+) \{(.*?)\n\}", config_rs, re.S):
    structs[name] = dict(re.findall(r"^\s*(\w+): ([\w<>, ]+),", body, re.M))
check("FileConfig" in structs, "config.rs: struct FileConfig not found")

def check_toml(doc, struct, where):
    fields = structs.get(struct, {})
    for key, value in doc.items():
        if not check(key in fields, f"{where}: config key {key!r} is not a field of {struct} in config.rs"):
            continue
        ty = fields[key]
        if isinstance(value, dict) and ty in structs:
            check_toml(value, ty, f"{where}.{key}")
        elif isinstance(value, dict):
            check(ty.startswith("BTreeMap<String, String>"), f"{where}.{key}: a table, but config.rs has {ty}")
            check(all(isinstance(v, str) for v in value.values()), f"{where}.{key}: values must be strings")
        elif isinstance(value, bool):
            check("bool" in ty, f"{where}.{key}: a boolean, but config.rs has {ty}")
        elif isinstance(value, int):
            check(re.search(r"Option<(u|i)(8|16|32|64|size)>", ty), f"{where}.{key}: an integer, but config.rs has {ty}")
        elif isinstance(value, str):
            check(re.search(r"Option<(String|SocketAddr)>", ty), f"{where}.{key}: a string, but config.rs has {ty}")
        elif isinstance(value, list):
            check(ty == "Option<Vec<String>>", f"{where}.{key}: a list, but config.rs has {ty}")
            check(all(isinstance(v, str) for v in value), f"{where}.{key}: items must be strings")

# The subcommands and flags the chart uses.
for variant in ["Api", "Worker", "Scheduler", "Topics", "Migrate"]:
    check(re.search(rf"^\s*{variant} \{{", main_rs, re.M), f"main.rs: no subcommand {variant.lower()}")
check(re.search(r"#\[arg\(long, value_parser = parse_pool\)\]\s*pool:", main_rs), "main.rs: no `worker --pool`")
check('#[arg(long = "config", env = "WORKFLOWS_CONFIG")]' in main_rs, "main.rs: no `--config`")
check(re.search(r"#\[arg\(long\)\]\s*check: bool", main_rs), "main.rs: no `topics --check`")
check(re.search(r'Migrate \{\s*#\[arg\(long, env = "DATABASE_URL"\)\]', main_rs), "main.rs: `migrate` no longer reads DATABASE_URL")
for pool in POOLS:
    check(f'"{pool}"' in rust_text, f"no worker pool named {pool!r} in the source")

# --- What the chart renders --------------------------------------------------------------------
def load(case):
    docs = [d for d in yaml.safe_load_all(open(os.path.join(out, case + ".yaml"))) if d]
    return docs, {(d["kind"], d["metadata"]["name"]): d for d in docs}

def values_of(case):
    v = yaml.safe_load(open(os.path.join(chart, "values.yaml")))
    if case != "default":
        def merge(a, b):
            for k, x in b.items():
                if isinstance(x, dict) and isinstance(a.get(k), dict):
                    merge(a[k], x)
                else:
                    a[k] = x
        merge(v, yaml.safe_load(open(os.path.join(chart, "ci", case + "-values.yaml"))))
    return v

def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}

def secret_data(by, name):
    s = by.get(("Secret", name))
    return None if s is None else {k: base64.b64decode(x).decode() for k, x in (s.get("data") or {}).items()}

cases = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(out, "*.yaml")))
for case in cases:
    docs, by = load(case)
    v = values_of(case)
    where = f"[{case}]"
    extra_env = {e["name"] for e in v.get("extraEnv") or []}
    secret_name = v["secret"]["existingSecret"] or FULL
    keys = v["secret"]["keys"]

    # The config file: its object, its keys, and the checksum that rolls the pods.
    cfg_kind = "Secret" if v["configInSecret"] else "ConfigMap"
    cfg = by.get((cfg_kind, f"{FULL}-config"))
    if not check(cfg is not None, f"{where} no {cfg_kind} {FULL}-config"):
        continue
    text = (cfg.get("data") or cfg.get("stringData"))["config.toml"]
    toml = tomllib.loads(text)
    check_toml(toml, "FileConfig", f"{where} config.toml")
    checksum = hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    check(toml["api"]["listen"] == f"0.0.0.0:{v['api']['containerPort']}", f"{where} api.listen")
    for key in ["partitions", "replication", "timeout_ms"]:
        check(toml["kafka"].get(key) == v["config"]["kafka"][key], f"{where} kafka.{key}")
    check(toml["pools"].get("members") == v["config"]["pools"]["members"], f"{where} pools.members")
    check(toml["engine"].get("inline_steps") == v["config"]["engine"]["inline_steps"], f"{where} engine.inline_steps")
    check("database_url" not in toml and "admin_token" not in toml["api"] and "api_key" not in toml["payos"],
          f"{where} a secret is in the config file")

    # The chart-created Secret (or none with existingSecret).
    created = secret_data(by, FULL)
    if v["secret"]["existingSecret"]:
        check(created is None, f"{where} a Secret is created although existingSecret is set")
    else:
        check(created is not None, f"{where} no Secret {FULL}")
        wanted = {keys[k]: v["secret"][k] for k in ["databaseUrl", "adminToken", "payosApiKey", "smtpUrl"] if v["secret"][k]}
        check(created == wanted, f"{where} Secret data {sorted(created or {})} != {sorted(wanted)}")

    # Deployments: api, one per enabled pool, scheduler.
    expected = {"api": ["api"]}
    expected.update({f"worker-{p}": ["worker", "--pool", p] for p in POOLS if v["workers"][p]["enabled"]})
    if v["scheduler"]["enabled"]:
        expected["scheduler"] = ["scheduler"]
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Deployment"}
    check(set(deployments) == set(expected), f"{where} Deployments {sorted(deployments)} != {sorted(expected)}")
    for comp, d in deployments.items():
        w = f"{where} {comp}:"
        cv = v["api"] if comp == "api" else v["scheduler"] if comp == "scheduler" else v["workers"][comp[len("worker-"):]]
        check(d["metadata"]["name"] == f"{FULL}-{comp}", f"{w} name {d['metadata']['name']}")
        check(d["spec"]["replicas"] == cv["replicas"], f"{w} replicas {d['spec']['replicas']} != {cv['replicas']}")
        pod = d["spec"]["template"]
        spec = pod["spec"]
        c = spec["containers"][0]
        check(len(spec["containers"]) == 1, f"{w} one container")
        check(c["command"] == v["image"]["command"], f"{w} command {c.get('command')}")
        check(c["args"] == expected.get(comp, []) + ["--config", CONFIG_PATH], f"{w} args {c['args']}")
        check(pod["metadata"]["annotations"].get("checksum/config") == checksum, f"{w} checksum/config is not the config file's sha256")
        if not v["secret"]["existingSecret"]:
            check("checksum/secret" in pod["metadata"]["annotations"], f"{w} no checksum/secret")
        grace = cv.get("terminationGracePeriodSeconds") or v["terminationGracePeriodSeconds"]
        check(spec["terminationGracePeriodSeconds"] == grace >= 25, f"{w} terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']}")
        sc = c["securityContext"]
        check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False, f"{w} securityContext {sc}")
        check(spec["securityContext"].get("runAsNonRoot") is True, f"{w} pod runAsNonRoot")
        check(c.get("resources", {}).get("requests"), f"{w} no resource requests")
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        check(os.path.dirname(CONFIG_PATH) in mounts and "/tmp" in mounts, f"{w} mounts {sorted(mounts)}")
        vol = next(x for x in spec["volumes"] if x["name"] == mounts[os.path.dirname(CONFIG_PATH)]["name"])
        src = vol.get("configMap", {}).get("name") or vol.get("secret", {}).get("secretName")
        check(src == f"{FULL}-config", f"{w} config volume from {src}")
        check(spec["serviceAccountName"] == (v["serviceAccount"]["name"] or (FULL if v["serviceAccount"]["create"] else "default")), f"{w} serviceAccountName")
        env = env_of(c)
        for name in env:
            check(name in extra_env or env_is_read(name), f"{w} sets {name}, which the binary does not read")
        def from_secret(name, key):
            e = env.get(name)
            ref = e and e.get("valueFrom", {}).get("secretKeyRef")
            return check(ref and ref["name"] == secret_name and ref["key"] == keys[key], f"{w} {name} not from Secret {secret_name} key {keys[key]}")
        from_secret("DATABASE_URL", "databaseUrl")
        # Each secret only where it is used.
        check(("WORKFLOWS_ADMIN_TOKEN" in env) == (comp == "api"), f"{w} WORKFLOWS_ADMIN_TOKEN")
        check(("PAYOS_API_KEY" in env) == (comp == "worker-action"), f"{w} PAYOS_API_KEY")
        check(("WORKFLOWS_SMTP_URL" in env) == (comp == "worker-notification"), f"{w} WORKFLOWS_SMTP_URL")
        if comp == "api":
            from_secret("WORKFLOWS_ADMIN_TOKEN", "adminToken")
        if comp == "worker-action":
            from_secret("PAYOS_API_KEY", "payosApiKey")
        if comp == "worker-notification":
            from_secret("WORKFLOWS_SMTP_URL", "smtpUrl")
        if comp.startswith("worker-") and cv.get("members") is not None:
            check(env.get("WORKFLOWS_POOL_MEMBERS", {}).get("value") == str(cv["members"]), f"{w} WORKFLOWS_POOL_MEMBERS")
        if v["egressAllow"] and comp in ("api", "worker-action", "worker-notification"):
            check(env.get("WORKFLOWS_EGRESS_ALLOW", {}).get("value") == ",".join(v["egressAllow"]), f"{w} WORKFLOWS_EGRESS_ALLOW")
        if comp == "api":
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            check(ports.get("http") == v["api"]["containerPort"], f"{w} port http")
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
                get = c.get(probe, {}).get("httpGet", {})
                check(get.get("path") in routes and get.get("port") == "http", f"{w} {probe} {get} is not a route of producer-api ({sorted(routes)[:3]}...)")
        else:
            check("ports" not in c and "livenessProbe" not in c, f"{w} a worker has no port or probe")

    # The Service selects the api pods only.
    svc = by.get(("Service", f"{FULL}-api"))
    if check(svc is not None, f"{where} no Service {FULL}-api"):
        sel = svc["spec"]["selector"]
        matched = [c for c, d in deployments.items() if all(d["spec"]["template"]["metadata"]["labels"].get(k) == x for k, x in sel.items())]
        check(matched == ["api"], f"{where} the Service selects {matched}")
        check(svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["ports"][0]["port"] == v["api"]["service"]["port"], f"{where} Service ports")
    check((("PodDisruptionBudget", f"{FULL}-api") in by) == v["api"]["podDisruptionBudget"]["enabled"], f"{where} PodDisruptionBudget")
    check((("ServiceAccount", FULL) in by) == v["serviceAccount"]["create"], f"{where} ServiceAccount")

    # The setup Job: a pre-install/pre-upgrade hook, migrate then topics, with its hook copies.
    jobs = [d for d in docs if d["kind"] == "Job"]
    if not v["setupJob"]["enabled"]:
        check(not jobs, f"{where} a Job although setupJob is disabled")
        continue
    if not check(len(jobs) == 1, f"{where} {len(jobs)} Jobs"):
        continue
    job = jobs[0]
    ann = job["metadata"]["annotations"]
    check(ann.get("helm.sh/hook") == "pre-install,pre-upgrade", f"{where} Job hook {ann.get('helm.sh/hook')}")
    spec = job["spec"]["template"]["spec"]
    check(spec["restartPolicy"] == "Never", f"{where} Job restartPolicy")
    steps = [(c["name"], c["args"]) for c in spec.get("initContainers", []) + spec["containers"]]
    topics = {"create": ["topics"], "check": ["topics", "--check"]}.get(v["setupJob"]["topics"])
    want = [("migrate", ["migrate"])] + ([("topics", topics + ["--config", CONFIG_PATH])] if topics else [])
    check(steps == want, f"{where} Job steps {steps} != {want}")
    job_secret = secret_name if v["secret"]["existingSecret"] else f"{FULL}-setup"
    for c in spec.get("initContainers", []) + spec["containers"]:
        ref = env_of(c).get("DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        check(ref.get("name") == job_secret and ref.get("key") == keys["databaseUrl"], f"{where} Job {c['name']} DATABASE_URL from {ref}")
        for name in env_of(c):
            check(name in extra_env or env_is_read(name), f"{where} Job sets {name}, which the binary does not read")
        check(c["securityContext"].get("readOnlyRootFilesystem") is True, f"{where} Job {c['name']} securityContext")
    # What the Job mounts exists before it: hook objects of a lower weight, or objects not made by the chart.
    weight = int(ann.get("helm.sh/hook-weight", "0"))
    def hook_weight(kind, name):
        d = by.get((kind, name))
        if d is None:
            return None
        a = d["metadata"].get("annotations") or {}
        return int(a["helm.sh/hook-weight"]) if "pre-install" in a.get("helm.sh/hook", "") else None
    cfg_vol = next(x for x in spec["volumes"] if x["name"] == "config")
    cfg_name = cfg_vol.get("configMap", {}).get("name") or cfg_vol.get("secret", {}).get("secretName")
    w_cfg = hook_weight(cfg_kind, cfg_name)
    check(w_cfg is not None and w_cfg < weight, f"{where} the Job's config {cfg_name} is no earlier hook")
    if cfg_name and (cfg_kind, cfg_name) in by:
        hook_text = (by[(cfg_kind, cfg_name)].get("data") or by[(cfg_kind, cfg_name)].get("stringData"))["config.toml"]
        check(hook_text == text, f"{where} the Job's config differs from the pods'")
    if not v["secret"]["existingSecret"]:
        w_sec = hook_weight("Secret", job_secret)
        check(w_sec is not None and w_sec < weight, f"{where} the Job's Secret is no earlier hook")
        check(secret_data(by, job_secret) == created, f"{where} the Job's Secret differs from the pods'")
    if v["serviceAccount"]["create"]:
        w_sa = hook_weight("ServiceAccount", spec["serviceAccountName"])
        check(w_sa is not None and w_sa < weight, f"{where} the Job's ServiceAccount is no earlier hook")
    else:
        check(spec["serviceAccountName"] == (v["serviceAccount"]["name"] or "default"), f"{where} Job serviceAccountName")
    print(f"{case}: {len(docs)} objects: " + ", ".join(sorted(f"{d['kind']}/{d['metadata']['name'].replace(FULL, '~')}" for d in docs)))

if failures:
    print("\n".join("FAIL " + f for f in failures))
    sys.exit(1)
print(f"rendered objects: OK ({len(cases)} cases)")
PY

# --- 4. Kubernetes types -----------------------------------------------------------------------
step "strict decoding into the Kubernetes API types"
for rendered in "$OUT"/*.yaml; do
    printf '%s: ' "$(basename "$rendered" .yaml)"
    "$KUBECHECK" <"$rendered"
done

# --- 5. the schema rejects bad values ----------------------------------------------------------
step "values.schema.json rejects bad values"
rejected=0
while IFS='|' read -r flag value reason; do
    [[ -z "$flag" ]] && continue
    if err="$("$HELM_BIN" template check "$CHART" "$flag" "$value" 2>&1 >/dev/null)"; then
        echo "FAIL: accepted $flag $value ($reason)" >&2
        exit 1
    fi
    if ! grep -q "don't meet the specifications of the schema" <<<"$err"; then
        echo "FAIL: $flag $value failed, but not by the schema: $err" >&2
        exit 1
    fi
    rejected=$((rejected + 1))
    printf '  rejected %-55s %s\n' "$value" "$(grep -m1 '^- at' <<<"$err")"
done <<'CASES'
--set|workers.action.replicas=-1|negative replicas
--set|workers.action.replicas=two|replicas not an integer
--set|workers.batch.enabled=true|no such pool
--set|worker.action.replicas=2|unknown top-level key (typo of workers)
--set|config.kafka.bogus=1|not a key of the config file (the binary refuses unknown keys)
--set|config.kafka.properties.session\.timeout\.ms=6000|librdkafka properties are strings
--set|config.kafka.timeout_ms=50|the binary refuses a Kafka timeout below 100 ms
--set|config.pools.members=0|at least one consumer per process
--set|config.engine.inline_steps={actoin}|not a step type
--set|setupJob.topics=maybe|create, check or skip
--set|terminationGracePeriodSeconds=5|shorter than the 20 s drain
--set|workers.action.terminationGracePeriodSeconds=10|shorter than the 20 s drain
--set|image.pullPolicy=Sometimes|not a pull policy
--set|secret.databaseUrl=mysql://db/x|not a PostgreSQL URL
--set|secret.smtpUrl=http://mail|not an smtp:// URL
--set|podAnnotations.port=9090|annotation values are strings
--set|api.service.port=70000|not a port
--set|egressAllow={10.0.0.0/8\,192.168.0.0/16}|one entry per item, no commas
--set|allocator.purgeDelayMs=-5|-1 (never) is the least delay
CASES
echo "values.schema.json: $rejected bad values rejected"

# --- --run: the rendered pods as local processes -----------------------------------------------
if [[ "$RUN" == true ]]; then
    BIN="${PAYOS_WORKFLOWS_BIN:-target/debug/payos-workflows}"
    [[ -x "$BIN" ]] || { echo "--run needs the binary: cargo build -p payos-workflows (or PAYOS_WORKFLOWS_BIN)" >&2; exit 1; }
    : "${DATABASE_URL:?--run needs DATABASE_URL}" "${KAFKA_BOOTSTRAP_SERVERS:?--run needs KAFKA_BOOTSTRAP_SERVERS}"
    port="${HELM_CHECK_API_PORT:-18080}"
    step "running the rendered pods locally ($BIN, api on 127.0.0.1:$port)"
    "$HELM_BIN" template check "$CHART" -f "$CHART/ci/full-values.yaml" \
        --set-string config.kafka.bootstrap="$KAFKA_BOOTSTRAP_SERVERS" \
        --set config.kafka.replication=1 --set config.kafka.partitions=4 \
        --set-string config.topics.prefix="helmcheck-$(date +%s)-$$." \
        --set-string secret.databaseUrl="$DATABASE_URL" \
        --set-string secret.smtpUrl=smtp://127.0.0.1:2525 \
        --set-string config.payos.api_url=http://127.0.0.1:8099 \
        --set api.containerPort="$port" >"$OUT/run.yaml"
    python3 - "$OUT/run.yaml" "$BIN" "$OUT/run" <<'PY'
import base64, os, signal, subprocess, sys, time, urllib.request, yaml

manifest, binary, work = sys.argv[1], os.path.abspath(sys.argv[2]), sys.argv[3]
docs = [d for d in yaml.safe_load_all(open(manifest)) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
os.makedirs(work, exist_ok=True)
failures = []

def secret_value(name, key):
    s = by[("Secret", name)]
    if key in (s.get("data") or {}):
        return base64.b64decode(s["data"][key]).decode()
    return (s.get("stringData") or {}).get(key)

def config_file(pod_spec):
    vol = next(v for v in pod_spec["volumes"] if v["name"] == "config")
    if "configMap" in vol:
        name = vol["configMap"]["name"]
        text = by[("ConfigMap", name)]["data"]["config.toml"]
    else:
        name = vol["secret"]["secretName"]
        text = by[("Secret", name)]["stringData"]["config.toml"]
    path = os.path.join(work, name + ".toml")
    if not os.path.exists(path):  # written once: a running process may be reading it
        open(path, "w").write(text)
    return path

def command(container, cfg):
    env = {"PATH": os.environ["PATH"]}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            value = secret_value(ref["name"], ref["key"])
            if value is not None:
                env[e["name"]] = value
    args = [a.replace("/etc/payos-workflows/config.toml", cfg) for a in container["args"]]
    return [binary] + args, env

job = next(d for d in docs if d["kind"] == "Job")
spec = job["spec"]["template"]["spec"]
cfg = config_file(spec)
for c in spec.get("initContainers", []) + spec["containers"]:
    argv, env = command(c, cfg)
    t = time.time()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    print(f"setup Job {c['name']}: `{' '.join(argv[1:])}` exit {r.returncode} in {time.time() - t:.1f}s")
    if r.returncode != 0:
        sys.exit(f"setup Job container {c['name']} failed:\n{r.stdout}{r.stderr}")

procs = {}
try:
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        argv, env = command(spec["containers"][0], config_file(spec))
        log = os.path.join(work, d["metadata"]["name"] + ".log")
        procs[d["metadata"]["name"]] = (subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), d, log)
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "api")
    c = api["spec"]["template"]["spec"]["containers"][0]
    port = c["ports"][0]["containerPort"]
    deadline = time.time() + 120
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        url = f"http://127.0.0.1:{port}{c[probe]['httpGet']['path']}"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    print(f"api {probe}: GET {url} -> {r.status} {r.read().decode()!r}")
                break
            except Exception:
                if time.time() > deadline:
                    failures.append(f"api {probe}: {url} never answered")
                    break
                time.sleep(0.5)
    time.sleep(5)
    for name, (p, d, log) in procs.items():
        if p.poll() is not None:
            failures.append(f"{name} exited {p.returncode}: {open(log).read()[-1500:]}")
        else:
            print(f"{name}: up")
finally:
    t = time.time()
    for p, _, _ in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for name, (p, d, _) in procs.items():
        grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        try:
            p.wait(timeout=max(0.1, grace - (time.time() - t)))
            print(f"{name}: exit {p.returncode} {time.time() - t:.1f}s after SIGTERM (grace {grace}s)")
            if p.returncode != 0:
                failures.append(f"{name} exited {p.returncode} on SIGTERM")
        except subprocess.TimeoutExpired:
            p.kill()
            failures.append(f"{name} still running after its {grace}s grace period")
if failures:
    sys.exit("\n".join("FAIL " + f for f in failures))
print("the rendered pods run: OK")
PY
fi

step "helm chart checks passed"
