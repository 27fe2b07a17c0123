"""The node agent's Kubernetes pod source: pods of its node and all namespaces from the API server, and the
pods' `ambient.istio.io/redirection` annotation written back to it (as upstream's istio-cni agent does)."""
