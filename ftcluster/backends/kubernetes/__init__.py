"""The Kubernetes backend: PyTorchJob/TrainJob objects (:mod:`.backend`), the API connection and
its one-line errors (:mod:`.client`), the doctor's checks (:mod:`.preflight`) and the pods' entry
point (:mod:`.podexec`)."""
