#!/usr/bin/env python3
"""Helpers for scripts/bench.sh (not a library anyone else imports).

Subcommands:
  proxy TARGET_PORT REQLOG   A byte-counting HTTP/1.1 proxy on 127.0.0.1 (free port, printed as
                             "listening PORT" on stdout). Every response it relays is appended
                             to REQLOG as "METHOD PATH STATUS BODY_BYTES WIRE_BYTES", where
                             BODY_BYTES is the response body as framed on the wire and
                             WIRE_BYTES head + body.
  s3-setup PORT BUCKET       Create BUCKET in moto and give it a policy allowing anonymous
                             s3:GetObject (apt's http method reads it path-style).
  access-count MOTO_LOG      Number of werkzeug access-log lines in MOTO_LOG, once settled.
  access-since MOTO_LOG MARK The access-log lines after the first MARK, as "METHOD PATH STATUS".
  proxy-since REQLOG MARK    The proxy's lines after the first MARK.
  summarize-poll MOTO_LINES PROXY_LINES
                             For one poll: S3 requests, their statuses, S3 body bytes, IMDS
                             requests and bytes (IMDS = paths under /latest/), as key=value.
  stats [NUMBERS...]         "median min max" of the numbers (read from stdin when none given).
  thread-ns PID              "TID NS" per live thread of PID: nanoseconds on CPU (schedstat).
  thread-ns-delta BEFORE AFTER
                             From two thread-ns outputs: "DELTA_NS SAME NEW GONE" (threads seen
                             both times, new ones counted in full; time of threads that exited
                             in between is lost, hence GONE).
"""

import collections
import os
import re
import socket
import sys
import threading
import time

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ACCESS = re.compile(r'\] "(\S+) (\S+) [^"]*" (\d{3}) ')


# ---------------------------------------------------------------------------------------------
# moto's access log
# ---------------------------------------------------------------------------------------------

def access_lines(path):
    """werkzeug's `127.0.0.1 - - [date] "GET /p HTTP/1.1" 304 -` lines as "GET /p 304"."""
    out = []
    try:
        with open(path, "r", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        m = ACCESS.search(ANSI.sub("", line) + " ")
        if m:
            out.append(f"{m.group(1)} {m.group(2)} {m.group(3)}")
    return out


def settled(reader, path):
    """Re-read until two reads 50 ms apart agree (at most 2 s): requests still being logged."""
    deadline = time.monotonic() + 2.0
    last = reader(path)
    while True:
        time.sleep(0.05)
        now = reader(path)
        if len(now) == len(last) or time.monotonic() > deadline:
            return now
        last = now


def proxy_lines(path):
    try:
        with open(path, "r") as f:
            return [l.rstrip("\n") for l in f if l.strip()]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------
# A byte-counting HTTP/1.1 proxy (sequential requests per connection, as hyper sends them)
# ---------------------------------------------------------------------------------------------

class Framer:
    """Incremental HTTP/1.1 message framing: feed bytes, get (head, body_len, wire_len) per
    complete message. `body_rule(head)` says how the body is framed."""

    def __init__(self, body_rule):
        self.buf = bytearray()
        self.state = "head"
        self.head = None
        self.remaining = 0
        self.body = 0
        self.wire = 0
        self.body_rule = body_rule

    def feed(self, data):
        done = []
        self.buf += data
        while True:
            if self.state == "head":
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return done
                raw = bytes(self.buf[: i + 4])
                del self.buf[: i + 4]
                self.head = parse_head(raw)
                self.wire = len(raw)
                self.body = 0
                rule = self.body_rule(self.head)
                if rule == "chunked":
                    self.state = "chunk-size"
                elif rule == "close":
                    self.state = "until-close"
                elif rule > 0:
                    self.state, self.remaining = "body", rule
                else:
                    done.append((self.head, 0, self.wire))
                    self.state = "head"
            elif self.state == "body":
                n = min(self.remaining, len(self.buf))
                if n == 0:
                    return done
                del self.buf[:n]
                self.remaining -= n
                self.body += n
                self.wire += n
                if self.remaining == 0:
                    done.append((self.head, self.body, self.wire))
                    self.state = "head"
            elif self.state == "chunk-size":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return done
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                self.wire += i + 2
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.state = "trailer"
                else:
                    self.state, self.remaining = "chunk-data", size
            elif self.state == "chunk-data":
                n = min(self.remaining, len(self.buf))
                if n == 0:
                    return done
                del self.buf[:n]
                self.remaining -= n
                self.body += n
                self.wire += n
                if self.remaining == 0:
                    self.state = "chunk-crlf"
            elif self.state == "chunk-crlf":
                if len(self.buf) < 2:
                    return done
                del self.buf[:2]
                self.wire += 2
                self.state = "chunk-size"
            elif self.state == "trailer":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return done
                del self.buf[: i + 2]
                self.wire += i + 2
                if i == 0:
                    done.append((self.head, self.body, self.wire))
                    self.state = "head"
            elif self.state == "until-close":
                self.body += len(self.buf)
                self.wire += len(self.buf)
                self.buf.clear()
                return done

    def eof(self):
        if self.state == "until-close":
            return [(self.head, self.body, self.wire)]
        return []


def parse_head(raw):
    lines = raw.decode("latin-1").split("\r\n")
    first = lines[0].split(" ", 2)
    headers = {}
    for l in lines[1:]:
        if ":" in l:
            k, v = l.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return first, headers


def request_rule(head):
    _, h = head
    if "chunked" in h.get("transfer-encoding", "").lower():
        return "chunked"
    return int(h.get("content-length", "0") or 0)


def serve_proxy(target_port, reqlog):
    log = open(reqlog, "a", buffering=1)
    lock = threading.Lock()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    print(f"listening {srv.getsockname()[1]}", flush=True)

    def handle(client):
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port))
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = collections.deque()

        def response_rule(head):
            first, h = head
            status = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0
            method = pending[0][0] if pending else "GET"
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                return 0
            if "chunked" in h.get("transfer-encoding", "").lower():
                return "chunked"
            if "content-length" in h:
                return int(h["content-length"] or 0)
            return "close"

        def pump(src, dst, framer, on_message):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
                    for msg in framer.feed(data):
                        on_message(msg)
            except OSError:
                pass
            for msg in framer.eof():
                on_message(msg)
            for s in (dst,):
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        def on_request(msg):
            (first, _), _, _ = msg
            pending.append((first[0], first[1] if len(first) > 1 else "?"))

        def on_response(msg):
            (first, _), body, wire = msg
            status = first[1] if len(first) > 1 else "?"
            if status.startswith("1"):
                return  # 100 Continue: the final response follows
            method, path = pending.popleft() if pending else ("?", "?")
            with lock:
                log.write(f"{method} {path} {status} {body} {wire}\n")

        t = threading.Thread(
            target=pump, args=(client, upstream, Framer(request_rule), on_request), daemon=True
        )
        t.start()
        pump(upstream, client, Framer(response_rule), on_response)
        t.join(timeout=5)
        client.close()
        upstream.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# ---------------------------------------------------------------------------------------------
