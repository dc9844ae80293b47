"""Telephony plugins: bridges from a PBX or contact-center media fork to the detection service.

Each platform module (:mod:`plugins.audiosocket`, :mod:`plugins.twilio`,
:mod:`plugins.freeswitch`, :mod:`plugins.audiohook`) only speaks its protocol; call state, the
gRPC stream (through the asyncio SDK) and alert delivery live in :mod:`plugins.core`, and the
signed webhook in :mod:`plugins.webhook`. ``python -m plugins serve`` runs them all.
"""
