"""The warm worker of one SuperNode: a long-lived process that keeps the model, tokenizer and
data partition loaded across rounds and runs client_work.train_round and evaluate_round for
the ClientApp.

Flower 1.42 runs every message of a deployment in a fresh `flwr-clientapp` process (with
`--isolation subprocess` and `--isolation process` alike: flwr-clientapp handles one message
and exits), which would import torch, transformers and peft, read the data and build the model
every round. The first ClientApp process of a node starts this worker instead (in the
SuperNode's session), and every ClientApp process hands its work ("train" or "evaluate", with
its arguments) over a Unix socket in a private folder (mode 0700; pickle, so only this user's
processes may talk to it) and returns the worker's answer. The worker exits when its
SuperNode exits (checked every second) or after `--idle` seconds without a request.

    python worker.py SOCKET SUPERNODE_PID [IDLE_SECONDS]
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import time
import traceback


def send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def receive(sock: socket.socket):
    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("the other side closed the socket")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
    (n,) = struct.unpack("!Q", exactly(8))
    return pickle.loads(exactly(n))


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def serve(path: str, supernode: int, idle: float) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".new")                   # rename: a client never meets a half-bound path
    server.listen(4)
    os.replace(path + ".new", path)
    server.settimeout(1.0)
    from flora_na_app import client_work       # torch, transformers, peft: after binding
    last = time.monotonic()
    try:
        while alive(supernode) and time.monotonic() - last < idle:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    kind, request = receive(conn)
                    work = {"train": client_work.train_round,
                            "evaluate": client_work.evaluate_round}[kind]
                    answer = ("ok", work(**request))
                except Exception as err:        # the ClientApp raises it as the round's error
                    answer = ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
                try:
                    send(conn, answer)
                except OSError:
                    pass                        # the ClientApp process is gone: nothing to tell
            last = time.monotonic()
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 3600.0)
