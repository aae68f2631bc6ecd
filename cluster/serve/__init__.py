"""Shardline as a Ray Serve application: engine deployment, OpenAI ingress, metrics hub, client handle.

Ray Serve and FastAPI are imported only when this package is, so `from cluster import LLM` stays light.
"""

from cluster.serve.builder import build_app
from cluster.serve.client import ShardlineHandle, connect
from cluster.serve.config import DEFAULT_APP_NAME, ServeConfig

__all__ = ["DEFAULT_APP_NAME", "ServeConfig", "ShardlineHandle", "build_app", "connect"]
