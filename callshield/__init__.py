"""What every callshield program shares: the generated gRPC stubs of the API (:mod:`callshield.v1`,
from protos/callshield/; `make protos`), the ``CALLSHIELD_*`` flag scheme
(:mod:`callshield.envflags`) and the JSON log setup (:mod:`callshield.logs`). It imports
nothing from the programs (server, worker, plugins, console, client)."""
