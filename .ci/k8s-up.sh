#!/usr/bin/env bash
# A real Kubernetes API server for custom-resource tests, on 127.0.0.1, no Docker, no systemd.
# No registry reachable here ships kube-apiserver or k3s (see README.md), so this runs the upstream
# apiextensions-apiserver (k8s.io/apiextensions-apiserver, the code kube-apiserver embeds to serve CRDs)
# on etcd 3.5, both from Debian sid packages (Go sources + Debian's Go toolchain, built here).
# It serves apiextensions.k8s.io/v1 and every custom resource (PyTorchJob, TrainJob, ClusterTrainingRuntime,
# JobSet): OpenAPI + CEL validation, fieldValidation=Strict, dryRun, server-side apply, watch, /status, discovery.
# It does NOT serve core/v1 (ConfigMap, Namespace, ServiceAccount, Secret, Pod), rbac.authorization.k8s.io or
# authorization.k8s.io: only the admin client cert (O=system:masters) is authorized; any other identity
# (e.g. --as=...) gets HTTP 500 "could not find the requested resource (post subjectaccessreviews...)".
# Namespaces need not exist (NamespaceLifecycle admission is off: there is no Namespace API).
#
# Usage: bash k8s-up.sh                  # CRDs from ../tests/schemas are installed and Established before it returns
#        CRDS= bash k8s-up.sh            # no CRDs;  CRDS=/some/dir bash k8s-up.sh for others
# Afterwards:  export KUBECONFIG=$LAB/admin.kubeconfig     (stop: bash k8s-down.sh)
# First run on a machine: ~85 MB of .debs from the machine's Debian mirror (suite sid) and a ~5 min build on 2 cores;
# the binaries are kept in $K8S_CACHE (default ~/.cache/ftcluster-k8s) and reused while the Go main below is unchanged.
set -euo pipefail
T0=$(date +%s)
HERE=$(cd "$(dirname "$0")" && pwd)
LAB=${LAB:-/tmp/ftcluster-k8s}
CACHE=${K8S_CACHE:-$HOME/.cache/ftcluster-k8s}
PORT=${K8S_PORT:-16443}
ETCD_PORT=${ETCD_PORT:-12379}
SUITE=${K8S_DEBIAN_SUITE:-sid}          # the only suite with golang-k8s-apiextensions-apiserver-dev (0.36.4 on 2026-11-30)
CRDS=${CRDS-$HERE/../tests/schemas}   # the vendored CRDs (provenance in tests/schemas/SOURCES.md)

if [ -f "$LAB/run/apiserver.pid" ] || [ -f "$LAB/run/etcd.pid" ]; then
  echo "already up? run k8s-down.sh first" >&2; exit 1; fi
