"""Scale-out on Ray Serve (`server ray-serve`, the optional extra `pip install -e ".[ray]"`).

Many replicas of the engine, each exactly what `server serve` runs (one base, its adapter tiers, the same
app factory), behind an ingress that routes each request by its `model` with Ray Serve's model multiplexing.
docs/scaleout.md tells how to run it and how it works. Nothing here imports Ray at import time except the
deployment modules (engine, catalog_deployment, router, app, cli), which only `server ray-serve` loads.
"""
