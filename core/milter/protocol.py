"""Constants of the Sendmail milter protocol, version 6 (libmilter's mfdef.h and mfapi.h).

Only numbers and names live here: command and reply codes, the action flags a milter may
ask for (SMFIF_*), the protocol flags that switch events and replies off (SMFIP_*), the
macro stage numbers of SETSYMLIST (SMFIM_*) and the address families of CONNECT. Command
and reply codes are one-byte ``bytes`` so that a frame's code compares without decoding.

Every frame on the wire is a 32-bit big-endian length (counting the code byte), the code
byte, then the payload.
"""

from __future__ import annotations

from typing import Final

#: The protocol version this implementation speaks and offers.
SMFI_PROT_VERSION: Final = 6
#: Oldest version a milter may answer with (Postfix accepts 2 and up as well).
SMFI_PROT_VERSION_MIN: Final = 2

#: Largest body chunk sent in one SMFIC_BODY frame, and largest SMFIR_REPLBODY chunk
#: libmilter sends unless a larger size was negotiated (which we never offer).
MILTER_CHUNK_SIZE: Final = 65535
#: Size of the length prefix of every frame.
MILTER_LEN_BYTES: Final = 4

# -- commands: MTA -> milter (SMFIC_*) ---------------------------------------------------
SMFIC_ABORT: Final = b"A"  # abort the current message
SMFIC_BODY: Final = b"B"  # body chunk
SMFIC_CONNECT: Final = b"C"  # connection information
SMFIC_MACRO: Final = b"D"  # define macros
SMFIC_BODYEOB: Final = b"E"  # end of body (end of message)
SMFIC_HELO: Final = b"H"  # HELO/EHLO
SMFIC_QUIT_NC: Final = b"K"  # quit, a new connection follows on this socket
SMFIC_HEADER: Final = b"L"  # one header
SMFIC_MAIL: Final = b"M"  # MAIL FROM
SMFIC_EOH: Final = b"N"  # end of headers
SMFIC_OPTNEG: Final = b"O"  # option negotiation
SMFIC_QUIT: Final = b"Q"  # quit
SMFIC_RCPT: Final = b"R"  # RCPT TO
SMFIC_DATA: Final = b"T"  # DATA
SMFIC_UNKNOWN: Final = b"U"  # unknown SMTP command

# -- replies: milter -> MTA (SMFIR_*) ----------------------------------------------------
SMFIR_ADDRCPT: Final = b"+"  # add recipient
SMFIR_DELRCPT: Final = b"-"  # delete recipient
SMFIR_ADDRCPT_PAR: Final = b"2"  # add recipient with ESMTP arguments
SMFIR_SHUTDOWN: Final = b"4"  # 421: close the SMTP connection
SMFIR_ACCEPT: Final = b"a"  # accept
SMFIR_REPLBODY: Final = b"b"  # replace body (one chunk)
SMFIR_CONTINUE: Final = b"c"  # continue
SMFIR_DISCARD: Final = b"d"  # accept and silently discard the message
SMFIR_CHGFROM: Final = b"e"  # change envelope sender
SMFIR_CONNFAIL: Final = b"f"  # cause a connection failure
SMFIR_ADDHEADER: Final = b"h"  # append header
SMFIR_INSHEADER: Final = b"i"  # insert header
SMFIR_SETSYMLIST: Final = b"l"  # set list of macros (inside the OPTNEG reply in practice)
SMFIR_CHGHEADER: Final = b"m"  # change or delete header
SMFIR_PROGRESS: Final = b"p"  # still working: restart the timeout
SMFIR_QUARANTINE: Final = b"q"  # quarantine the message
SMFIR_REJECT: Final = b"r"  # reject
SMFIR_SKIP: Final = b"s"  # skip further events of this kind (body chunks)
SMFIR_TEMPFAIL: Final = b"t"  # tempfail
SMFIR_REPLYCODE: Final = b"y"  # reply with this SMTP reply text

