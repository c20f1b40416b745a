"""The swarm health dashboard: a DHT crawler (crawler.py), its pure state builder (snapshot.py), Prometheus
metrics (metrics.py) and the aiohttp server of the page and the JSON API (server.py; static/ holds the page).

Nothing is imported here: `swarm.health.cli` is loaded by every `swarm` command and must stay cheap.
"""
