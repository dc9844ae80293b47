"""Sans-IO telephony protocols, one module per platform (as pipecat's ``FrameSerializer``).

A protocol object holds one connection's protocol state and nothing else: bytes or messages in
(:meth:`~plugins.protocols.base.PlatformProtocol.receive`), typed events out (:mod:`.base`),
replies as values. No sockets, no asyncio, no clock: each can be driven from a unit test by
feeding it what the platform sends, and every platform shares one transport per socket kind
and one error ladder (:mod:`plugins.session`, :mod:`plugins.transports`).
"""
