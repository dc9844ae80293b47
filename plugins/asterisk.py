"""Alerts back into an Asterisk call: channel variables set over AMI.

AudioSocket carries only a UUID, not the channel, so the dialplan publishes the mapping as a
global variable before starting the fork (see docs/platforms/asterisk.md)::

    CALLSHIELD_<uuid without dashes> = ${CHANNEL}

On an alert the plugin reads that global (AMI ``Getvar`` without a channel) and sets
``SPOOF_VERDICT``, ``SPOOF_SCORE`` and ``SPOOF_SPEAKER`` on the channel (AMI ``Setvar``), so
the dialplan can branch with ``GotoIf($["${SPOOF_VERDICT}" = "spoof"]?fraud,s,1)``. One short
AMI session per alert keeps the plugin free of a long-lived manager connection to babysit;
alerts are rare.

There is no ARI path: ARI sets channel variables only on channels inside a Stasis
application (``POST /ari/channels/{id}/variable`` on a dialplan channel answers 409 "Channel
not in Stasis application", seen on a real Asterisk), and the documented fork keeps the
caller's channel in the dialplan.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from plugins.delivery import SpoofAlert
from plugins.errors import PluginError

AMI_TIMEOUT_SECONDS = 5.0


def mapping_variable(uuid: str) -> str:
    return "CALLSHIELD_" + uuid.replace("-", "").lower()


def alert_variables(alert: SpoofAlert) -> dict[str, str]:
    return {"SPOOF_VERDICT": alert.verdict, "SPOOF_SCORE": f"{alert.spoof_probability:.3f}",
            "SPOOF_SPEAKER": alert.speaker}


class AsteriskError(PluginError):
    pass


@dataclass(frozen=True)
class AmiTarget:
    host: str
    port: int
    username: str
    secret: str

    async def set_alert(self, uuid: str, alert: SpoofAlert) -> None:
        async with asyncio.timeout(AMI_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                session = _AmiSession(reader, writer)
                await reader.readline()  # banner: "Asterisk Call Manager/x.y.z"
                await session.action("Login", Username=self.username, Secret=self.secret,
                                     Events="off")
                reply = await session.action("Getvar", Variable=mapping_variable(uuid))
                channel = reply.get("Value", "")
                if not channel:
                    raise AsteriskError(f"no channel published for AudioSocket {uuid}")
                for name, value in alert_variables(alert).items():
                    await session.action("Setvar", Channel=channel, Variable=name, Value=value)
                await session.action("Logoff", check=False)
            finally:
                writer.close()
                await writer.wait_closed()


class _AmiSession:
    """AMI's line protocol: ``Key: value`` lines, a blank line ends a packet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = itertools.count(1)

    async def action(self, name: str, *, check: bool = True, **fields: str) -> dict[str, str]:
        action_id = str(next(self._ids))
        lines = [f"Action: {name}", f"ActionID: {action_id}"]
        lines += [f"{key}: {value}" for key, value in fields.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        while True:  # skip events and other actions' replies
            packet = await self._packet()
            if packet.get("ActionID") == action_id and "Response" in packet:
                break
        if check and packet["Response"].lower() != "success":
            raise AsteriskError(f"AMI {name}: {packet.get('Message', packet['Response'])}")
        return packet

    async def _packet(self) -> dict[str, str]:
        packet: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if not line:
                raise AsteriskError("AMI closed the connection")
            text = line.decode(errors="replace").rstrip("\r\n")
            if not text:
                if packet:
                    return packet
                continue
            key, _, value = text.partition(":")
            packet[key.strip()] = value.strip()


