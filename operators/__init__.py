"""Tessera's Kubernetes operator (kopf), importable as `tessera_operator`.

- `builders`: pure functions from a FineTuneJob/Adapter to the objects the operator creates
  (ConfigMap, Workflow, InferenceService, Adapter); `tessera render` prints them.
- `status`: pure functions from what was observed (Workflow, PyTorchJob or TrainJob, progress file, eval
  report, publish record) to the job's status, Events and the promotion decision.
- `serving`: hot-loading adapters into predictor replicas through the adapter API.
- `kube`, `artifacts`: thin shells over the Kubernetes client and the artifact store.
- `handlers`: the kopf handlers (importing it registers them): `tessera operator`, or
  `kopf run -m tessera_operator.handlers`.
"""
