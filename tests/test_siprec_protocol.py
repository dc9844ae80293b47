"""SIPREC's sans-IO parts on their own: SIP framing and parsing, the multipart body, SDP,
both metadata dialects, hostile XML, the jitter buffer and the lanes. The bodies are built
by the test SRC in ``bench/plugin_peers.py`` the way Cisco CUBE (RFC 7865 metadata, an
``application/gtd`` part) and Oracle/Acme (the draft form, ``apkt:callingParty``) write
them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench.plugin_peers import (
    rtp_packets,
    sip_request,
    siprec_body,
    siprec_metadata,
    siprec_sdp,
)
from plugins.siprec.media import Lanes
from plugins.siprec.metadata import parse_metadata, readable_id
from plugins.siprec.offer import read_offer
from plugins.siprec.rtp import JitterBuffer, build_rtp, parse_rtp
from plugins.siprec.sdp import AnswerLine, answer, parse_sdp
from plugins.siprec.sip import SipError, StreamFramer, parse_message, response

SESSION = "Ks0Fb3oBEfCmugAMKfnCqw=="
PARTIES = [("caller-pid", "sip:+15550100@carrier.example", "s1", "1"),
           ("agent-pid", "sip:4711@pbx.example", "s2", "2")]
LOCAL = ("192.0.2.10", 5060)
GTD = ("application/gtd", "IAM,\r\nPRN,isdn*,,NET5*,\r\nUSI,rate,c,s,c,1\r\n")


def invite(metadata: str | None, ports: tuple[int, ...] = (6000, 6002),
           labels: tuple[str, ...] = ("1", "2"), codecs: str = "0 101",
           extra: list[tuple[str, str]] | None = None, metadata_type: str = "",
           **kw: str) -> bytes:
    body = siprec_body(siprec_sdp("192.0.2.10", list(ports), list(labels), codecs), metadata,
                       extra or [])
    if metadata_type:
        body = body.replace("application/rs-metadata+xml", metadata_type)
    return sip_request("INVITE", "sip:srs@192.0.2.1", "call-1@192.0.2.10", 1, body,
                       local=LOCAL, **kw)


def test_sip_request_parsed_with_compact_and_folded_headers() -> None:
    raw = (b"OPTIONS sip:srs@192.0.2.1 SIP/2.0\r\nv: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKa\r\n"
           b"f: <sip:src@192.0.2.10>;tag=1\r\nt: <sip:srs@192.0.2.1>\r\ni: abc\r\n"
           b"CSeq: 7 OPTIONS\r\nSubject: a\r\n  folded\r\nl: 0\r\n\r\n")
    m = parse_message(raw)
    assert (m.method, m.call_id, m.cseq, m.branch) == ("OPTIONS", "abc", (7, "OPTIONS"),
                                                        "z9hG4bKa")
    assert m.get("Subject") == "a folded"
    ok = response(m, 200, to_tag="xyz")
    parsed = parse_message(ok.encode())
    assert parsed.status == 200 and parsed.to_tag() == "xyz" and parsed.call_id == "abc"
    assert parsed.get("CSeq") == "7 OPTIONS"


@pytest.mark.parametrize(("raw", "status", "answerable"), [
    (b"HELLO\r\n\r\n", 400, False),
    (b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\n"
     b"To: <sip:x>\r\nCall-ID: c\r\nCSeq: 1 BYE\r\n\r\n", 400, True),
    (b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\n"
     b"To: <sip:x>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nno colon here\r\n\r\n", 400, True),
    (b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\n"
     b"To: <sip:x>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 99\r\n\r\nshort",
     400, True),
    (b"INVITE sip:x SIP/2.0\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n", 513, False),
])
def test_malformed_sip_says_what_and_whether_it_can_be_answered(
        raw: bytes, status: int, answerable: bool) -> None:
    with pytest.raises(SipError) as caught:
        parse_message(raw)
    assert caught.value.status == status
    assert (caught.value.message is not None and bool(caught.value.message.get("Via"))) \
        == answerable


def test_tcp_framing_by_content_length() -> None:
    first = invite(siprec_metadata(SESSION, PARTIES))
    second = sip_request("BYE", "sip:srs@192.0.2.1", "call-1@192.0.2.10", 2, local=LOCAL)
    stream = b"\r\n\r\n" + first + second  # a keep-alive, then two messages back to back
    framer = StreamFramer()
    frames = []
    for i in range(0, len(stream), 97):  # in odd-sized reads
        frames += framer.feed(stream[i : i + 97])
    assert frames == [first, second]
    assert len(first) > 1300  # more than one UDP datagram's worth on a typical MTU
    with pytest.raises(SipError) as caught:
        StreamFramer(limit=1000).feed(first)
    assert caught.value.status == 513


def test_rfc7865_offer_lanes_follow_the_metadata_not_the_mline_order() -> None:
    """The agent's stream is the first m-line here; the caller (first participant) still
    gets lane 0. Cisco's GTD part is ignored; telephone-event is not a codec choice."""
    parties = [PARTIES[0][:3] + ("2",), PARTIES[1][:3] + ("1",)]
    offer = read_offer(parse_message(invite(siprec_metadata(SESSION, parties), extra=[GTD])))
    assert offer.lanes == ("caller", "agent") and not offer.mixed
    assert [(r.index, r.lane, r.codec) for r in offer.recorded] == [(1, 0, "PCMU"),
                                                                   (0, 1, "PCMU")]
    assert offer.aor(0) == "sip:+15550100@carrier.example"
    assert offer.aor(1) == "sip:4711@pbx.example"
    assert offer.metadata is not None and offer.metadata.session_id == SESSION
    assert readable_id(SESSION) == "2acd056f-7a01-11f0-a6ba-000c29f9c2ab"


