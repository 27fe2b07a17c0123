"""A real Kubernetes API server (kube-apiserver + etcd) on loopback, for tests and the lab."""
