"""dask.distributed helpers (imported only when a scheduler is asked for)."""

from __future__ import annotations

from typing import Any

from .. import config
from ..errors import VesuviusDaskError

__all__ = ["get_client", "DEFAULT_CONNECT_TIMEOUT"]

#: Seconds to wait for a scheduler before giving up: the default of config
#: ``vesuvius-dask.connect-timeout`` (``dask.config.set({"vesuvius-dask.connect-timeout": seconds})``).
DEFAULT_CONNECT_TIMEOUT = config.default("connect-timeout")

_clients: dict[str, Any] = {}


def get_client(scheduler: Any, timeout: float | None = None) -> Any:
    """Return a ``distributed.Client`` for an address (cached per process) or a client.

    Parameters
    ----------
    scheduler : str or distributed.Client
        A scheduler address (``"tcp://host:8786"``) or a connected client.
    timeout : float, optional
        Seconds to wait for the scheduler (default: the dask config value
        ``vesuvius-dask.connect-timeout``, 10 unless set).

    Raises
    ------
    VesuviusDaskError
        distributed is not installed, or the scheduler cannot be reached in time.
    """
    from ..extras import require

    Client = require("distributed", "distributed").Client
    if isinstance(scheduler, Client):
        return scheduler
    if timeout is None:
        timeout = float(config.get("connect-timeout"))
    import os

    address = str(scheduler)
    cache_key = f"{os.getpid()}:{address}"  # a client inherited through fork is not usable
    client = _clients.get(cache_key)
    if client is None or client.status not in ("running", "connecting"):
        try:
            client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise VesuviusDaskError(
                f"cannot reach the dask scheduler at {address} within {timeout:g} s ({err})"
            ) from err
        _clients[cache_key] = client
    return client
