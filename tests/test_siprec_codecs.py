"""SIPREC media and metadata beyond G.711 and RFC 7865, sans-IO: G.722 decoded from real
speech (examples/spoof_call.wav), through the jitter buffer, negotiated in an offer beside
PCMU; opus refused by name; and BroadWorks' ``recording_metadata`` dialect read from an
INVITE written the way BroadWorks writes one (tests/sipp/siprec_call_broadworks.xml has the
same body, sent by SIPp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from bench.plugin_peers import sip_request, siprec_body, siprec_metadata, siprec_sdp
from models.data.audio import mulaw_decode, resample
from plugins.siprec.codecs import G722Decoder, encode_g722
from plugins.siprec.metadata import parse_metadata
from plugins.siprec.offer import read_offer
from plugins.siprec.rtp import JitterBuffer, build_rtp, parse_rtp
from plugins.siprec.sdp import parse_sdp
from plugins.siprec.sip import SipError, parse_message

SCENARIOS = Path(__file__).resolve().parent / "sipp"
EXAMPLE = SCENARIOS.parents[1] / "examples" / "spoof_call.wav"
LOCAL = ("192.0.2.10", 5060)
SESSION = "Ks0Fb3oBEfCmugAMKfnCqw=="
PARTIES = [("caller-pid", "sip:+15550100@carrier.example", "s1", "1"),
           ("agent-pid", "sip:4711@pbx.example", "s2", "2")]
# G.722's codec (22 samples at 16 kHz) and our decimating filter (24): 23 samples at 8 kHz
G722_DELAY = 23
# what the decoded speech must score against its source. Measured on this file: 25.8 dB
# (PCMU of the same audio: 37 dB). Every broken decoder tried scores 10 dB or less: ADPCM
# state lost at each packet 0.7 dB, a decimator whose total delay falls between two 8 kHz
# samples 9.7 dB, the payload read as PCMU or in G.722's 56 kbit/s mode about 0 dB.
MIN_SNR_DB = 20.0


def speech(seconds: float = 10.0) -> np.ndarray:
    pcm, rate = soundfile.read(EXAMPLE, dtype="int16")
    assert rate == 8000
    return pcm[: int(seconds * rate)]


def g722_payloads(pcm8k: np.ndarray) -> list[bytes]:
    """8 kHz speech as a wideband phone would send it: at 16 kHz, G.722, 20 ms a packet
    (160 bytes: 320 samples at 16 kHz, 160 ticks of the RTP clock)."""
    wide = np.clip(np.rint(resample(pcm8k.astype(np.float32), 8000, 16000)), -32768, 32767)
    data = encode_g722(wide.astype(np.int16))
    return [data[i : i + 160] for i in range(0, len(data) - 159, 160)]


def snr_db(reference: np.ndarray, decoded: np.ndarray, delay: int) -> float:
    """Signal to error of ``decoded`` (``delay`` samples late), after the best gain."""
    out = decoded[delay:].astype(np.float64)
    ref = reference[: out.size].astype(np.float64)
    out = out[: ref.size]
    gain = float(np.dot(ref, out) / np.dot(out, out))
    error = ref - gain * out
    return float(10 * np.log10(np.dot(ref, ref) / np.dot(error, error)))


def test_g722_decodes_real_speech_to_8_khz_at_its_documented_delay() -> None:
    source = speech()
    payloads = g722_payloads(source)
    decoder = G722Decoder()
    chunks = [decoder(p) for p in payloads]
    assert {c.size for c in chunks} == {160}  # each packet's 20 ms at once, no buffering
    decoded = np.concatenate(chunks)
    scores = {d: snr_db(source, decoded, d) for d in range(0, 60)}
    assert max(scores, key=scores.__getitem__) == G722_DELAY
    assert scores[G722_DELAY] > MIN_SNR_DB, scores[G722_DELAY]
    # the bound tells a working decoder from broken ones, on the same audio:
    fresh = np.concatenate([G722Decoder()(p) for p in payloads])  # state lost per packet
    as_pcmu = np.concatenate([mulaw_decode(p) for p in payloads])
    assert max(snr_db(source, fresh, d) for d in range(60)) < MIN_SNR_DB / 2
    assert max(snr_db(source, as_pcmu, d) for d in range(60)) < MIN_SNR_DB / 2


def test_g722_through_the_jitter_buffer_keeps_call_time() -> None:
    """Reordered and lost G.722 packets: the output is 160 samples per 20 ms of call time,
    a loss is 160 samples of silence, and the decoder's state survives both."""
    payloads = g722_payloads(speech(1.0))
    packets = [parse_rtp(build_rtp(9, 500 + i, 80000 + 160 * i, 0xC0DEC, p))
               for i, p in enumerate(payloads)]
    buffer = JitterBuffer(9, "G722")
    order = [i for i in range(len(packets)) if i != 10]
    order[3], order[4] = order[4], order[3]
    out: list[np.ndarray] = []
    for i in order:
        packet = packets[i]
        assert packet is not None
        out += buffer.push(packet)
    out += buffer.flush()
    pcm = np.concatenate(out)
    assert pcm.size == len(packets) * 160
    assert not pcm[10 * 160 : 11 * 160].any() and pcm[11 * 160 : 12 * 160].any()
    assert buffer.stats.lost_samples == 160 and buffer.stats.late == 0


