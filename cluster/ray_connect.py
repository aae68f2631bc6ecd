"""How the driver reaches Ray: join a running cluster or start a local one, and how workers import us.

`connect` is step 2 of `RayExecutor` start-up. Joining fails fast when nobody listens at the
address (Ray itself retries for minutes), and loopback addresses stay on loopback (Ray otherwise
swaps 127.0.0.1 for the host's routable IP and never connects).

Token authentication (on by default for new Ray heads): a driver joining by address sends the
cluster token when one is available here - RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
else ~/.ray/auth_token - even if RAY_AUTH_MODE is unset (Ray itself only does that for
address="auto"); RAY_AUTH_MODE=disabled opts out. A cluster that wants a token we do not have
fails with `ClusterAuthError`, whose message says how to get it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

logger = logging.getLogger(__name__)


def connect(address: str | None, connect_timeout_s: float = 10.0) -> bool:
    """Reuse an initialized Ray; else join `address`/RAY_ADDRESS; else start a local one.

    Returns True when this call connected the driver (so shutdown should disconnect it).
    """
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in (None, "auto", current):
            logger.warning("this process is already connected to Ray at %s; using it, not address=%s",
                           current, address)
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address, connect_timeout_s)
        if is_loopback(address):
            keep_ray_on_loopback()
        send_token_if_available()
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as e:
            if _caused_by_auth(e):
                raise ClusterAuthError(missing_token_message(address)) from e
            raise
        return True
    keep_ray_on_loopback()
    # Ray starts workers at nice 15; ours do all the model's work, so a busy driver or any
    # other process would otherwise starve the pipeline (measured: PP=2 20x slower under load)
    os.environ.setdefault("RAY_worker_niceness", "0")
    # num_cpus left to Ray: it counts the machine's cores, honouring container CPU limits
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    return True


class ClusterUnreachableError(ConnectionError):
    """The Ray cluster named by address= / RAY_ADDRESS does not answer."""


class ClusterAuthError(ConnectionError):
    """The Ray cluster wants an authentication token this process does not have (or a different one)."""


def send_token_if_available() -> bool:
    """Turn on token mode for this process when RAY_AUTH_MODE is unset and a token is at hand.

    Ray's own rule for `ray start --head` and `ray.init(address="auto")`, applied to an explicit
    address too. Sending a token to a cluster without authentication is harmless (it is ignored).
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:   # a Ray without token authentication
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def missing_token_message(address: str) -> str:
    """What to do when the cluster at `address` rejects this process's (missing) token."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    return (f"the Ray cluster at {address!r} requires token authentication and rejected this process "
            f"(RAY_AUTH_MODE={mode}, token file {token_file}"
            f"{', RAY_AUTH_TOKEN set' if os.environ.get('RAY_AUTH_TOKEN') else ''}). Get the cluster's token: on "
            "the head machine run `ray get-auth-token` (start_head.sh also printed its token file), then here "
            "save it to ~/.ray/auth_token, or set RAY_AUTH_TOKEN_PATH=/path/to/file or RAY_AUTH_TOKEN=<token>, "
            "and set RAY_AUTH_MODE=token")


def _caused_by_auth(exc: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    seen = exc
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen) \
                or "Authentication token is missing" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast if `host:port` does not accept connections.

    `ray.init(address=...)` on an address nobody listens at retries for minutes; a TCP probe
    answers in at most `timeout_s`. "auto", "local" and other non host:port forms are left to Ray.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnreachableError(
            f"cannot reach the Ray cluster at {address!r} ({e}); start it with `ray start --head`, or fix "
            "address= / RAY_ADDRESS, or unset RAY_ADDRESS to start a local cluster") from e


def is_loopback(address: str) -> bool:
    """'127.0.0.1:6379', 'localhost:6379', 'ray://127.0.0.1:10001' -> True."""
    host = address.removeprefix("ray://").rpartition(":")[0]
    return host == "localhost" or host.startswith("127.")


def keep_ray_on_loopback() -> None:
    """Make a locally started Ray bind 127.0.0.1 instead of the first non-loopback address.

    `ray.init(_node_ip_address="127.0.0.1")` alone is not enough on Linux: Ray swaps a loopback
    address for a routable one unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which it reads once at
    import. Set the variable (for the processes Ray spawns) and the constant it was parsed into.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):   # a Ray without the switch: it binds what it binds
        pass


REPO_ROOT = Path(__file__).resolve().parent.parent   # holds cluster/, sharding/, scheduler/


def worker_runtime_env(repo_root: Path = REPO_ROOT) -> dict:
    """Let workers import `cluster`, `sharding`, `scheduler` - without a runtime env when they already can.

    A runtime env costs each actor ~1-2 s (no pre-started worker process fits it), so it is only
    added when needed: the job's working_dir/py_modules already ship the code, and a driver whose
    interpreter has this very checkout installed (editable) or in site-packages gives its workers
    the same (on this node; other nodes need the same install or `ray job submit --working-dir`).
    Otherwise the repo root goes on the workers' PYTHONPATH.
    """
    job_env = ray.get_runtime_context().runtime_env or {}
    if job_env.get("working_dir") or job_env.get("py_modules") or _installed_here(repo_root):
        return {}
    path = os.environ.get("PYTHONPATH", "")
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(repo_root), path) if p)}}


def _installed_here(repo_root) -> bool:
    """True if this interpreter imports this checkout's packages from any working directory."""
    import json
    import site
    from importlib.metadata import PackageNotFoundError, distribution

    if any(repo_root == Path(d).resolve() for d in site.getsitepackages()):
        return True
    try:
        url = json.loads(distribution("shardline").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, ValueError):
        return False
    editable = url.get("dir_info", {}).get("editable", False)
    return editable and url.get("url", "").removeprefix("file://") == str(repo_root)