# -- actions a milter may request (SMFIF_*, mfapi.h) --------------------------------------
SMFIF_NONE: Final = 0x000
SMFIF_ADDHDRS: Final = 0x001  # add headers
SMFIF_CHGBODY: Final = 0x002  # replace the body
SMFIF_MODBODY: Final = SMFIF_CHGBODY
SMFIF_ADDRCPT: Final = 0x004  # add recipients
SMFIF_DELRCPT: Final = 0x008  # delete recipients
SMFIF_CHGHDRS: Final = 0x010  # change or delete headers
SMFIF_QUARANTINE: Final = 0x020  # quarantine the message
SMFIF_CHGFROM: Final = 0x040  # change the envelope sender
SMFIF_ADDRCPT_PAR: Final = 0x080  # add recipients with ESMTP arguments
SMFIF_SETSYMLIST: Final = 0x100  # send its own macro lists at negotiation

#: Every action of version 6: what we offer (libmilter refuses an MTA that offers less
#: than the milter registered for).
SMFI_V6_ACTS: Final = 0x1FF

# -- protocol flags (SMFIP_*, mfdef.h) ----------------------------------------------------
SMFIP_NOCONNECT: Final = 0x00000001  # do not send CONNECT
SMFIP_NOHELO: Final = 0x00000002  # do not send HELO
SMFIP_NOMAIL: Final = 0x00000004  # do not send MAIL
SMFIP_NORCPT: Final = 0x00000008  # do not send RCPT
SMFIP_NOBODY: Final = 0x00000010  # do not send the body
SMFIP_NOHDRS: Final = 0x00000020  # do not send headers
SMFIP_NOEOH: Final = 0x00000040  # do not send end of headers
SMFIP_NR_HDR: Final = 0x00000080  # no reply to each header
SMFIP_NOHREPL: Final = SMFIP_NR_HDR
SMFIP_NOUNKNOWN: Final = 0x00000100  # do not send unknown commands
SMFIP_NODATA: Final = 0x00000200  # do not send DATA
SMFIP_SKIP: Final = 0x00000400  # MTA understands SMFIR_SKIP
SMFIP_RCPT_REJ: Final = 0x00000800  # milter wants rejected recipients too
SMFIP_NR_CONN: Final = 0x00001000  # no reply to CONNECT
SMFIP_NR_HELO: Final = 0x00002000  # no reply to HELO
SMFIP_NR_MAIL: Final = 0x00004000  # no reply to MAIL
SMFIP_NR_RCPT: Final = 0x00008000  # no reply to RCPT
SMFIP_NR_DATA: Final = 0x00010000  # no reply to DATA
SMFIP_NR_UNKN: Final = 0x00020000  # no reply to unknown commands
SMFIP_NR_EOH: Final = 0x00040000  # no reply to end of headers
SMFIP_NR_BODY: Final = 0x00080000  # no reply to each body chunk
SMFIP_HDR_LEADSPC: Final = 0x00100000  # header values keep their leading space
SMFIP_MDS_256K: Final = 0x10000000  # frames up to 256 KiB (never offered here)
SMFIP_MDS_1M: Final = 0x20000000  # frames up to 1 MiB (never offered here)

SMFIP_NOSEND_MASK: Final = (
    SMFIP_NOCONNECT
    | SMFIP_NOHELO
    | SMFIP_NOMAIL
    | SMFIP_NORCPT
    | SMFIP_NOBODY
    | SMFIP_NOHDRS
    | SMFIP_NOEOH
    | SMFIP_NOUNKNOWN
    | SMFIP_NODATA
)
SMFIP_NOREPLY_MASK: Final = (
    SMFIP_NR_CONN
    | SMFIP_NR_HELO
    | SMFIP_NR_MAIL
    | SMFIP_NR_RCPT
    | SMFIP_NR_DATA
    | SMFIP_NR_UNKN
    | SMFIP_NR_HDR
    | SMFIP_NR_EOH
    | SMFIP_NR_BODY
)

