"""Build and start the Serve application: Ingress (FastAPI, relays) -> LiveReplica (model, sessions).

    app = build_app(spec)                      # a serve.Application; spec: config.py's dict
    url = start(spec)                          # ray.init (or join spec.serve.address), serve.run; -> page URL
    print(deploy_yaml(spec))                   # the same app as a `serve deploy` file for a Ray cluster

`build_app` is also the application builder named in deploy files (import_path
runtime.serve.app:build_app), so `serve deploy` and `python -m runtime.serve` run the same code.
"""
from __future__ import annotations

import logging
import time

from runtime.serve.config import ServeConfig, resolve

log = logging.getLogger(__name__)


def replica_options(cfg: ServeConfig, max_sessions: int) -> dict:
    """Deployment options of LiveReplica: resources, replica count or autoscaling, the session router."""
    from ray.serve.config import RequestRouterConfig

    from runtime.serve.router import SessionRouter
    opts = {
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        # per session: its frame stream, one push, and a source/command/close now and then
        "max_ongoing_requests": 5 * max_sessions + 4,
        "request_router_config": RequestRouterConfig(request_router_class=SessionRouter,
                                                     request_routing_stats_period_s=cfg.routing_stats_period_s,
                                                     request_routing_stats_timeout_s=max(5.0, cfg.routing_stats_period_s)),
        "health_check_period_s": cfg.health_check_period_s,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if cfg.replicas is not None:
        opts["num_replicas"] = cfg.replicas
    else:
        # each session holds one long-lived frame stream, so ongoing requests ~ sessions
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.target_sessions,
                                      "upscale_delay_s": cfg.upscale_delay_s,
                                      "downscale_delay_s": cfg.downscale_delay_s}
    return opts


def build_app(spec: dict):
    """The Serve application of a deployment dict (config.py). Raises ValueError on a bad spec."""
    from ray import serve

    from runtime.serve.deployment import LiveReplica
    from runtime.serve.ingress import ingress_deployment
    cfg, _live, web, _model = resolve(spec)
    replica = serve.deployment(LiveReplica, name="LiveReplica").options(**replica_options(cfg, web.max_sessions))
    ingress = ingress_deployment().options(num_replicas=cfg.ingress_replicas, max_ongoing_requests=10_000,
                                           ray_actor_options={"num_cpus": 0.5})
    return ingress.bind(replica.bind(spec), spec)


def start(spec: dict, blocking: bool = False) -> str:
    """Start (or join) Ray, start Serve's proxy on cfg.host:cfg.port, deploy; returns the page URL."""
    import ray
    from ray import serve
    cfg, _live, web, _model = resolve(spec)
    if not ray.is_initialized():
        if cfg.address is not None:
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            _loopback_ray()
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(spec), name=cfg.app_name, route_prefix="/", blocking=blocking)
    log.info("application %s ready in %.1f s", cfg.app_name, time.perf_counter() - t0)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{shown}:{cfg.port}/" + (f"?token={web.token}" if web.token else "")


def _loopback_ray() -> None:
    """A Ray started here (tests, the load test, one machine) listens on 127.0.0.1 only.

    Ray picks the address other nodes would reach (the machine's own interface) unless clustering
    is off, in which case it uses loopback: the switch is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    (ray/_private/ray_constants.py, read at import, hence also set on the imported module). Its
    child processes inherit the variable. To span machines, start Ray with `ray start --head` and
    pass --address instead."""
    import os

    import ray._private.ray_constants as ray_constants
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def stop(cfg: ServeConfig) -> None:
    import ray
    from ray import serve
    try:
        serve.delete(cfg.app_name)
        serve.shutdown()
    finally:
        if cfg.address is None:
            ray.shutdown()


def deploy_yaml(spec: dict) -> str:
    """A `serve deploy` file for this deployment dict (run it on the head node of a Ray cluster)."""
    import yaml
    cfg, _live, _web, _model = resolve(spec)
    doc = {"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port},
           "applications": [{"name": cfg.app_name, "route_prefix": "/", "import_path": "runtime.serve.app:build_app",
                             "args": spec}]}
    return yaml.safe_dump(doc, sort_keys=False)
