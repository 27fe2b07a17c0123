"""Sample apps for the lab: bookinfo-like HTTP services and a curl-like client (h11 on Trio)."""
