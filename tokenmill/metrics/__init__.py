"""Serving metrics: stats handed from the engine loop (stats.py) to the Prometheus exporter (prometheus.py),
the periodic log line (loggers.py) and the usage/cost records (usage.py)."""