#: Events every version knows; later versions add UNKNOWN (3) and DATA (4). A milter
#: that answers with an older version must not be sent the events it does not know.
MILTER_V2_EVENTS: Final = (
    SMFIP_NOCONNECT
    | SMFIP_NOHELO
    | SMFIP_NOMAIL
    | SMFIP_NORCPT
    | SMFIP_NOBODY
    | SMFIP_NOHDRS
    | SMFIP_NOEOH
)
MILTER_V3_EVENTS: Final = MILTER_V2_EVENTS | SMFIP_NOUNKNOWN
MILTER_V4_EVENTS: Final = MILTER_V3_EVENTS | SMFIP_NODATA
#: What we offer: Postfix's MILTER8_V6_PROTO_MASK.
MILTER_V6_PROTOCOL: Final = (
    MILTER_V4_EVENTS | SMFIP_SKIP | SMFIP_RCPT_REJ | SMFIP_NOREPLY_MASK | SMFIP_HDR_LEADSPC
)

# -- macro stages of SETSYMLIST (SMFIM_*) -------------------------------------------------
SMFIM_CONNECT: Final = 0
SMFIM_HELO: Final = 1
SMFIM_ENVFROM: Final = 2
SMFIM_ENVRCPT: Final = 3
SMFIM_DATA: Final = 4
SMFIM_EOM: Final = 5  # note: EOM comes before EOH in numbering
SMFIM_EOH: Final = 6

# -- address families of SMFIC_CONNECT (SMFIA_*) ------------------------------------------
SMFIA_UNKNOWN: Final = b"U"
SMFIA_UNIX: Final = b"L"
SMFIA_INET: Final = b"4"
SMFIA_INET6: Final = b"6"
ADDRESS_FAMILIES: Final = frozenset({SMFIA_UNKNOWN, SMFIA_UNIX, SMFIA_INET, SMFIA_INET6})

ACTION_NAMES: Final = {
    SMFIF_ADDHDRS: "ADDHDRS",
    SMFIF_CHGBODY: "CHGBODY",
    SMFIF_ADDRCPT: "ADDRCPT",
    SMFIF_DELRCPT: "DELRCPT",
    SMFIF_CHGHDRS: "CHGHDRS",
    SMFIF_QUARANTINE: "QUARANTINE",
    SMFIF_CHGFROM: "CHGFROM",
    SMFIF_ADDRCPT_PAR: "ADDRCPT_PAR",
    SMFIF_SETSYMLIST: "SETSYMLIST",
}
PROTOCOL_NAMES: Final = {
    SMFIP_NOCONNECT: "NOCONNECT",
    SMFIP_NOHELO: "NOHELO",
    SMFIP_NOMAIL: "NOMAIL",
    SMFIP_NORCPT: "NORCPT",
    SMFIP_NOBODY: "NOBODY",
    SMFIP_NOHDRS: "NOHDRS",
    SMFIP_NOEOH: "NOEOH",
    SMFIP_NR_HDR: "NR_HDR",
    SMFIP_NOUNKNOWN: "NOUNKNOWN",
    SMFIP_NODATA: "NODATA",
    SMFIP_SKIP: "SKIP",
    SMFIP_RCPT_REJ: "RCPT_REJ",
    SMFIP_NR_CONN: "NR_CONN",
    SMFIP_NR_HELO: "NR_HELO",
    SMFIP_NR_MAIL: "NR_MAIL",
    SMFIP_NR_RCPT: "NR_RCPT",
    SMFIP_NR_DATA: "NR_DATA",
    SMFIP_NR_UNKN: "NR_UNKN",
    SMFIP_NR_EOH: "NR_EOH",
    SMFIP_NR_BODY: "NR_BODY",
    SMFIP_HDR_LEADSPC: "HDR_LEADSPC",
    SMFIP_MDS_256K: "MDS_256K",
    SMFIP_MDS_1M: "MDS_1M",
}


def describe_mask(mask: int, names: dict[int, str]) -> str:
    """``ADDHDRS|CHGBODY`` for logs; bits without a name show as hex."""
    parts = [name for bit, name in names.items() if mask & bit]
    rest = mask & ~sum(names)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or "0"
