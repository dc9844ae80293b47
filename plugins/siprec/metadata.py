"""SIPREC recording metadata (``application/rs-metadata+xml``), sans-IO and safe against
hostile XML.

The metadata says who is on the recorded call and which stream each one sends: participant
-> stream -> the SDP ``a=label`` of an m-line. Two dialects are in the field:

- RFC 7865 (Cisco CUBE, AudioCodes, Kamailio/rtpengine, drachtio): ``<participant
  participant_id=...>``, ``<stream stream_id=...><label>``, and the association in
  ``<participantstreamassoc participant_id=...><send>stream_id</send>``;
- the older draft (Oracle/Acme Packet, Avaya): ``<participant id=...>`` with ``<send>``
  inline, ``<stream id=...>``;
- BroadWorks (Cisco BroadWorks / Webex Calling's recording interface): the draft's elements
  under a ``<recording_metadata>`` root (namespace ``urn:ietf:params:xml:ns:siprec``), each
  ``<send>`` wrapping an ``<id>``, an ``<aor>`` element rather than ``<nameID aor=...>``, and
  a ``<broadWorksRecordingMetadata>`` extension. BroadWorks records one half of a call, the
  BroadWorks user's, usually as a single ``mode`` ``mixed`` stream that both participants
  ``send``.

All are read by one walk over local names (namespaces vary by vendor and version). Which
participant is the caller is not part of any standard: a vendor's explicit flag wins (an
extension element such as Oracle's ``<apkt:callingParty>true``, see :data:`CALLER_FLAGS`; in
BroadWorks', the ``<callingPartyNumber>`` of its ``<callType>``, else ``<origCall>`` or
``<termCall>``: the recorded user, the group's ``<initiator>``, called or was called),
otherwise the first participant that sends a stream, which is the calling side in every SRC
we know of.

The parser is the stdlib expat with every DTD refused outright (so no entity can be declared:
no billion laughs, no external entities), and with limits on size, depth and element count.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from xml.parsers import expat

from plugins.siprec.sip import SipError

MAX_XML_BYTES = 32768
MAX_ELEMENTS = 2000
MAX_DEPTH = 16
CALLER_FLAGS = ("callingparty", "iscaller", "caller")  # child elements: true/1/yes
ROOTS = ("recording", "recording_metadata")  # RFC 7865 and the drafts; BroadWorks
MIN_NUMBER_MATCH = 7  # digits two forms of one phone number share at least (+44 20..., 020...)


@dataclass
class Element:
    tag: str  # local name, lower-cased
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    text: str = ""

    def find(self, tag: str) -> Element | None:
        return next((c for c in self.children if c.tag == tag), None)

    def walk(self) -> list[Element]:
        out, stack = [], [self]
        while stack:
            e = stack.pop(0)
            out.append(e)
            stack[:0] = e.children
        return out

    def attr(self, *names: str) -> str:
        for name in names:
            for key, value in self.attrs.items():
                if key.rpartition(" ")[2].rpartition(":")[2].lower() == name:
                    return value.strip()
        return ""


def parse_xml(data: bytes) -> Element:
    """A tree of local names; :class:`SipError` 400 for anything malformed or hostile."""
    if len(data) > MAX_XML_BYTES:
        raise SipError(400, f"metadata of {len(data)} bytes (limit {MAX_XML_BYTES})")
    parser = expat.ParserCreate(namespace_separator=" ")
    root: list[Element] = []
    stack: list[Element] = []
    count = 0

    def refuse_dtd(*_args: object) -> None:
        raise SipError(400, "metadata with a DTD or entity declaration refused")

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal count
        count += 1
        if count > MAX_ELEMENTS or len(stack) >= MAX_DEPTH:
            raise SipError(400, "metadata too large or too deep")
        element = Element(name.rpartition(" ")[2].lower(), dict(attrs))
        if stack:
            stack[-1].children.append(element)
        else:
            root.append(element)
        stack.append(element)

    def end(_name: str) -> None:
        element = stack.pop()
        element.text = element.text.strip()

    def chars(text: str) -> None:
        if stack and len(stack[-1].text) < 1024:
            stack[-1].text += text

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.UnparsedEntityDeclHandler = refuse_dtd
    parser.ExternalEntityRefHandler = refuse_dtd  # type: ignore[assignment]
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise SipError(400, f"malformed metadata XML: {exc}") from exc
    if not root:
        raise SipError(400, "empty metadata XML")
    return root[0]


@dataclass
class Participant:
    id: str
    aor: str = ""
    name: str = ""
    sends: list[str] = field(default_factory=list)  # stream ids
    caller_flag: bool = False


@dataclass
class Recording:
    """What the metadata says: the recording session, its participants (the caller first)
    and each stream's SDP label."""

    session_id: str = ""
    participants: list[Participant] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # stream id -> a=label
    dialect: str = "rfc7865"  # "rfc7865", "draft" or "broadworks"

    def sender_of(self, label: str) -> Participant | None:
        for p in self.participants:
            if any(self.labels.get(s) == label for s in p.sends):
                return p
        return None

    def caller(self) -> Participant | None:
        senders = [p for p in self.participants if p.sends] or self.participants
        return next((p for p in senders if p.caller_flag), senders[0] if senders else None)


