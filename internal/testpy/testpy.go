// Package testpy holds the Python programs tests run inside network
// namespaces (with /usr/bin/python3) to drive and observe traffic. Shared
// by the package-level policy tests and the daemon tests, so both measure
// with the same probes.
package testpy

// EchoServer accepts TCP on the given ports and echoes; UDP datagrams are
// counted. Arguments are "tcp:PORT" or "udp:PORT". It prints "ready" once
// listening, then "hit <port> <peer>" per accepted connection or datagram.
const EchoServer = `
import socket, sys, threading
def echo(c):
    try:
        while True:
            d = c.recv(4096)
            if not d: break
            c.sendall(d)
    except Exception: pass
def tcp(p):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", p)); s.listen(128)
    while True:
        c, a = s.accept()
        print("hit", p, a[0], flush=True)
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def udp(p):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::", p))
    while True:
        d, a = s.recvfrom(2048)
        print("hit", p, a[0], flush=True)
for a in sys.argv[1:]:
    kind, p = a.split(":")
    threading.Thread(target=tcp if kind == "tcp" else udp, args=(int(p),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
`

// AtomicProber takes a destination and a stop-file path. It holds one TCP
// connection to port 80 open (an echo every 2 ms) and sends SYNs to 7000
// and UDP datagrams to 7001 until the stop file appears; then it prints
// "echo N echofail N syn N udp N final BOOL" (final: the connection still
// echoes).
const AtomicProber = `
import os, socket, sys, threading, time
dst, stop = sys.argv[1], sys.argv[2]
st = {"echo": 0, "echofail": 0, "syn": 0, "udp": 0}
c = socket.create_connection((dst, 80), timeout=5)
def est():
    while not os.path.exists(stop):
        try:
            c.sendall(b"abcd")
            d = b""
            while len(d) < 4:
                r = c.recv(4 - len(d))
                if not r: raise EOFError("closed")
                d += r
            st["echo"] += 1
        except Exception as e:
            st["echofail"] += 1
            return
        time.sleep(0.002)
def syn():
    while not os.path.exists(stop):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setblocking(False)
        try: s.connect((dst, 7000))
        except Exception: pass
        st["syn"] += 1
        time.sleep(0.001)
        s.close()
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    while not os.path.exists(stop):
        u.sendto(b"x", (dst, 7001)); st["udp"] += 1
        time.sleep(0.0005)
ts = [threading.Thread(target=f) for f in (est, syn, udp)]
for t in ts: t.start()
for t in ts: t.join()
ok = False
try:
    c.sendall(b"done"); ok = c.recv(4) == b"done"
except Exception: pass
print("echo", st["echo"], "echofail", st["echofail"], "syn", st["syn"], "udp", st["udp"], "final", ok, flush=True)
`
