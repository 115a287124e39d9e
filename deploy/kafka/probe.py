#!/usr/bin/env python3
"""Stdlib-only helpers for deploy/kafka/local-kafka.

Subcommands:
  metadata HOST PORT [--timeout S]
      Send one raw MetadataRequest v4 (non-flexible; accepted by Kafka 3.x and 4.x)
      and succeed (exit 0) only if the response lists at least one broker.
  wait HOST PORT --pid PID --timeout S
      Repeat `metadata` until it succeeds (exit 0), the process PID exits (exit 2)
      or the timeout passes (exit 3).
  port-free PORT        exit 0 if 127.0.0.1:PORT can be bound (nothing listens there).
  free-port             print a currently free TCP port on 127.0.0.1.
  cluster-id            print a random Kafka cluster id (base64url UUID, 22 chars).
  split-properties      read KAFKA_EXTRA_PROPERTIES text on stdin and print one
                        key=value per line (newline- or ';'-separated input).
"""

from __future__ import annotations

import argparse
import base64
import errno
import os
import re
import socket
import struct
import sys
import time
import uuid

METADATA_API_KEY = 3
METADATA_VERSION = 4
CLIENT_ID = b"lattice-local-kafka-probe"


class ProbeError(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed by peer")
        buf += chunk
    return bytes(buf)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ProbeError("truncated metadata response")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def nullable_string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        if self.pos + length > len(self.data):
            raise ProbeError("truncated metadata response")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", "replace")


def metadata(host: str, port: int, timeout: float) -> dict:
    """One MetadataRequest v4 for no topics; returns brokers/cluster id/controller."""
    correlation_id = int(time.monotonic() * 1000) & 0x7FFFFFFF
    header = struct.pack(
        ">hhih", METADATA_API_KEY, METADATA_VERSION, correlation_id, len(CLIENT_ID)
    )
    header += CLIENT_ID
    # topics: empty (non-null) array -> no topics; allow_auto_topic_creation: false
    body = struct.pack(">ib", 0, 0)
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        if size < 8 or size > 16 * 1024 * 1024:
            raise ProbeError(f"implausible response size {size}")
        payload = _recv_exact(sock, size)
    r = _Reader(payload)
    if r.take(">i") != correlation_id:
        raise ProbeError("correlation id mismatch")
    r.take(">i")  # throttle_time_ms
    n_brokers = r.take(">i")
    brokers = []
    for _ in range(max(n_brokers, 0)):
        node_id = r.take(">i")
        bhost = r.nullable_string()
        bport = r.take(">i")
        r.nullable_string()  # rack
        brokers.append((node_id, bhost, bport))
    cluster_id = r.nullable_string()
    controller_id = r.take(">i")
    return {"brokers": brokers, "cluster_id": cluster_id, "controller_id": controller_id}


def _describe(md: dict) -> str:
    brokers = ",".join(f"{n}@{h}:{p}" for n, h, p in md["brokers"])
    return f"brokers={brokers} cluster_id={md['cluster_id']} controller_id={md['controller_id']}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An unreaped zombie is dead for our purposes; a zombie thread-group leader whose
    # other threads still run (a JVM on its way out) is not.
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        end = stat.rfind(b")")
        if stat[end + 2 : end + 3] not in (b"Z", b"X"):
            return True
    return False


def cmd_metadata(args: argparse.Namespace) -> int:
    try:
        md = metadata(args.host, args.port, args.timeout)
    except (OSError, ProbeError) as exc:
        print(f"metadata request to {args.host}:{args.port} failed: {exc}", file=sys.stderr)
        return 1
    if not md["brokers"]:
        print(f"{args.host}:{args.port} answered but lists no broker yet", file=sys.stderr)
        return 1
    print(_describe(md))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    last_error = "no attempt"
    while True:
        if args.pid and not _pid_alive(args.pid):
            print(f"process {args.pid} exited before the broker became ready", file=sys.stderr)
            return 2
        try:
            md = metadata(args.host, args.port, min(2.0, max(0.2, deadline - time.monotonic())))
            if md["brokers"]:
                print(_describe(md))
                return 0
            last_error = "metadata lists no broker yet"
        except (OSError, ProbeError) as exc:
            last_error = str(exc)
        if time.monotonic() >= deadline:
            print(
                f"timed out after {args.timeout:g}s waiting for {args.host}:{args.port} "
                f"(last error: {last_error})",
                file=sys.stderr,
            )
            return 3
        time.sleep(0.25)


def cmd_port_free(args: argparse.Namespace) -> int:
    # Something accepting connections means "in use".
    try:
        with socket.create_connection(("127.0.0.1", args.port), timeout=0.5):
            return 1
    except OSError:
        pass
    # Mimic the JVM's server socket (SO_REUSEADDR) so TIME_WAIT leftovers don't count.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", args.port))
        s.listen(1)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return 1
        raise
    finally:
        s.close()
    return 0


def cmd_free_port(_args: argparse.Namespace) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


def cmd_cluster_id(_args: argparse.Namespace) -> int:
    while True:  # like org.apache.kafka.common.Uuid.randomUuid: never start with '-'
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            print(cid)
            return 0


# Split on ';' only where the next segment starts like "key=" so that values that
# themselves end with ';' (e.g. sasl.jaas.config=... required user="a";) survive.
_SPLIT = re.compile(r";(?=\s*[A-Za-z0-9_.\-]+\s*=)")


def cmd_split_properties(_args: argparse.Namespace) -> int:
    for line in sys.stdin.read().splitlines():
        for part in _SPLIT.split(line):
            part = part.strip()
            if part:
                print(part)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("metadata")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_metadata)
    p = sub.add_parser("wait")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("port-free")
    p.add_argument("port", type=int)
    p.set_defaults(func=cmd_port_free)
    sub.add_parser("free-port").set_defaults(func=cmd_free_port)
    sub.add_parser("cluster-id").set_defaults(func=cmd_cluster_id)
    sub.add_parser("split-properties").set_defaults(func=cmd_split_properties)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
