"""HTTP for probes and scrapes: /metrics (Prometheus), /healthz, /readyz."""

from __future__ import annotations

import json

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.endpoints import serverFromString
from twisted.web import resource, server


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, engine) -> None:
        super().__init__()
        self.engine = engine

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.engine.metrics.registry)


class _Health(resource.Resource):
    isLeaf = True

    def __init__(self, engine, *, readiness: bool) -> None:
        super().__init__()
        self.engine = engine
        self.readiness = readiness

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        if not self.readiness:
            return b'{"status": "alive"}'
        ready, details = self.engine.readiness()
        request.setResponseCode(200 if ready else 503)
        return json.dumps({"status": "ready" if ready else "not-ready", **details}).encode()


def site_for(engine) -> server.Site:
    root = resource.Resource()
    root.putChild(b"metrics", _Metrics(engine))
    root.putChild(b"healthz", _Health(engine, readiness=False))
    root.putChild(b"readyz", _Health(engine, readiness=True))
    site = server.Site(root)
    site.noisy = False
    return site


def start_http(reactor, endpoint: str, engine):
    return serverFromString(reactor, endpoint).listen(site_for(engine))
