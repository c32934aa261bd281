"""Kernel forwarding of a relayed connection's compute-to-client bytes: a BPF sockmap
(issue 16).

After authentication the proxy puts the compute's unix socket into a
`BPF_MAP_TYPE_SOCKHASH` (`sources`) that has a `BPF_PROG_TYPE_SK_SKB` stream-verdict
program attached, and the client's TCP socket into another SOCKHASH without a program
(`targets`, key: the socket's own cookie, `SO_COOKIE`). When the compute's bytes arrive,
the program looks the cookie of the skb's socket up in a hash map (`routes`: cookie ->
the client's key in `targets`, and a byte count), adds the skb's length to the count and
redirects the bytes to the client's send side (`bpf_sk_redirect_hash`, flags 0 =
egress); the kernel's psock worker sends them, no proxy thread wakes. The count lets the
proxy tell, when the compute closes, whether everything it sent before has been handed
to the client.

Only that direction. Redirected bytes wait in the target's psock queue with no limit
but the sender's: a unix sender (the backend) is held by its own send buffer until the
worker has copied its bytes into the client's TCP socket, so a client that does not
read stops the backend after a few MB (measured: 4.4 MB); a TCP source would not be
held (its receive window opens as soon as the verdict took the bytes: a client writing
to a compute that does not read queued 0.9 GB of kernel memory in 3 s). So the client's
bytes go on through a splice thread (`strata.proxy.relay`), with TCP's and the unix
socket's flow control; the client's socket is only a redirect target, it runs no
program.

Which cookie the verdict sees: for a unix socket the *sender's* (a unix skb belongs to
the socket that sent it, here the PostgreSQL backend's end, found with sock_diag(7),
`unix_peer_cookie`); `routes` also holds the compute socket's own cookie.

No libbpf: the maps and the program are made with the bpf(2) syscall through ctypes,
the program assembled here by hand. An instruction is 8 bytes, little-endian:
`u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm` (`struct bpf_insn`). `code` ORs the
class, size/operation and mode/source bits of linux/bpf_common.h and linux/bpf.h:

- 0xbf  ALU64 MOV X: dst = src
- 0xb7  ALU64 MOV K: dst = imm
- 0x07  ALU64 ADD K: dst += imm
- 0x7b  STX MEM DW: *(u64 *)(dst + off) = src
- 0x61  LDX MEM W: dst = *(u32 *)(src + off)
- 0xdb  STX ATOMIC DW, imm BPF_ADD: lock *(u64 *)(dst + off) += src
- 0x18  LD IMM DW: dst = a 64-bit immediate over two instructions; with src 1
        (BPF_PSEUDO_MAP_FD) imm is a map's fd, which the kernel replaces by the map
- 0x15  JMP JEQ K: if dst == imm goto pc + 1 + off
- 0x85  JMP CALL: r0 = helper imm(r1..r5)
- 0x95  JMP EXIT: return r0

The program (`verdict_program`), r1 = the `struct __sk_buff *`:

    r6 = r1
    r0 = bpf_get_socket_cookie(r1)             # helper 46
    *(u64 *)(r10 - 8) = r0                     # the key, on the stack
    r1 = routes; r2 = r10 - 8
    r0 = bpf_map_lookup_elem(r1, r2)           # helper 1
    if r0 == 0 goto drop
    r7 = r0
    r1 = *(u32 *)(r6 + 0)                      # skb->len
    lock *(u64 *)(r7 + 8) += r1                # the route's byte count
    r1 = r6; r2 = targets; r3 = r7; r4 = 0     # key: the route's first u64
    r0 = bpf_sk_redirect_hash(r1, r2, r3, r4)  # helper 72: SK_PASS, or SK_DROP
    exit
    drop: r0 = 0 (SK_DROP); exit

It needs CAP_BPF and CAP_NET_ADMIN (root here: `strata start` runs the proxy as the
user who runs `strata`); without them `Sockmap.open` raises `SockmapUnavailable` and
the proxy relays with its splice threads only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKHASH = 1, 18
BPF_F_NO_PREALLOC = 1
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_ANY = 0
BPF_FUNC_MAP_LOOKUP_ELEM, BPF_FUNC_GET_SOCKET_COOKIE, BPF_FUNC_SK_REDIRECT_HASH = 1, 46, 72
SO_COOKIE = 57
MAX_SOCKETS = 16384
"""Sockets the map holds at most (two per relayed connection)."""
_ATTR_BYTES = 128
_LOG_BYTES = 64 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SockmapUnavailable(Exception):
    """BPF sockmap forwarding cannot be set up here (no permission, no kernel support)."""


# --- instruction encoding -------------------------------------------------------------------
def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One `struct bpf_insn`."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov64_reg(dst: int, src: int) -> bytes:
    return insn(0xBF, dst, src)


def mov64_imm(dst: int, imm: int) -> bytes:
    return insn(0xB7, dst, imm=imm)


def add64_imm(dst: int, imm: int) -> bytes:
    return insn(0x07, dst, imm=imm)


def stx_dw(dst: int, off: int, src: int) -> bytes:
    return insn(0x7B, dst, src, off)


def ldx_w(dst: int, src: int, off: int) -> bytes:
    return insn(0x61, dst, src, off)


def atomic_add_dw(dst: int, off: int, src: int) -> bytes:
    return insn(0xDB, dst, src, off, 0x00)  # imm BPF_ADD, no BPF_FETCH


def ld_map_fd(dst: int, fd: int) -> bytes:
    return insn(0x18, dst, 1, 0, fd) + insn(0, 0, 0, 0, 0)


def jeq_imm(dst: int, imm: int, off: int) -> bytes:
    return insn(0x15, dst, imm=imm, off=off)


def call(helper: int) -> bytes:
    return insn(0x85, imm=helper)


def exit_() -> bytes:
    return insn(0x95)


def verdict_program(targets_fd: int, routes_fd: int) -> bytes:
    """The SK_SKB stream verdict (module docstring): count, then redirect to the peer."""
    return b"".join([
        mov64_reg(6, 1),
        call(BPF_FUNC_GET_SOCKET_COOKIE),
        stx_dw(10, -8, 0),
        ld_map_fd(1, routes_fd),
        mov64_reg(2, 10),
        add64_imm(2, -8),
        call(BPF_FUNC_MAP_LOOKUP_ELEM),
        jeq_imm(0, 0, 10),
        mov64_reg(7, 0),
        ldx_w(1, 6, 0),
        atomic_add_dw(7, 8, 1),
        mov64_reg(1, 6),
        ld_map_fd(2, targets_fd),
        mov64_reg(3, 7),
        mov64_imm(4, 0),
        call(BPF_FUNC_SK_REDIRECT_HASH),
        exit_(),
        mov64_imm(0, 0),
        exit_(),
    ])


# --- bpf(2) ---------------------------------------------------------------------------------
def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    if _SYS_BPF is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {os.uname().machine}")
    ret = _libc.syscall(_SYS_BPF, cmd, attr, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed `union bpf_attr` with (offset, struct format, value) fields set."""
    buf = ctypes.create_string_buffer(_ATTR_BYTES)
    for offset, fmt, value in fields:
        struct.pack_into("<" + fmt, buf, offset, value)
    return buf


