"""``koppel send``: send message files over MLLP and print each ACK."""

from __future__ import annotations

import sys

from twisted.internet import defer

from engine.core.files import split_messages
from engine.core.header import read_header
from engine.core.response import read_ack
from engine.shell.client import connect, describe_failure, host_port_endpoint


@defer.inlineCallbacks
def send_files(reactor, target: str, paths, *, timeout: float = 30.0, raw: bool = False, out=sys.stdout):
    """Fires with the exit code: 0 when every message got AA/CA, else 1."""
    messages = []
    empty = []
    for path in paths:
        with open(path, "rb") as handle:
            found = split_messages(handle.read(), raw=raw)
        messages.extend((path, m) for m in found)
        if not found:
            empty.append(path)
    if empty:  # (named, and nothing sent: the operator meant to send something else)
        out.write("".join(f"{path}\tno messages found\n" for path in empty))
        return 1
    client = None
    status = 0

    def not_sent(rest, why: str) -> int:
        # Sending stops at a message whose fate is unknown (the next would overtake it), or
        # that could not be sent; every message left is named, so the operator knows what
        # still has to go.
        for rest_path, rest_message in rest:
            rest_id = read_header(rest_message, default_charset="8859/1").control_id
            out.write(f"{rest_path}\tNOT SENT\t{rest_id}\tnot sent: {why}\n")
        return 1

    for number, (path, message) in enumerate(messages):
        sent_id = read_header(message, default_charset="8859/1").control_id
        for last_try in (False, True):
            if client is None or not client.transport.connected or client.peer_closed():
                # first message, or the system closed the connection after its last ACK
                # (one message per connection, as some do): a new connection
                try:
                    client = yield connect(reactor, host_port_endpoint(target, timeout))
                except Exception as error:  # noqa: BLE001 - reported to the operator, not raised
                    out.write(f"cannot connect to {target}: {describe_failure(error)}\n")
                    if number:  # (the first: nothing was sent, the line above says it all)
                        return not_sent(messages[number:], f"cannot connect to {target}")
                    return 1
            mark = client.mark()
            try:
                answer = yield client.request(message, timeout=timeout)
                break
            except Exception as error:  # noqa: BLE001
                if not last_try and client.met_close(error, mark):
                    client = None  # it met the close after the previous ACK: once more, anew
                    continue
                # (the file, then what stands in MSA-1 and MSA-2: no answer, the MSH-10 sent)
                out.write(f"{path}\tNO ACK\t{sent_id}\t{describe_failure(error)}\n")
                return not_sent(messages[number + 1:], "an earlier message got no acknowledgement")
        reply = read_ack(answer)
        mismatch = "" if reply.answers(sent_id) else "\t(MSA-2 does not match the sent MSH-10)"
        out.write(f"{path}\t{reply.code or '??'}\t{reply.control_id}\t{reply.text}{mismatch}\n")
        if not reply.success or mismatch:
            status = 1
    client.transport.loseConnection()
    return status
