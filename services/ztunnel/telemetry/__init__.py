"""What ztunnel tells its operator: logging.py (the log framework), access_log.py (one line and the metrics
per connection), metrics.py (the Prometheus families)."""
