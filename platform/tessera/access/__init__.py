"""Who may call which model on an inference server, and the trail of who did.

One ASGI middleware for both runtimes (`middleware.AccessControl`): identity from a bearer token
(Kubernetes TokenReview, or a keys file), authorization by SubjectAccessReview (`use` on
`adapters.tessera.dev/<model>`), quotas per subject and group, an audit line per request; and the
adapter API guard (`guard.LoopbackOnlyAdapterApi`). Standard library only (prometheus_client when
present) and relative imports only: the chart ships this directory into vLLM's pods as the package
`tessera_access`, so the same code runs there unchanged.
"""
