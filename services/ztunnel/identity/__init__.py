"""Workload certificates: the CA client (ca_client.py) and the per-identity certificate manager."""