for p in "$PORT" "$ETCD_PORT" $((ETCD_PORT+1)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "port $p already in use" >&2; exit 1; fi; done

# ---------------------------------------------------------------- build (once per machine)
# Go packages that `go list -deps` of the server below needed on 2026-11-30 (82 names). If sid has moved on
# and a name is gone or the build fails, the whole Depends closure of golang-k8s-apiextensions-apiserver-dev
# (~320 packages, ~320 MB) is used instead.
GOPKGS="golang-cel-cel-go-dev golang-cel-expr-dev golang-etcd-server-dev golang-github-antlr4-go-antlr-dev
golang-github-beorn7-perks-dev golang-github-blang-semver-dev golang-github-cenkalti-backoff-v5-dev
golang-github-cespare-xxhash-v2-dev golang-github-coreos-go-semver-dev golang-github-coreos-go-systemd-dev
golang-github-davecgh-go-spew-dev golang-github-docker-spdystream-dev golang-github-emicklei-go-restful-dev
golang-github-evanphx-json-patch-dev golang-github-felixge-httpsnoop-dev golang-github-fsnotify-fsnotify-dev
golang-github-fxamacker-cbor-dev golang-github-go-logr-logr-dev golang-github-go-logr-stdr-dev
golang-github-go-openapi-jsonpointer-dev golang-github-go-openapi-jsonreference-dev golang-github-go-openapi-swag-dev
golang-github-gogo-protobuf-dev golang-github-golang-protobuf-1-5-dev golang-github-google-gnostic-models-dev
golang-github-google-uuid-dev golang-github-gorilla-websocket-dev golang-github-grpc-ecosystem-go-grpc-middleware-dev
golang-github-grpc-ecosystem-grpc-gateway-dev golang-github-json-iterator-go-dev golang-github-kylelemons-godebug-dev
golang-github-modern-go-concurrent-dev golang-github-modern-go-reflect2-dev golang-github-munnerz-goautoneg-dev
golang-github-mxk-go-flowrate-dev golang-github-nytimes-gziphandler-dev golang-github-pkg-errors-dev
golang-github-pmezard-go-difflib-dev golang-github-prometheus-client-golang-dev golang-github-prometheus-client-model-dev
golang-github-prometheus-common-dev golang-github-prometheus-procfs-dev golang-github-spf13-cobra-dev
golang-github-spf13-pflag-dev golang-github-x448-float16-dev golang-go.uber-multierr-dev golang-go.uber-zap-dev
golang-golang-x-crypto-dev golang-golang-x-exp-dev golang-golang-x-net-dev golang-golang-x-oauth2-dev
golang-golang-x-sync-dev golang-golang-x-sys-dev golang-golang-x-term-dev golang-golang-x-text-dev
golang-golang-x-time-dev golang-google-genproto-dev golang-google-grpc-dev golang-google-protobuf-dev
golang-gopkg-inf.v0-dev golang-gopkg-natefinch-lumberjack.v2-dev golang-gopkg-yaml.v2-dev golang-gopkg-yaml.v3-dev
golang-k8s-api-dev golang-k8s-apiextensions-apiserver-dev golang-k8s-apimachinery-dev golang-k8s-apiserver-dev
golang-k8s-client-go-dev golang-k8s-component-base-dev golang-k8s-klog-dev golang-k8s-kms-dev
golang-k8s-kube-openapi-dev golang-k8s-sigs-apiserver-network-proxy-dev golang-k8s-sigs-json-dev
golang-k8s-sigs-randfill-dev golang-k8s-sigs-structured-merge-diff-v6-dev golang-k8s-sigs-yaml-dev
golang-k8s-streaming-dev golang-k8s-utils-dev golang-opentelemetry-contrib-dev golang-opentelemetry-otel-dev
golang-opentelemetry-proto-dev"

# The server's main: upstream's own main.go + pkg/cmd/server Run(), plus the two settings kube-apiserver applies
# when it embeds this server (it is the only code here that is not upstream's).
main_go() { cat <<'GO'
// Command apiext-server runs the upstream Kubernetes apiextensions-apiserver as its own main.go and
// pkg/cmd/server do, plus what kube-apiserver adds when it embeds it: /apis discovery is served
// (upstream leaves that to kube-aggregator), the plain /apis list names the CRD groups (as the
// aggregator's APIService auto-registration does), and an OpenAPI v2 config is set, which starts the
// CRD OpenAPI v2/v3 publishers. Without them kubectl and the Python DynamicClient cannot map kinds
// and kubectl cannot validate.
package main

import (
	"os"
	"sort"

	"github.com/spf13/cobra"
	"k8s.io/apiextensions-apiserver/pkg/apihelpers"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/version"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/component-base/cli"
)

// listCRDGroups keeps the plain /apis group list in step with the Established CRDs; versions are
// ordered as apiextensions' own group discovery orders them (kube-aware, highest first = preferred).
func listCRDGroups(s *apiserver.CustomResourceDefinitions) error {
	crds := s.Informers.Apiextensions().V1().CustomResourceDefinitions()
	listed := map[string]bool{}
	sync := func() {
		all, err := crds.Lister().List(labels.Everything())
		if err != nil {
			return
		}
		served := map[string]map[string]bool{}
		for _, crd := range all {
			if !apihelpers.IsCRDConditionTrue(crd, apiextensionsv1.Established) {
				continue
			}
			for _, v := range crd.Spec.Versions {
				if v.Served {
					if served[crd.Spec.Group] == nil {
						served[crd.Spec.Group] = map[string]bool{}
					}
					served[crd.Spec.Group][v.Name] = true
				}
			}
		}
		for g := range listed {
			if served[g] == nil {
				s.GenericAPIServer.DiscoveryGroupManager.RemoveGroup(g)
				delete(listed, g)
			}
		}
		for g, vs := range served {
			names := make([]string, 0, len(vs))
			for v := range vs {
				names = append(names, v)
			}
			sort.Slice(names, func(i, j int) bool { return version.CompareKubeAwareVersionStrings(names[i], names[j]) > 0 })
			group := metav1.APIGroup{Name: g}
			for _, v := range names {
				group.Versions = append(group.Versions, metav1.GroupVersionForDiscovery{GroupVersion: g + "/" + v, Version: v})
			}
			group.PreferredVersion = group.Versions[0]
			s.GenericAPIServer.DiscoveryGroupManager.AddGroup(group)
			listed[g] = true
		}
	}
	_, err := crds.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(interface{}) { sync() },
		UpdateFunc: func(interface{}, interface{}) { sync() },
		DeleteFunc: func(interface{}) { sync() },
	})
	return err
}

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	cmd := &cobra.Command{
		Use: "apiext-server",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, _ []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			config, err := o.Config()
			if err != nil {
				return err
			}
			config.GenericConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(
				openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions),
				openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme))
			config.GenericConfig.OpenAPIConfig.Info.Title = "Kubernetes"
			completed := config.Complete()
			completed.GenericConfig.EnableDiscovery = true
			server, err := completed.New(genericapiserver.NewEmptyDelegate())
			if err != nil {
				return err
			}
			if err := listCRDGroups(server); err != nil {
				return err
			}
			return server.GenericAPIServer.PrepareRun().RunWithContext(c.Context())
		},
	}
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}
GO
}