def readable_id(value: str) -> str:
    """SIPREC ids are base64 of a UUID (RFC 7865 6.9): shown as the UUID when they are."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return value
    return str(uuid.UUID(bytes=raw)) if len(raw) == 16 else value


def _digits(aor: str) -> str:
    """The number in a SIP or tel URI's user part (``sip:+4420...@host;user=phone``)."""
    user = aor.split(":", 1)[-1].split("@", 1)[0].split(";", 1)[0]
    return "".join(c for c in user if c.isdigit())


def _same_number(a: str, b: str) -> int:
    """How many trailing digits two AORs' numbers share, when that says they are one number
    in two forms (international and national): 0 when not."""
    x, y = _digits(a), _digits(b)
    shared = 0
    while shared < min(len(x), len(y)) and x[-1 - shared] == y[-1 - shared]:
        shared += 1
    return shared if shared >= min(MIN_NUMBER_MATCH, len(x), len(y)) and shared else 0


def _broadworks_caller(elements: list[Element], participants: list[Participant]) -> None:
    """Flag the caller from BroadWorks' extension: the participant whose number is the
    ``callingPartyNumber``; failing that, the recorded user (the group's ``initiator``) on
    an ``origCall``, the other participant on a ``termCall``."""
    def text(tag: str) -> str:
        return next((e.text for e in elements if e.tag == tag and e.text), "")

    calling = text("callingpartynumber")
    if calling:
        scored = [(_same_number(p.aor, calling), i) for i, p in enumerate(participants)]
        best, index = max(scored, default=(0, 0))
        if best:
            participants[index].caller_flag = True
            return
    user = text("initiator")
    users = [p for p in participants if user and p.aor and _same_number(p.aor, user)]
    others = [p for p in participants if p not in users]
    if any(e.tag == "origcall" for e in elements) and users:
        users[0].caller_flag = True
    elif any(e.tag == "termcall" for e in elements) and users and others:
        others[0].caller_flag = True


def parse_metadata(data: bytes) -> Recording:
    root = parse_xml(data)
    if root.tag not in ROOTS:
        raise SipError(400, f"metadata root is <{root.tag[:20]}>, not <recording>")
    rec = Recording()
    elements = root.walk()
    for e in elements:
        if e.tag == "session" and not rec.session_id:
            rec.session_id = e.attr("session_id", "id")
        elif e.tag == "stream":
            sid = e.attr("stream_id", "id")
            label = e.find("label")
            if sid and label is not None and label.text:
                rec.labels[sid] = label.text
    by_id: dict[str, Participant] = {}
    for e in elements:
        if e.tag != "participant":
            continue
        pid = e.attr("participant_id", "id")
        p = by_id.setdefault(pid, Participant(pid))
        if p not in rec.participants:
            rec.participants.append(p)
        for child in e.walk()[1:]:
            if child.tag in ("nameid", "aor") and not p.aor:
                p.aor = child.attr("aor") or child.text
                name = child.find("name")
                p.name = name.text if name is not None else p.name
            elif child.tag == "send":  # the draft form: inline; BroadWorks': <send><id>
                sent = child.text or next((c.text for c in child.children
                                           if c.tag == "id" and c.text), "")
                if sent:
                    p.sends.append(sent)
            elif child.tag in CALLER_FLAGS and child.text.lower() in ("true", "1", "yes"):
                p.caller_flag = True
    for e in elements:  # RFC 7865: the association, apart
        if e.tag == "participantstreamassoc":
            p = by_id.get(e.attr("participant_id", "id"))
            if p is not None:
                p.sends += [c.text for c in e.children if c.tag == "send" and c.text]
    if root.tag == "recording_metadata":
        rec.dialect = "broadworks"
        if not any(p.caller_flag for p in rec.participants):
            _broadworks_caller(elements, rec.participants)
    elif any(e.tag == "participant" and e.attr("id") and not e.attr("participant_id")
             for e in elements):
        rec.dialect = "draft"
    return rec
