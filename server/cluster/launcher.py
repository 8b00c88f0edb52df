"""``spectra serve --replicas N``: a Ray cluster, Serve's HAProxy front on ``--host:--port``, the application.

Without ``--ray-address`` the launcher starts a Ray head node of its own, bound to 127.0.0.1 (no dashboard, no
usage reporting), whose processes are children of this one; it is stopped with the server, so SIGTERM or
Ctrl-C leaves nothing running. With ``--ray-address`` it joins that cluster, and on exit deletes only its
application, leaving the cluster and Serve's HAProxy to their owner. ``RAY_TMPDIR`` moves Ray's session files
(sockets, logs) out of /tmp/ray, e.g. for clusters started side by side.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from server.settings import ServerSettings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


# Read by every Ray process at start. No usage statistics are sent anywhere (CI and these machines have no
# internet). The rest puts Ray Serve's HAProxy in front instead of its Python proxy: replicas serve HTTP on ports
# of their own (direct ingress), HAProxy forwards each client connection to one, and for a POST it first asks
# SpectraRouter which, sending it the body. A streamed token then crosses one C hop instead of two Python ones
# (proxy <- ingress <- replica), which on a 2-core machine cost as much CPU as the replicas did
# (docs/benchmarks.md, "Scale-out"). User code runs on the replica's event loop, without a thread of its own.
RAY_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def _haproxy_environment(files: Path) -> dict[str, str]:
    """HAProxy's files in a directory of this launch's own (its defaults, under /tmp/haproxy-serve, would be
    shared by every cluster on the machine), and free ports for what Ray would put on fixed ones, which would
    collide between clusters: HAProxy's Prometheus exporter and stats page (both on all interfaces), and the
    fallback Serve proxy HAProxy sends a request to when its router named a replica it does not know yet."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


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
    # Short and under /tmp: HAProxy adds a 40-character directory and allows its socket paths 97 bytes.
    haproxy_files = Path(tempfile.mkdtemp(prefix="spx-", dir="/tmp"))
    for name, value in {**RAY_ENVIRONMENT, **_haproxy_environment(haproxy_files)}.items():
        os.environ.setdefault(name, value)
    try:
        _run(settings, started)
    finally:
        shutil.rmtree(haproxy_files, ignore_errors=True)


def _run(settings: ServerSettings, started: float) -> None:
    # Ray Serve reads the environment set above once, when it is first imported: hence imports here.
    import ray
    from ray import serve

    from server.cluster.application import APP_NAME, build_application

    if settings.ray_address is not None:
        ray.init(address=settings.ray_address, configure_logging=False)
    else:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, configure_logging=False)
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