STAMP=$({ main_go; echo "$SUITE"; } | sha256sum | cut -c1-16)
build() {
  local W=$CACHE/build APT=$CACHE/apt
  rm -rf "$W"; mkdir -p "$W/debs" "$W/root" "$W/src/apiext-server" "$APT/lists/partial" "$APT/cache/archives/partial" "$CACHE/bin"
  # A private apt configuration (own sources, lists and an empty dpkg status, so that an installed package of
  # a higher version does not hide sid's): the machine's own apt sources and state are not touched.
  # the machine's own Debian mirror (the first non-security URI of its apt sources), with the suite swapped for $SUITE
  local MIRROR; MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/{for(i=2;i<=NF;i++) if ($i !~ /security/) {print $i; exit}}')
  [ -n "$MIRROR" ] || MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '/^deb /{for(i=2;i<=NF;i++) if ($i ~ /^https?:/ && $i !~ /security/) {print $i; exit}}')
  [ -n "$MIRROR" ] || { echo "no Debian mirror found in this machine's apt sources" >&2; return 1; }
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" > "$APT/sources.list"
  : > "$APT/status"
  local A=(-o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts=/nonexistent -o Dir::State::Lists="$APT/lists"
           -o Dir::Cache="$APT/cache" -o Dir::State::status="$APT/status" -o APT::Sandbox::User=root)
  apt-get "${A[@]}" -qq update
  local GOV; GOV=$(apt-cache "${A[@]}" depends golang-go | awk '/Depends: golang-1\.[0-9]+-go/{print $2; exit}')
  [ -n "$GOV" ] || { echo "no golang-1.N-go behind golang-go in $SUITE" >&2; return 1; }
  local GOROOT_=$W/root/usr/lib/go-${GOV#golang-}; GOROOT_=${GOROOT_%-go}    # golang-1.27-go -> usr/lib/go-1.27
  local EXTRA="etcd-server kubectl $GOV ${GOV%-go}-src"
  fetch() { (cd "$W/debs" && apt-get "${A[@]}" -qq download "$@" >/dev/null) && for f in "$W"/debs/*.deb; do dpkg-deb -x "$f" "$W/root"; done; }
  gobuild() {
    main_go > "$W/src/apiext-server/main.go"
    (cd "$W/src/apiext-server" && env GOROOT="$GOROOT_" GOPATH="$W/root/usr/share/gocode" GO111MODULE=off \
      GOFLAGS= GOENV=off GOTOOLCHAIN=local GOPROXY=off CGO_ENABLED=0 GOCACHE="$W/gocache" \
      "$GOROOT_/bin/go" build -ldflags="-s -w" -o "$CACHE/bin/apiext-server" .)
  }
  echo "building apiext-server from Debian $SUITE sources with $GOV (first run only, ~5 min) ..."
  # shellcheck disable=SC2086
  if ! { fetch $GOPKGS $EXTRA && gobuild; }; then
    echo "short package list failed; using the whole Depends closure" >&2
    local ALL; ALL=$(apt-cache "${A[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances golang-k8s-apiextensions-apiserver-dev | grep -E '^golang-.*-dev$' | sort -u)
    rm -rf "$W/debs" "$W/root"; mkdir -p "$W/debs" "$W/root"
    # shellcheck disable=SC2086
    fetch $ALL $EXTRA && gobuild || return 1
  fi
  cp "$W/root/usr/bin/etcd" "$CACHE/bin/etcd"
  cp "$W/root/usr/bin/kubectl" "$CACHE/bin/kubectl"
  echo "$STAMP" > "$CACHE/bin/stamp"
  rm -rf "$W"      # ~0.6 GB of sources and ~1.4 GB of Go build cache
}
command -v openssl >/dev/null && command -v curl >/dev/null || {
  apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl curl >/dev/null; }
if [ "$(cat "$CACHE/bin/stamp" 2>/dev/null)" != "$STAMP" ] || [ ! -x "$CACHE/bin/apiext-server" ] || [ ! -x "$CACHE/bin/etcd" ]; then
  B0=$(date +%s); build; echo "built in $(( $(date +%s) - B0 ))s"
fi

# ---------------------------------------------------------------- certificates and kubeconfig
mkdir -p "$LAB"/{pki,log,run,etcd}
cd "$LAB/pki"
if [ ! -f admin.crt ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=ftcluster-lab-ca 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=apiext-server 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 -extfile server.ext 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
fi
b64() { base64 -w0 < "$1"; }
cat > "$LAB/admin.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster: {server: "https://127.0.0.1:$PORT", certificate-authority-data: $(b64 ca.crt)}
users:
- name: admin
  user: {client-certificate-data: $(b64 admin.crt), client-key-data: $(b64 admin.key)}
contexts:
- name: lab
  context: {cluster: lab, user: admin, namespace: default}
current-context: lab
KC
chmod 600 "$LAB/admin.kubeconfig" "$LAB"/pki/*.key
cd "$LAB"

# ---------------------------------------------------------------- etcd
"$CACHE/bin/etcd" --name lab --data-dir "$LAB/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" --initial-cluster "lab=http://127.0.0.1:$((ETCD_PORT+1))" \
  --quota-backend-bytes=$((2*1024*1024*1024)) > "$LAB/log/etcd.log" 2>&1 &
echo $! > "$LAB/run/etcd.pid"
for i in $(seq 100); do curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
  kill -0 "$(cat "$LAB/run/etcd.pid")" 2>/dev/null || { echo "etcd died:" >&2; tail -n 5 "$LAB/log/etcd.log" >&2; exit 1; }; sleep 0.1; done

# ---------------------------------------------------------------- API server
# --kubeconfig/--authentication-kubeconfig/--authorization-kubeconfig point at itself: they are required, and the
# informers for core types (Service) then fail to list, which is why readiness below excludes informer-sync.
"$CACHE/bin/apiext-server" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 --secure-port="$PORT" \
  --tls-cert-file="$LAB/pki/server.crt" --tls-private-key-file="$LAB/pki/server.key" --client-ca-file="$LAB/pki/ca.crt" \
  --kubeconfig="$LAB/admin.kubeconfig" --authentication-kubeconfig="$LAB/admin.kubeconfig" \
  --authorization-kubeconfig="$LAB/admin.kubeconfig" --authentication-skip-lookup --enable-priority-and-fairness=false \
  --disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy \
  > "$LAB/log/apiserver.log" 2>&1 &
echo $! > "$LAB/run/apiserver.pid"
C=(-s --cacert "$LAB/pki/ca.crt" --cert "$LAB/pki/admin.crt" --key "$LAB/pki/admin.key")
API=https://127.0.0.1:$PORT
ok=0
for i in $(seq 300); do
  kill -0 "$(cat "$LAB/run/apiserver.pid")" 2>/dev/null || { echo "apiext-server died:" >&2; tail -n 5 "$LAB/log/apiserver.log" >&2; exit 1; }
  [ "$(curl "${C[@]}" "$API/readyz?exclude=informer-sync" 2>/dev/null)" = ok ] && { ok=1; break; }
  sleep 0.1
done
[ $ok = 1 ] || { echo "apiext-server not ready after 30 s" >&2; tail -n 5 "$LAB/log/apiserver.log" >&2; exit 1; }

# ---------------------------------------------------------------- CRDs (POSTed as YAML; 409 = already there)
n=0; groups=""
if [ -n "$CRDS" ]; then
  for f in "$CRDS"/*.yaml; do
    [ -e "$f" ] || continue
    code=$(curl "${C[@]}" -o "$LAB/log/crd-post.json" -w '%{http_code}' -X POST -H 'Content-Type: application/yaml' \
           --data-binary @"$f" "$API/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
    case $code in 201|409) ;; *) echo "CRD $f: HTTP $code" >&2; head -c 600 "$LAB/log/crd-post.json" >&2; exit 1;; esac
    n=$((n+1)); groups+=" $(awk '/^  group:/{print $2; exit}' "$f")"
  done
  # Established = served; kubectl's validation also needs each group's OpenAPI v3 document published.
  # (pretty=false: the server pretty-prints JSON for curl's user agent)
  for i in $(seq 300); do
    est=$(curl "${C[@]}" "$API/apis/apiextensions.k8s.io/v1/customresourcedefinitions?pretty=false" | grep -o '"type":"Established","status":"True"' | wc -l || true)
    oa=$(curl "${C[@]}" "$API/openapi/v3"); miss=0
    for g in $groups; do grep -q "\"apis/$g/" <<<"$oa" || miss=1; done
    [ "$est" -ge "$n" ] && [ $miss = 0 ] && break
    sleep 0.2
  done
  [ "$est" -ge "$n" ] && [ $miss = 0 ] || { echo "CRDs not established/published after 60 s" >&2; exit 1; }
fi
echo "apiext-server $(curl "${C[@]}" "$API/version" | awk -F'"' '/"minor"/{m=$4} /goVersion/{g=$4} END{print "1."m" ("g")"}') + etcd $("$CACHE/bin/etcd" --version | awk '/etcd Version/{print $3}') on $API, $n CRDs"
command -v kubectl >/dev/null || echo "no kubectl on PATH; Debian's $("$CACHE/bin/kubectl" version --client 2>/dev/null | head -1) is in $CACHE/bin"
echo "k8s up in $(( $(date +%s) - T0 ))s;  export KUBECONFIG=$LAB/admin.kubeconfig"