# moto setup
# ---------------------------------------------------------------------------------------------

def s3_setup(port, bucket):
    import json

    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket=bucket)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AnonymousRead",
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


# ---------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------

def summarize_poll(moto_file, proxy_file):
    with open(moto_file) as f:
        moto = [l.split() for l in f if l.strip()]
    with open(proxy_file) as f:
        proxy = [l.split() for l in f if l.strip()]
    s3 = [r for r in moto if not r[1].startswith("/latest/")]
    imds = [r for r in moto if r[1].startswith("/latest/")]
    s3_proxy = [r for r in proxy if not r[1].startswith("/latest/")]
    imds_proxy = [r for r in proxy if r[1].startswith("/latest/")]
    statuses = ",".join(r[2] for r in s3) or "-"
    print(f"s3_requests={len(s3)}")
    print(f"s3_statuses={statuses}")
    print(f"s3_paths={';'.join(r[1] + ':' + r[2] for r in s3) or '-'}")
    print(f"s3_body_bytes={sum(int(r[3]) for r in s3_proxy)}")
    print(f"s3_wire_bytes={sum(int(r[4]) for r in s3_proxy)}")
    print(f"s3_proxy_requests={len(s3_proxy)}")
    print(f"imds_requests={len(imds)}")
    print(f"imds_body_bytes={sum(int(r[3]) for r in imds_proxy)}")
    print(f"imds_paths={';'.join(r[0] + ':' + r[1] + ':' + r[2] for r in imds) or '-'}")


def stats(values):
    xs = sorted(float(v) for v in values)
    if not xs:
        print("nan nan nan")
        return
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    fmt = lambda x: f"{x:.6g}"
    print(f"{fmt(med)} {fmt(xs[0])} {fmt(xs[-1])}")


def thread_ns(pid):
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                print(tid, f.read().split()[0])
        except OSError:
            pass


def thread_ns_delta(before, after):
    def load(path):
        with open(path) as f:
            return dict(l.split() for l in f if l.strip())

    b, a = load(before), load(after)
    same = [t for t in a if t in b]
    new = [t for t in a if t not in b]
    gone = [t for t in b if t not in a]
    delta = sum(int(a[t]) - int(b[t]) for t in same) + sum(int(a[t]) for t in new)
    print(delta, len(same), len(new), len(gone))


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "proxy":
        serve_proxy(int(args[0]), args[1])
    elif cmd == "s3-setup":
        s3_setup(int(args[0]), args[1])
    elif cmd == "access-count":
        print(len(settled(access_lines, args[0])))
    elif cmd == "access-since":
        for l in settled(access_lines, args[0])[int(args[1]):]:
            print(l)
    elif cmd == "proxy-since":
        for l in settled(proxy_lines, args[0])[int(args[1]):]:
            print(l)
    elif cmd == "summarize-poll":
        summarize_poll(args[0], args[1])
    elif cmd == "thread-ns":
        thread_ns(int(args[0]))
    elif cmd == "thread-ns-delta":
        thread_ns_delta(args[0], args[1])
    elif cmd == "stats":
        stats(args if args else sys.stdin.read().split())
    else:
        sys.exit(f"bench_lib.py: unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
