"""The node-local xDS server: Envoy sidecars' listeners, clusters, endpoints and routes, served
over ADS from the same desired state CTLB programs.

`XdsServer` is the agent's handle; `resources` builds the Envoy config (and documents its names),
`snapshot` versions it, `stream` holds the ADS protocol rules.
"""

from meshredirect.xds.errors import XdsError
from meshredirect.xds.resources import DEFAULT_OUTBOUND_PORT, Options
from meshredirect.xds.server import DEFAULT_SOCKET_NAME, XdsServer
from meshredirect.xds.snapshot import Snapshot

__all__ = ["DEFAULT_OUTBOUND_PORT", "DEFAULT_SOCKET_NAME", "Options", "Snapshot", "XdsError", "XdsServer"]