def test_draft_metadata_with_oracle_calling_party_flag() -> None:
    md = siprec_metadata(SESSION, PARTIES, dialect="draft", caller_flag="agent-pid")
    rec = parse_metadata(md.encode())
    assert [p.aor for p in rec.participants] == [PARTIES[0][1], PARTIES[1][1]]
    assert rec.labels == {"s1": "1", "s2": "2"}
    caller = rec.caller()
    assert caller is not None and caller.id == "agent-pid"  # the flag beats the order
    offer = read_offer(parse_message(invite(md)))
    assert offer.aor(0) == PARTIES[1][1]
    # the older media type name is read as well
    raw = invite(md, metadata_type="application/rs-metadata")
    assert read_offer(parse_message(raw)).aor(0) == PARTIES[1][1]


def test_one_stream_is_mixed_and_codecs_we_cannot_decode_are_488() -> None:
    offer = read_offer(parse_message(invite(None, ports=(6000,), labels=("1",), codecs="8")))
    assert offer.mixed and offer.lanes == ("mixed",) and offer.recorded[0].codec == "PCMA"
    with pytest.raises(SipError) as caught:
        read_offer(parse_message(invite(siprec_metadata(SESSION, PARTIES), codecs="18")))
    assert caught.value.status == 488 and "G729" in str(caught.value)
    with pytest.raises(SipError) as caught:  # a body type we do not take
        read_offer(parse_message(sip_request("INVITE", "sip:srs@h", "c", 1, "hello",
                                             local=LOCAL, content_type="text/plain")))
    assert caught.value.status == 415


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<recording xmlns="urn:ietf:params:xml:ns:recording:1"><session session_id="&lol4;"/>
</recording>"""
EXTERNAL = """<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<recording><session session_id="&x;"/></recording>"""


@pytest.mark.parametrize(("xml", "why"), [
    (BILLION_LAUGHS, "DTD"), (EXTERNAL, "DTD"), ("<recording><session>", "malformed"),
    ("<recording>" + "<a>" * 40 + "</a>" * 40 + "</recording>", "too deep"),
    ("<notrecording/>", "not <recording>"),
])
def test_hostile_or_malformed_metadata_is_400(xml: str, why: str) -> None:
    start = time.monotonic()
    with pytest.raises(SipError) as caught:
        read_offer(parse_message(invite(xml)))
    assert caught.value.status == 400 and why in str(caught.value)
    assert time.monotonic() - start < 1.0  # refused before any expansion


def test_answer_sdp_keeps_every_mline_in_place() -> None:
    body = answer([AnswerLine("audio", "RTP/AVP", 40000, 0, "PCMU", "recvonly", "1"),
                   AnswerLine("video", "RTP/AVP", 0, 96)], "192.0.2.1", 1, 1)
    sdp = parse_sdp(body)
    assert [(m.kind, m.port, m.direction, m.label) for m in sdp.media] == [
        ("audio", 40000, "recvonly", "1"), ("video", 0, "sendrecv", "")]


def _pcm(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-8000, 8000, int(seconds * 8000),
                                                dtype=np.int16)


def test_jitter_buffer_reorders_within_60_ms_and_fills_loss() -> None:
    packets = [parse_rtp(p) for p in rtp_packets(_pcm(0.4, 1), ssrc=7)]
    buffer = JitterBuffer(0, "PCMU", event_type=101)
    order = [0, 2, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # 4 lost
    out: list[np.ndarray] = []
    for i in order:
        packet = packets[i]
        assert packet is not None
        out += buffer.push(packet)
    # an event packet and a stranger's packet change nothing
    out += buffer.push(parse_rtp(build_rtp(101, 1003, 160480, 7, b"\x01\x00\x00\xa0")))
    out += buffer.push(parse_rtp(build_rtp(0, 1010, 161600, 999, b"\xff" * 160)))
    out += buffer.flush()
    pcm = np.concatenate(out)
    assert pcm.size == 20 * 160  # every 20 ms of call time, in order
    assert not pcm[4 * 160 : 5 * 160].any()  # the lost packet became silence
    assert buffer.stats.lost_samples == 160 and buffer.stats.foreign_ssrc == 1
    assert buffer.stats.events == 1 and buffer.stats.late == 0
    # out of order within the hold: released in order; a duplicate is dropped as late
    assert buffer.push(packets[19]) == [] and buffer.stats.late == 1  # type: ignore[arg-type]


def test_lanes_line_up_a_late_stream_and_pad_a_dead_one() -> None:
    lanes = Lanes(2, max_skew_seconds=0.5)
    lanes.add(0, [np.full(800, 1, np.int16)], 0.0)
    assert lanes.take() == b""  # the other lane has not started yet
    lanes.add(1, [np.full(800, 2, np.int16)], 0.1)  # started 100 ms later
    stereo = np.frombuffer(lanes.take(), "<i2").reshape(-1, 2)
    assert stereo.shape == (800, 2)
    assert (stereo[:, 0] == 1).all() and not stereo[:800, 1].any()  # 100 ms of silence first
    lanes.add(0, [np.full(8000, 3, np.int16)], 0.2)  # lane 1 went quiet: 1 s ahead
    stereo = np.frombuffer(lanes.take(), "<i2").reshape(-1, 2)
    assert stereo.shape[0] > 0 and lanes.padded > 0


@pytest.mark.parametrize("raw", [
    b"INVITE sip:+15550100@carrier.example SIP/2.1\r\nCall-ID: x\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From <sip:+15550100@carrier.example>;tag=1\r\n\r\n",
])
def test_refusal_reasons_never_carry_the_uri(raw: bytes) -> None:
    """The reason of a refused message is logged: it names what broke, never the AOR."""
    with pytest.raises(SipError) as caught:
        parse_message(raw)
    assert "15550100" not in str(caught.value) and "carrier" not in str(caught.value)


def test_srtp_only_offer_is_488_naming_srtp() -> None:
    """SRTP streams cannot be decoded without keys: refused by name, not as "no codec"."""
    sdp = siprec_sdp("192.0.2.10", [6000, 6002], ["1", "2"]).replace("RTP/AVP", "RTP/SAVP")
    body = siprec_body(sdp, siprec_metadata(SESSION, PARTIES))
    raw = sip_request("INVITE", "sip:srs@192.0.2.1", "call-1@192.0.2.10", 1, body,
                      local=LOCAL)
    with pytest.raises(SipError) as caught:
        read_offer(parse_message(raw))
    assert caught.value.status == 488 and "SRTP" in str(caught.value)


def test_a_padded_lane_is_not_shifted_late_when_its_stream_resumes() -> None:
    """One side silent for a second (silence suppression): its lane is padded while the
    other goes on; when it resumes, the jitter buffer's silence for the same second is not
    added again, so its next words stay in time with the other lane."""
    lanes = Lanes(2, max_skew_seconds=0.5)
    out = []
    lanes.add(0, [np.full(800, 1, np.int16)], 0.0)
    lanes.add(1, [np.full(800, 2, np.int16)], 0.0)
    out.append(lanes.take())
    lanes.add(0, [np.full(8000, 3, np.int16)], 1.1)  # lane 1 sends nothing for 1 s
    out.append(lanes.take())
    assert lanes.padded > 0
    # lane 1 resumes: the timestamp jump comes out of its jitter buffer as 1 s of zeros
    lanes.add(1, [np.zeros(8000, np.int16), np.full(160, 4, np.int16)], 1.12)
    lanes.add(0, [np.full(160, 5, np.int16)], 1.12)
    out.append(lanes.take(final=True))
    stereo = np.frombuffer(b"".join(out), "<i2").reshape(-1, 2)
    assert int(np.argmax(stereo[:, 1] == 4)) == int(np.argmax(stereo[:, 0] == 5)) == 8800


@pytest.mark.parametrize("ports", ["5-2", "40000", "x-y", "70000-70010"])
def test_a_bad_rtp_port_range_is_a_usage_error(
        ports: str, capsys: pytest.CaptureFixture[str]) -> None:
    from plugins.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--siprec", "127.0.0.1:0", "--siprec-rtp-ports", ports])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
