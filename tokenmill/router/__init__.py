"""`tokenmill route`: one OpenAI endpoint over model tiers and replicas.

config.py      the router.yaml schema, validated with messages naming the key
balancing.py   replica pools and the policies that pick a replica (prefix affinity, least outstanding, round robin)
health.py      active /health probes and passive ejection
checks.py      escalation checks run on the cheap tier's answer
costs.py       prices and what a request cost
logs.py        the usage log and the escalation log (JSON lines)
metrics.py     the router's Prometheus metrics
proxy.py       forwarding with failover, streaming pass-through, escalation
app.py         the HTTP server: auth, routing, guardrails, endpoints
supervisor.py  `launch:` backends: local `tokenmill serve` processes started and restarted by the router
report.py      `tokenmill route report` over the logs
cli.py         the `route` subcommand
"""
