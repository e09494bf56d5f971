#!/usr/bin/env bash
# End-to-end smoke test of the Kubernetes targets on a throwaway kind cluster (not run in CI:
# it needs Docker, kind, kubectl and network access to GitHub and the image registries).
#
#   bash docs/kind-smoke.sh                 # build a CPU image, run the quickstart as PyTorchJob and TrainJob
#   IMAGE=registry.example.com/ftcluster-train:0.1.0 BUILD=0 bash docs/kind-smoke.sh   # use your own image
#   KEEP=1 bash docs/kind-smoke.sh          # keep the cluster afterwards (kind delete cluster --name ftcluster-smoke)
#
# NOT RUN in this project's CI (no Docker there); the API paths are tested against a real API server
# instead (tests/test_k8s_backend.py). Steps: create a kind cluster; install the Training Operator v1.9.4 (PyTorchJob) and Kubeflow
# Trainer v2.3.0 (TrainJob, with JobSet); apply ftcluster's ClusterTrainingRuntime from
# manifests/base; build the training image (CPU torch, ftcluster[train], this checkout) and load
# it into the cluster; render examples/quickstart.yaml for both targets with that image, apply
# them and wait for each job to succeed. On failure it prints the job's pods and their logs.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-ftcluster-smoke}
IMAGE=${IMAGE:-ftcluster-train:smoke}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
PYTHON=${PYTHON:-python3}
TIMEOUT=${TIMEOUT:-20m}
TRAINING_OPERATOR_REF=v1.9.4   # the versions tests/schemas/ validates against
TRAINER_REF=v2.3.0
OUT=$(mktemp -d)

ftc() { "$PYTHON" -m ftcluster.cli "$@"; }
log() { printf '\n== %s\n' "$*"; }

cleanup() {
  rm -rf "$OUT"
  if [ "$KEEP" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

for tool in docker kind kubectl "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "kind-smoke: $tool is not installed" >&2; exit 2; }
done

log "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}

log "Training Operator $TRAINING_OPERATOR_REF (PyTorchJob)"
kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_REF"
log "Kubeflow Trainer $TRAINER_REF (TrainJob, JobSet)"
kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=$TRAINER_REF"
kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=5m
kubectl -n kubeflow-system wait --for=condition=Available deployment --all --timeout=5m

log "ClusterTrainingRuntime ftcluster-torch (manifests/base)"
kubectl apply --server-side -k manifests/base

if [ "$BUILD" = 1 ]; then
  log "image $IMAGE (CPU torch + ftcluster[train] from this checkout)"
  ctx="$OUT/context"
  mkdir -p "$ctx"
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$ctx"
  cat > "$ctx/Dockerfile" <<'EOF'
FROM python:3.11-slim
WORKDIR /src
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir setuptools wheel \
 && pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
COPY . /src
RUN pip install --no-cache-dir '/src[train]'
EOF
  docker build -t "$IMAGE" "$ctx"
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

# The quickstart trains on CPU and reads examples/data relative to the image's WORKDIR (/src).
wait_for() {  # kind name condition
  if ! kubectl wait --for=condition="$3" "$1/$2" --timeout="$TIMEOUT"; then
    kubectl get "$1/$2" -o yaml | tail -n 40
    kubectl get pods -o wide
    for pod in $(kubectl get pods -o name | grep "$2"); do kubectl logs "$pod" --all-containers --tail=80 || true; done
    exit 1
  fi
}

log "PyTorchJob: quickstart"
ftc render examples/quickstart.yaml --target pytorchjob --set "kubernetes.image=$IMAGE" -o "$OUT/pytorchjob"
kubectl apply --server-side -f "$OUT/pytorchjob"
wait_for pytorchjob quickstart Succeeded

log "TrainJob: quickstart-v2"
ftc render examples/quickstart.yaml --target trainjob --set "kubernetes.image=$IMAGE" --set name=quickstart-v2 \
  -o "$OUT/trainjob"
kubectl apply --server-side -f "$OUT/trainjob"
wait_for trainjob quickstart-v2 Complete

log "the kubernetes backend: ftcluster submit --wait, list, logs, cancel"
ftc submit examples/quickstart.yaml --backend kubernetes --set "kubernetes.image=$IMAGE" --set name=quickstart-api \
  --wait
ftc list --backend kubernetes --namespace default
run=$(ftc list --json | "$PYTHON" -c 'import json,sys; print([r["run_id"] for r in json.load(sys.stdin) if r["name"] == "quickstart-api"][-1])')
ftc logs "$run" | tail -n 5
ftc submit examples/quickstart.yaml --backend kubernetes --set "kubernetes.image=$IMAGE" --set name=quickstart-cancel
run=$(ftc list --json | "$PYTHON" -c 'import json,sys; print([r["run_id"] for r in json.load(sys.stdin) if r["name"] == "quickstart-cancel"][-1])')
ftc cancel "$run"

log "all jobs succeeded"
