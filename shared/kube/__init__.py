"""A small Kubernetes API client for Trio: list, watch (with bookmarks) and merge-patch over lightkube's
configuration and TLS (client.py), and a reflector that keeps one collection's list+watch going
(reflector.py). Used by the node agent's pod source and the istiod stub's `--kubernetes` world."""
