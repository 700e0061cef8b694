"""Bulk-channel throughput: one file fetched over loopback TCP with 1 and with N requests in flight.

    python bench/bulk_transfer.py [--mib 512] [--windows 1 8] [--repeat 3]

A thread in this process serves a FileServer on a ROUTER socket, one request at a time, as the
coordinator's bulk thread does; a BulkClient fetches the file (SHA-256 checked) into a fresh
destination for each window size, the sizes taking turns ``--repeat`` times (the best and the
median are printed: on a shared machine single runs vary a lot). Both sides share this
process's GIL, so the figures are a lower bound for two processes. The offered file is hashed
once before timing starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import zmq

from ea4llm_pool import protocol as P
from ea4llm_pool.sync import BulkClient, FileServer


def serve(ctx: zmq.Context, server: FileServer, stop: threading.Event, ready: list) -> None:
    sock = ctx.socket(zmq.ROUTER)
    P.configure_socket_limits(sock, linger_ms=0)
    sock.bind("tcp://127.0.0.1:0")
    ready.append(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    try:
        while not stop.is_set():
            if sock.poll(100):
                ident, frame = sock.recv_multipart()
                sock.send_multipart([ident, server.handle(P.decode(frame))], copy=False)
    finally:
        sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="file size in MiB")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 8], help="requests in flight")
    ap.add_argument("--repeat", type=int, default=3, help="transfers per window size")
    args = ap.parse_args()
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "blob.bin"
        with open(src, "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1 << 20))
        server = FileServer()
        server.offer("blob", src)
        (name, size, digest), = server.listing(["blob"])
        stop, ready = threading.Event(), []
        thread = threading.Thread(target=serve, args=(ctx, server, stop, ready), daemon=True)
        thread.start()
        while not ready:
            time.sleep(0.01)
        print(f"{args.mib} MiB over {ready[0]}, {P.CHUNK_SIZE >> 10} KiB chunks, SHA-256 checked")
        rates: dict[int, list[float]] = {w: [] for w in args.windows}
        try:
            for _ in range(args.repeat):
                for window in args.windows:
                    client = BulkClient(ctx, ready[0], timeout_s=30.0, window=window)
                    dest = Path(tmp) / f"dest-{window}.bin"
                    t0 = time.perf_counter()
                    client.fetch(name, size, digest, dest)
                    rates[window].append(size / (time.perf_counter() - t0) / 1e6)
                    client.close()
                    dest.unlink()
            for window, runs in rates.items():
                each = " ".join(f"{r:.0f}" for r in runs)
                print(f"window {window:3d}: best {max(runs):7.1f} MB/s, median "
                      f"{statistics.median(runs):7.1f} MB/s  (runs: {each})")
        finally:
            stop.set()
            thread.join(5)
    ctx.term()


if __name__ == "__main__":
    main()