def offer(sdp: str, metadata: str | None = None) -> bytes:
    return sip_request("INVITE", "sip:srs@192.0.2.1", "call-1@192.0.2.10", 1,
                       siprec_body(sdp, metadata), local=LOCAL)


def test_offer_records_pcmu_beside_g722_and_answers_each_codec() -> None:
    sdp = siprec_sdp("192.0.2.10", [6000], ["1"], codecs="0 101") + siprec_sdp(
        "192.0.2.10", [6002], ["2"], codecs="9 101").split("t=0 0\r\n", 1)[1]
    recorded = read_offer(parse_message(offer(sdp, siprec_metadata(SESSION, PARTIES))))
    assert [(r.lane, r.payload, r.codec) for r in recorded.recorded] == [
        (0, 0, "PCMU"), (1, 9, "G722")]


def test_opus_only_offer_is_488_naming_opus() -> None:
    """No opus decoder is a dependency (docs/siprec.md says why): the SRC is told which
    codecs it offered, so the operator sees what to change on the recording leg."""
    sdp = siprec_sdp("192.0.2.10", [6000, 6002], ["1", "2"], codecs="111 101").replace(
        "a=rtpmap:101", "a=rtpmap:111 opus/48000/2\r\na=rtpmap:101")
    assert parse_sdp(sdp.encode()).media[0].codec(111) == ("OPUS", 48000)
    with pytest.raises(SipError) as caught:
        read_offer(parse_message(offer(sdp, siprec_metadata(SESSION, PARTIES))))
    assert caught.value.status == 488
    assert "OPUS" in str(caught.value) and "G722" in str(caught.value)


