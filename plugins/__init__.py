"""Telephony plugins: bridges from a PBX or contact-center media fork to the detection service.

One home per concern:

- :mod:`plugins.protocols`: one sans-IO protocol per platform (AudioSocket, Twilio,
  FreeSWITCH, AudioHook): bytes or messages in, typed events out, replies as values;
- :mod:`plugins.transports`: one transport per socket kind (TCP, WebSocket);
- :mod:`plugins.session`: one connection's life, and the one error ladder they all share;
- :mod:`plugins.bridge`: ``DetectorLink`` (the process's gRPC client of the detector) and
  ``CallBridge`` (one call's detection streams through the asyncio SDK: the stall bound,
  reconnects, the summary merged over them);
- :mod:`plugins.delivery`: alerts and summaries to the platform's back channel and the signed
  webhook (:mod:`plugins.webhook`), AMI in :mod:`plugins.asterisk`;
- :mod:`plugins.audiosocket`, :mod:`plugins.twilio`, :mod:`plugins.freeswitch`,
  :mod:`plugins.audiohook`: each platform's listener, admission checks and back channel.

- :mod:`plugins.siprec`: the SIPREC recording server (SIP, SDP, RTP);
- :mod:`plugins.config`, :mod:`plugins.metrics`, :mod:`plugins.errors`: the plugins' own
  flags and settings, Prometheus series and exception base; nothing here imports ``server``.

``python -m plugins serve`` (:mod:`plugins.app`) runs them all.
"""
