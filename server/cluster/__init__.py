"""N replicas of the Spectra app behind Ray Serve (``spectra serve --replicas N``; docs/deployment.md).

Two deployments make one Serve application (``application.py``):

* ``SpectraIngress`` (``ingress.py``) takes every HTTP request from Ray Serve's proxy. The proxy routes on
  paths and headers only, never bodies, so adapter affinity needs a hop that reads the body: the ingress
  reads it, takes the adapter id a generation asks for (``affinity.py``) and forwards the whole request to a
  replica through a ``DeploymentHandle`` with ``multiplexed_model_id`` set to that id, streaming the answer
  back chunk by chunk (SSE included). Ray's router then prefers a replica that already serves that adapter.
  A custom ``RequestRouter`` was not used: it sees a request's metadata but not its body, so it would need
  the same body-reading hop, and Ray's multiplexed routing already does "replicas holding the id first, then
  the replicas holding fewest ids, then any".
* ``SpectraReplica`` (``replica.py``) builds the same engine, file store, job manager and FastAPI app as a
  single ``spectra serve`` (``server.main.build_service``) and runs forwarded requests through that app in
  process (``asgi_bridge.py``), so every route behaves exactly as it does without Ray.

``launcher.py`` starts (or joins) the Ray cluster, runs the application on ``--host:--port`` and tears both
down on SIGTERM/SIGINT.
"""
