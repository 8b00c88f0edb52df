"""``spectra serve --replicas N``: a Ray cluster, Serve's HTTP proxy on ``--host:--port``, the application.

Without ``--ray-address`` the launcher starts a Ray head node of its own, bound to 127.0.0.1 (no dashboard, no
usage reporting), whose processes are children of this one; it is stopped with the server, so SIGTERM or
Ctrl-C leaves nothing running. With ``--ray-address`` it joins that cluster, and on exit deletes only its
application, leaving the cluster and Serve's proxy to their owner. ``RAY_TMPDIR`` moves Ray's session files
(sockets, logs) out of /tmp/ray, e.g. for clusters started side by side.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

import ray
from ray import serve

from server.cluster.application import APP_NAME, build_application
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


# Read by every Ray process at start. No usage statistics are sent anywhere (CI and these machines have no
# internet). The rest is Ray Serve's own throughput profile (RAY_SERVE_THROUGHPUT_OPTIMIZED) without its direct
# ingress, which would open an HTTP port per replica: user code on the replica's event loop instead of a thread
# of its own, the router on the caller's loop, and requests between deployments over gRPC rather than actor
# calls. Each streamed token crosses two deployments (replica -> ingress -> proxy), and on a 2-core machine
# those hops cost as much CPU as the replicas (docs/benchmarks.md, "Scale-out").
RAY_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def _start_ray(settings: ServerSettings) -> None:
    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if settings.ray_address is not None:
        ray.init(address=settings.ray_address, configure_logging=False)
        return
    ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, configure_logging=False)


def _stopped_by_signal() -> threading.Event:
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: stopping the replicas", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    return stop


def serve_replicas(settings: ServerSettings) -> None:
    started = time.monotonic()
    _start_ray(settings)
    # After ray.init, which installs a SIGTERM handler of its own that would exit without draining.
    stop = _stopped_by_signal()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            # Returns once every replica has built its engine, or raises when they keep failing to.
            serve.run(build_application(settings), name=APP_NAME, route_prefix="/")
        except RuntimeError as error:
            logger.error("the replicas did not start: %s", error)
            raise SystemExit(1) from error
        logger.info(
            "serving %d replicas on http://%s:%d (ready in %.1fs)",
            settings.replicas, settings.host, settings.port, time.monotonic() - started,
        )  # fmt: skip
        stop.wait()
    finally:
        if settings.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
        logger.info("replicas stopped")
