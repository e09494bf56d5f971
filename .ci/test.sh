#!/usr/bin/env bash
# The test command (`make test` runs it): install and start the real services the tests use,
# run ruff, pyright and pytest, stop the services. OpenSSH and Slurm need root and apt; without
# them their tests are skipped with a reason (in CI, STRICT=1 makes that an error).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export LAB=${LAB:-/tmp/ftcluster-slurm}

started=0 k8s_started=0
cleanup() {
  if [ "$started" = 1 ]; then bash .ci/slurm-down.sh >/dev/null 2>&1 || true; fi
  if [ "$k8s_started" = 1 ]; then LAB=$K8S_LAB bash .ci/k8s-down.sh >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# OpenSSH: tests/support/sshd_fixture.py runs a real sshd (and the ssh client) for the submit-over-SSH tests.
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server openssh-client >/dev/null
  else
    echo "note: OpenSSH missing and not root; the SSH tests will be skipped (apt-get install -y openssh-server)" >&2
  fi
fi

if [ -z "${SLURM_CONF:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    bash .ci/slurm-down.sh >/dev/null 2>&1 || true
    NODES=2 bash .ci/slurm-up.sh
    started=1
    export SLURM_CONF=$LAB/etc/slurm.conf
  elif [ "${STRICT:-0}" = 1 ]; then
    echo "STRICT=1 but Slurm cannot be started here (needs root and apt-get)" >&2; exit 1
  else
    echo "note: not root; Slurm tests will be skipped" >&2
  fi
fi

# A real Kubernetes API server (apiextensions-apiserver + etcd, the vendored CRDs) for tests/test_k8s_*.py.
# The first start on a machine builds it from Debian packages (3-5 min); later starts take seconds.
K8S_LAB=${K8S_LAB:-/tmp/ftcluster-k8s}
if [ -z "${FTCLUSTER_TEST_KUBECONFIG:-}" ]; then
  if command -v apt-get >/dev/null; then
    LAB=$K8S_LAB bash .ci/k8s-down.sh >/dev/null 2>&1 || true
    LAB=$K8S_LAB bash .ci/k8s-up.sh
    k8s_started=1
    export FTCLUSTER_TEST_KUBECONFIG=$K8S_LAB/admin.kubeconfig
    # The build also leaves Debian's kubectl there: the manifests tests run `kubectl kustomize`.
    command -v kubectl >/dev/null || export PATH="$PATH:${K8S_CACHE:-$HOME/.cache/ftcluster-k8s}/bin"
  elif [ "${STRICT:-0}" = 1 ]; then
    echo "STRICT=1 but the Kubernetes API server cannot be started here (needs apt-get)" >&2; exit 1
  else
    echo "note: no apt-get; Kubernetes API server tests will be skipped" >&2
  fi
fi

ruff check ftcluster tests benchmarks
basedpyright  # type check of the core package (basic mode; [tool.pyright] in pyproject.toml)
hadolint Dockerfile
python -m pytest -q -p no:cacheprovider "$@"
