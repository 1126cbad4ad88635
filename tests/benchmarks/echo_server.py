"""The ceiling for the receive benchmark: a bare Twisted MLLP server.

No parse, no store: it splits frames on FS CR and answers each with a fixed AA
whose MSA-2 is the frame's MSH-10 (found by counting separators), so ``koppel
bench`` accepts its answers. Whatever Koppel does beyond this is what it costs.
Usage: python tests/benchmarks/echo_server.py PORT
"""

import sys

from twisted.internet import protocol, reactor


class Echo(protocol.Protocol):
    def connectionMade(self):
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\x1c\r")
            if end < 0:
                return
            frame, self.buffer = self.buffer[1:end], self.buffer[end + 2 :]
            fields = frame.split(b"\r", 1)[0].split(b"|", 10)
            control_id = fields[9] if len(fields) > 9 else b""
            self.transport.write(
                b"\x0bMSH|^~\\&|||||20260101000000||ACK|1|P|2.4\rMSA|AA|" + control_id + b"\x1c\r"
            )


def main():
    factory = protocol.Factory.forProtocol(Echo)
    port = reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
