"""N replicas of the Spectra app behind Ray Serve (``spectra serve --replicas N``; docs/deployment.md).

Ray Serve runs in its HAProxy mode, the front Ray Serve LLM's direct streaming uses: HAProxy listens on
``--host:--port`` and forwards each client connection to a replica's own HTTP port, so a streamed token
leaves the replica once and crosses no Python hop on its way to the client. The application
(``application.py``) is two deployments:

* ``SpectraReplica`` (``replica.py``) is the ingress: it builds the same engine, file store, job manager and
  FastAPI app as a single ``spectra serve`` (``server.main.build_service``), and Ray's direct-ingress server
  runs that app in the replica (``replica_front.py`` adds the cluster-wide ``/health`` and the replica and
  affinity headers), so every route behaves exactly as it does without Ray;
* ``SpectraRouter`` (``router.py``) is the ingress request router HAProxy asks, with the request's body,
  which replica a POST goes to: Ray's own request router picks one for the adapter the body names
  (``affinity.py``) as the multiplexed model id, so an adapter's requests stay where it is resident.

``launcher.py`` sets Ray's environment, starts (or joins) the Ray cluster, runs the application on
``--host:--port`` and tears both down on SIGTERM/SIGINT.
"""
