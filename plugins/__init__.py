"""Telephony plugins: bridges from a PBX or contact-center media fork to the detection service.

One home per concern:

- :mod:`plugins.protocols`: one sans-IO protocol per platform (AudioSocket, Twilio,
  FreeSWITCH, AudioHook): bytes or messages in, typed events out, replies as values;
- :mod:`plugins.transports`: one transport per socket kind (TCP, WebSocket);
- :mod:`plugins.session`: one connection's life, and the one error ladder they all share;
- :mod:`plugins.core`: the call's gRPC detection stream (through the asyncio SDK), reconnects;
- :mod:`plugins.delivery`: alerts and summaries to the platform's back channel and the signed
  webhook (:mod:`plugins.webhook`), AMI in :mod:`plugins.asterisk`;
- :mod:`plugins.audiosocket`, :mod:`plugins.twilio`, :mod:`plugins.freeswitch`,
  :mod:`plugins.audiohook`: each platform's listener, admission checks and back channel.

``python -m plugins serve`` runs them all.
"""