def broadworks_invite(call_type: str = "origCall",
                      edits: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The INVITE of tests/sipp/siprec_call_broadworks.xml, with SIPp's fields filled in
    (and ``edits``, (old, new) replacements, made first)."""
    text = (SCENARIOS / "siprec_call_broadworks.xml").read_text()
    message = text.split("<![CDATA[", 1)[1].split("]]>", 1)[0].strip("\n")
    for old, new in edits:
        assert old in message, old
        message = message.replace(old, new)
    lines = [line.strip() for line in message.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    fields = {"[remote_ip]": "192.0.2.1", "[remote_port]": "5060", "[local_ip]": "192.0.2.10",
              "[local_port]": "5060", "[transport]": "UDP", "[branch]": "z9hG4bK-bw1",
              "[call_id]": "BW1-1@192.0.2.10", "[pid]": "1", "[call_number]": "1",
              "[local_ip_type]": "4", "[media_ip_type]": "4", "[media_ip]": "192.0.2.10",
              "[media_port]": "6000", "origCall>": f"{call_type}>"}
    head, _, body = "\r\n".join(lines).partition("\r\n\r\n")
    for key, value in fields.items():
        head, body = head.replace(key, value), body.replace(key, value)
    body += "\r\n"
    head = head.replace("[len]", str(len(body.encode())))
    return (head + "\r\n\r\n" + body).encode()


def test_broadworks_metadata_names_participants_caller_and_the_mixed_stream() -> None:
    recorded = read_offer(parse_message(broadworks_invite()))
    md = recorded.metadata
    assert md is not None and md.dialect == "broadworks"
    assert md.session_id == "urn:uuid:5b0d2c8e-7a01-11f0-a6ba-000c29f9c2ab"
    assert [p.aor for p in md.participants] == ["sip:2025550147@as.example.net",
                                                "sip:+15550100@198.51.100.7;user=phone"]
    # both send the one mixed stream, whose label is the m-line's
    assert md.labels == {"urn:uuid:6c1e3d9f-7a01-11f0-a6ba-000c29f9c2ab": "1"}
    assert all(p.sends == list(md.labels) for p in md.participants)
    assert recorded.mixed and recorded.lanes == ("mixed",)
    assert [(r.payload, r.codec) for r in recorded.recorded] == [(8, "PCMA")]
    # the BroadWorks user called out: the callingPartyNumber (+1 202..., national form in
    # the participant's AOR) is the first participant
    caller = md.caller()
    assert caller is not None and caller.aor == "sip:2025550147@as.example.net"


def test_broadworks_caller_follows_the_calling_party_not_the_order() -> None:
    """A call to the BroadWorks user: the calling party is the second participant."""
    raw = broadworks_invite("termCall").replace(
        b"<callingPartyNumber>sip:+12025550147@as.example.net</callingPartyNumber>",
        b"<callingPartyNumber>tel:+15550100</callingPartyNumber>")
    md = parse_metadata(_metadata_part(raw))
    caller = md.caller()
    assert caller is not None and caller.aor == "sip:+15550100@198.51.100.7;user=phone"
    # no calling number at all: a termCall means the user (the initiator) was called
    md = parse_metadata(_metadata_part(raw).replace(
        b"<callingPartyNumber>tel:+15550100</callingPartyNumber>", b""))
    caller = md.caller()
    assert caller is not None and caller.aor == "sip:+15550100@198.51.100.7;user=phone"


def test_broadworks_with_a_stream_per_participant_is_split_caller_first() -> None:
    """BroadWorks can also send each participant's stream apart: two m-lines, the other
    party's first. The calling party (the user, on an origCall) still gets lane 0."""
    stream = "urn:uuid:6c1e3d9f-7a01-11f0-a6ba-000c29f9c2ab"
    other = "urn:uuid:7d2f4ea0-7a01-11f0-a6ba-000c29f9c2ab"
    sdp_mline = "m=audio [media_port] RTP/AVP 8 0 9 18 101"
    raw = broadworks_invite(edits=(
        (f"<aor>sip:+15550100@198.51.100.7;user=phone</aor><send><id>{stream}</id>",
         f"<aor>sip:+15550100@198.51.100.7;user=phone</aor><send><id>{other}</id>"),
        ("<mode>mixed</mode></stream>",
         f'<mode>separate</mode></stream><stream id="{other}" session="x"><label>2</label>'
         "<mode>separate</mode></stream>"),
        (sdp_mline, "m=audio 6002 RTP/AVP 0 101\na=sendonly\na=label:2\n" + sdp_mline),
    ))
    recorded = read_offer(parse_message(raw))
    assert recorded.lanes == ("caller", "agent")
    assert [(r.index, r.lane, r.codec) for r in recorded.recorded] == [(1, 0, "PCMA"),
                                                                     (0, 1, "PCMU")]
    assert recorded.aor(0) == "sip:2025550147@as.example.net"
    assert recorded.aor(1) == "sip:+15550100@198.51.100.7;user=phone"


def _metadata_part(raw: bytes) -> bytes:
    start = raw.index(b"<?xml")
    return raw[start : raw.index(b"</recording_metadata>") + len(b"</recording_metadata>")]


@pytest.mark.parametrize("xml", [
    b"<recording_metadata xmlns='urn:ietf:params:xml:ns:siprec'><participant id='a'>"
    b"<aor>sip:1@h</aor><send><id>s</id></send></participant>",  # truncated
    b"<?xml version='1.0'?><!DOCTYPE recording_metadata [<!ENTITY x 'y'>]>"
    b"<recording_metadata/>",
])
def test_hostile_broadworks_metadata_is_400(xml: bytes) -> None:
    with pytest.raises(SipError) as caught:
        parse_metadata(xml)
    assert caught.value.status == 400


def test_hostile_g722_payloads_keep_the_stream_in_time() -> None:
    """Whatever bytes an SRC sends as G.722 decode to one 8 kHz sample per byte (every byte
    is a valid G.722 code): empty, odd-sized and oversized payloads neither raise nor shift
    the stream's time."""
    rng = np.random.default_rng(9)
    buffer = JitterBuffer(9, "G722")
    sizes = [160, 0, 1, 161, 1400, 160]
    out: list[np.ndarray] = []
    ts = 0
    for i, size in enumerate(sizes):
        payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        packet = parse_rtp(build_rtp(9, 100 + i, ts, 77, payload))
        assert packet is not None
        out += buffer.push(packet)
        ts += size
    out += buffer.flush()
    assert sum(c.size for c in out) == sum(sizes)
    assert buffer.stats.gap_samples == buffer.stats.lost_samples == 0