def _map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
                flags: int = 0) -> int:
    return _bpf(BPF_MAP_CREATE, _attr((0, "I", map_type), (4, "I", key_size),
                                      (8, "I", value_size), (12, "I", max_entries),
                                      (16, "I", flags)))


def _elem(cmd: int, map_fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
          flags: int = BPF_ANY) -> None:
    key_buf = ctypes.create_string_buffer(key, len(key))
    fields = [(0, "I", map_fd), (8, "Q", ctypes.addressof(key_buf))]
    if value is not None:
        fields += [(16, "Q", ctypes.addressof(value)), (24, "Q", flags)]
    _bpf(cmd, _attr(*fields))


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit cookie of `sock` (what bpf_get_socket_cookie gives)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, _NLMSG_ERROR = 4, 20, 1, 2
_UDIAG_SHOW_PEER, _UNIX_DIAG_PEER = 4, 2
_NLMSG = struct.Struct("<IHHII")
_UNIX_DIAG_REQ = struct.Struct("<BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("<BBBBIII")


def _unix_diag(ino: int, show: int) -> tuple[int, dict[int, bytes]]:
    """sock_diag(7) of the unix socket with inode `ino`: (its cookie, its attributes)."""
    req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, show,
                              0xFFFFFFFF, 0xFFFFFFFF)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.sendall(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                               1, 0) + req)
        data = nl.recv(8192)
    length, kind = _NLMSG.unpack_from(data)[:2]
    if kind == _NLMSG_ERROR:
        err = -struct.unpack_from("<i", data, _NLMSG.size)[0]
        raise OSError(err, f"sock_diag of unix socket {ino}: {os.strerror(err)}")
    msg = _UNIX_DIAG_MSG.unpack_from(data, _NLMSG.size)
    cookie = msg[5] | (msg[6] << 32)
    attrs: dict[int, bytes] = {}
    pos = _NLMSG.size + _UNIX_DIAG_MSG.size
    while pos + 4 <= length:
        rta_len, rta_type = struct.unpack_from("<HH", data, pos)
        if rta_len < 4:
            break
        attrs[rta_type] = data[pos + 4:pos + rta_len]
        pos += (rta_len + 3) & ~3
    return cookie, attrs


