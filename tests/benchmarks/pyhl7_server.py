"""Peer baseline for the receive benchmark: python-hl7's asyncio MLLP server.

It parses each message fully (hl7.parse) and answers ``create_ack()``; no store.
Usage: python tests/benchmarks/pyhl7_server.py PORT
"""

import asyncio
import sys

from hl7.mllp import start_hl7_server


async def handle(reader, writer):
    try:
        while not writer.is_closing():
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def main(port: int):
    async with await start_hl7_server(handle, host="127.0.0.1", port=port, encoding="latin-1", limit=1 << 20) as server:
        print(port, flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
