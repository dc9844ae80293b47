"""The addresses the plugins' flags name: listeners (``host:port``, ``host:port/path``) and the
source networks a listener admits (``--audiosocket-allow``, ``--siprec-allow``).

A bare port binds the loopback interface: a listener reachable from other machines
(AudioSocket has no authentication) is something an operator writes out, e.g.
``0.0.0.0:9092``. An empty allow list admits any source that reaches the listener.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

Network = IPv4Network | IPv6Network


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``":9092"``, ``"9092"`` or ``"host:9092"`` -> (host, port)."""
    host, _, port = value.rpartition(":")
    return host or default_host, int(port)


def parse_listen_path(value: str, default_host: str = "127.0.0.1") -> tuple[str, int, str]:
    """``":8080/twilio"`` or ``"host:8080/twilio"`` -> (host, port, "/twilio")."""
    hostport, slash, path = value.partition("/")
    host, port = parse_hostport(hostport, default_host)
    return host, port, "/" + path if slash else "/"


def parse_networks(value: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8,192.0.2.7"`` -> networks (a bare address is a /32 or /128)."""
    return tuple(ip_network(part.strip(), strict=False) for part in value.split(",")
                 if part.strip())


def allowed(allow: Sequence[Network], host: str) -> bool:
    """Whether a peer at ``host`` may connect: any, when ``allow`` is empty; an IPv4 peer on
    a dual-stack socket (``::ffff:10.1.2.3``) is matched as the IPv4 address it is."""
    if not allow:
        return True
    try:
        address = ip_address(host)
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in allow)
