"""SIPREC (RFC 7865/7866): callshield as the session recording server (SRS) that an SBC or
PBX (the SRC: Cisco CUBE, Oracle/Acme, Avaya, AudioCodes, BroadWorks, Kamailio+rtpengine)
sends its call recordings to.

- :mod:`.sip`, :mod:`.sdp`, :mod:`.metadata`, :mod:`.offer`: the INVITE read, sans-IO;
- :mod:`.rtp`, :mod:`.codecs`, :mod:`.media`: RTP to 8 kHz PCM per stream (PCMU, PCMA,
  G.722), and the streams lined up as lanes;
- :mod:`.server`: the UDP/TCP (and TLS) listeners, each recording's dialog, its RTP sockets and its
  detection stream (:class:`plugins.bridge.CallBridge`, like every other plugin).

See docs/siprec.md for pointing an SRC at it.
"""