def unix_peer_cookie(sock: socket.socket) -> int:
    """The cookie of the other end of a connected unix stream socket (which may belong to
    another process): what bpf_get_socket_cookie gives for bytes arriving on `sock`, since
    a unix skb belongs to its sender (checked: the lookup by `sock`'s own cookie fails)."""
    _, attrs = _unix_diag(os.fstat(sock.fileno()).st_ino, _UDIAG_SHOW_PEER)
    peer = attrs.get(_UNIX_DIAG_PEER)
    if peer is None:
        raise OSError(errno.ENOTCONN, "unix socket has no peer")
    return _unix_diag(struct.unpack("<I", peer[:4])[0], 0)[0]


@dataclass(frozen=True, slots=True)
class Link:
    """One relayed connection in the maps: each socket's own cookie (its key in `targets`
    or `sources`) and the cookies the verdict sees for the compute's bytes (keys in
    `routes`)."""

    client: int
    compute: int
    from_compute: tuple[int, ...]


_ROUTE = struct.Struct("<QQ")
"""A `routes` value: the client's key in `targets`, bytes redirected so far."""


def _key(cookie: int) -> bytes:
    return cookie.to_bytes(8, "little")


class Sockmap:
    """The proxy's maps and the verdict program attached to `sources` (one per process):
    `sources` (SOCKHASH, the compute sockets), `targets` (SOCKHASH, the client sockets)
    and `routes` (HASH, the cookie the verdict sees -> the client's cookie and a byte
    count)."""

    def __init__(self, sources_fd: int, targets_fd: int, routes_fd: int,
                 prog_fd: int) -> None:
        self.sources_fd = sources_fd
        self.targets_fd = targets_fd
        self.routes_fd = routes_fd
        self.prog_fd = prog_fd

    @classmethod
    def open(cls) -> Sockmap:
        """Make the maps, load and attach the program; SockmapUnavailable if not allowed."""
        fds: list[int] = []
        try:
            sources = _map_create(BPF_MAP_TYPE_SOCKHASH, 8, 4, MAX_SOCKETS)
            fds.append(sources)
            targets = _map_create(BPF_MAP_TYPE_SOCKHASH, 8, 4, MAX_SOCKETS)
            fds.append(targets)
            routes = _map_create(BPF_MAP_TYPE_HASH, 8, _ROUTE.size, 2 * MAX_SOCKETS,
                                 BPF_F_NO_PREALLOC)
            fds.append(routes)
            code = verdict_program(targets, routes)
            code_buf = ctypes.create_string_buffer(code, len(code))
            license_buf = ctypes.create_string_buffer(b"GPL")
            log_buf = ctypes.create_string_buffer(_LOG_BYTES)
            load = _attr((0, "I", BPF_PROG_TYPE_SK_SKB), (4, "I", len(code) // 8),
                         (8, "Q", ctypes.addressof(code_buf)),
                         (16, "Q", ctypes.addressof(license_buf)), (24, "I", 1),
                         (28, "I", _LOG_BYTES), (32, "Q", ctypes.addressof(log_buf)))
            struct.pack_into("16s", load, 48, b"strata_relay")
            try:
                prog = _bpf(BPF_PROG_LOAD, load)
            except OSError as err:
                verifier = log_buf.value.decode(errors="replace").strip().splitlines()
                raise SockmapUnavailable(f"loading the verdict program: {err.strerror}"
                                         + (f" ({verifier[-1]})" if verifier else "")) from None
            fds.append(prog)
            _bpf(BPF_PROG_ATTACH, _attr((0, "I", sources), (4, "I", prog),
                                        (8, "I", BPF_SK_SKB_STREAM_VERDICT)))
        except SockmapUnavailable:
            for fd in fds:
                os.close(fd)
            raise
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise SockmapUnavailable(f"bpf(2): {err.strerror}") from None
        return cls(sources, targets, routes, prog)

    def close(self) -> None:
        for fd in (self.prog_fd, self.routes_fd, self.targets_fd, self.sources_fd):
            os.close(fd)

    def add(self, client: socket.socket, compute: socket.socket) -> Link:
        """Forward the compute's incoming bytes to the client from now on (OSError if the
        kernel refuses; then neither socket is in the maps)."""
        own_client, own_compute = socket_cookie(client), socket_cookie(compute)
        from_compute = [own_compute]
        if compute.family == socket.AF_UNIX:
            from_compute.append(unix_peer_cookie(compute))
        link = Link(own_client, own_compute, tuple(from_compute))
        try:
            for seen in link.from_compute:
                _elem(BPF_MAP_UPDATE_ELEM, self.routes_fd, _key(seen),
                      ctypes.create_string_buffer(_ROUTE.pack(own_client, 0), _ROUTE.size))
            # The target first: the source's bytes may come as soon as it is in its map.
            for map_fd, cookie, sock in ((self.targets_fd, own_client, client),
                                         (self.sources_fd, own_compute, compute)):
                fd = ctypes.create_string_buffer(struct.pack("<I", sock.fileno()), 4)
                _elem(BPF_MAP_UPDATE_ELEM, map_fd, _key(cookie), fd)
        except OSError:
            self.remove(link)
            raise
        return link

    def forwarded(self, link: Link) -> int:
        """Bytes the program has redirected so far from the compute to the client."""
        total = 0
        for cookie in link.from_compute:
            value = ctypes.create_string_buffer(_ROUTE.size)
            try:
                _elem(BPF_MAP_LOOKUP_ELEM, self.routes_fd, _key(cookie), value)
            except OSError:
                continue
            total += _ROUTE.unpack(value.raw)[1]
        return total

    def remove(self, link: Link) -> None:
        """Take the connection out of the maps (closing a socket also removes it from its
        SOCKHASH, not from `routes`)."""
        for map_fd, cookie in ([(self.routes_fd, c) for c in link.from_compute]
                               + [(self.sources_fd, link.compute),
                                  (self.targets_fd, link.client)]):
            try:
                _elem(BPF_MAP_DELETE_ELEM, map_fd, _key(cookie), None)
            except OSError:
                pass  # not there (closed already)
