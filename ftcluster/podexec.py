"""``python -m ftcluster.podexec``: the pods' entry point under the name rendered manifests use.

The code lives in :mod:`ftcluster.backends.kubernetes.podexec`; this name stays because every
PyTorchJob, TrainJob and ClusterTrainingRuntime rendered so far (and committed to GitOps repos)
runs ``python -m ftcluster.podexec``, so an image upgrade must not break them.
"""

from __future__ import annotations

from .backends.kubernetes.podexec import main

if __name__ == "__main__":
    raise SystemExit(main())
