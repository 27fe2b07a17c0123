"""The lab: a multi-node ambient cluster built from network namespaces on one Linux host (README.md here)."""
