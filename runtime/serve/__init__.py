"""Many live sessions over many GPUs and machines on Ray Serve: `python -m runtime.serve` (docs/serve.md).

config.py      ServeConfig (replicas, autoscaling, resources, memory reserve) and the deployment dict/file
deployment.py  SessionHost (a replica's sessions and admission, no Ray) and LiveReplica (the Serve deployment)
router.py      SessionRouter: Serve request router, sticky by session id, least loaded for new sessions
relay.py       Relay: one page's WebSocket to its replica; moves the session when the replica dies (no Ray)
ingress.py     the FastAPI ingress deployment: the page, /ws through a Relay, /api/stats
app.py         build_app(spec) (also the `serve deploy` builder), start(spec), deploy_yaml(spec)
client.py      a synthetic page that plays a video as its camera and checks what comes back
loadtest.py    python -m runtime.serve.loadtest: N sessions against a local Ray, a replica killed mid-run
"""
