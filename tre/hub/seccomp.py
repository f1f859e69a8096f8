"""A seccomp filter for the sandboxes: deny the system calls a notebook never needs and that
are the usual kernel attack surface or escape paths (ptrace, mount, namespaces, keyrings, bpf,
perf, userfaultfd, io_uring, module loading, ...), and sockets of any address family but
``ALLOWED_SOCKET_FAMILIES``. Everything else is allowed (an allow-list of system calls would
break arbitrary scientific code). System calls of another ABI (i386 ``int 0x80``, x32) kill the
process: libseccomp's default for an architecture the filter was not built for.

Built with libseccomp (libseccomp.so.2, present on every Debian/Ubuntu host: systemd and apt
depend on it) through ctypes: the system Python has no seccomp bindings and pip's ``pyseccomp``
wraps the same library. bubblewrap loads the compiled BPF program (``--seccomp FD``) just
before it executes the sandbox's first process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_BASE = 0x00050000

DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    # ptrace-like access to another process (its file descriptors, its memory)
    "pidfd_getfd",
    "process_madvise",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    # io_uring: a large kernel attack surface (many privilege escalations), and its operations
    # (IORING_OP_SOCKET, _OPENAT, _CONNECT...) are not seen by seccomp at all, so it would
    # also bypass the socket-family rule below. Off in Docker's and Android's profiles too.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "iopl",
    "ioperm",
    "syslog",
    "fanotify_init",
    "lookup_dcookie",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
)

# socket(2) address families a sandbox may use: AF_UNIX (the hub's, the airlock's and its own
# server's sockets), AF_INET/AF_INET6 (its own loopback: kernels, DuckDB extensions...) and
# AF_NETLINK (its own network namespace's routing information: getaddrinfo, if_nameindex).
# Every other family is refused (EAFNOSUPPORT). Some are not confined by the network
# namespace at all: AF_VSOCK reaches the hypervisor and every vsock listener of the machine
# from any namespace (seen here: a port bound in a sandbox is taken on the host too).
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
ALLOWED_SOCKET_FAMILIES: tuple[int, ...] = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5


class _ArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class SeccompError(RuntimeError):
    """The filter could not be built."""


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompError(
            f"libseccomp is not available ({exc}); apt-get install libseccomp2"
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _deny_socket_families(lib: ctypes.CDLL, ctx: int, allowed: tuple[int, ...]) -> None:
    """socket(2) with a family not in ``allowed`` fails with EAFNOSUPPORT.

    The rules compare the whole 64-bit register: a family with any high bit set (the kernel
    reads an int) is >= max(allowed) + 1 and so refused too."""
    nr = lib.seccomp_syscall_resolve_name(b"socket")
    action = SCMP_ACT_ERRNO_BASE | errno.EAFNOSUPPORT
    top = max(allowed) + 1
    conditions = [(SCMP_CMP_GE, top)]
    conditions += [(SCMP_CMP_EQ, family) for family in range(top) if family not in allowed]
    for op, value in conditions:
        cmp = _ArgCmp(0, op, value, 0)
        rc = lib.seccomp_rule_add_array(ctx, action, nr, 1, ctypes.byref(cmp))
        if rc < 0:
            raise SeccompError(f"seccomp_rule_add(socket, {value}) failed: {os.strerror(-rc)}")


def compile_filter(
    denied: tuple[str, ...] = DENIED_SYSCALLS,
    socket_families: tuple[int, ...] = ALLOWED_SOCKET_FAMILIES,
) -> bytes:
    """The BPF program (for this machine's architecture) denying ``denied`` with EPERM and
    sockets of any family not in ``socket_families`` with EAFNOSUPPORT."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        for name in denied:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call on this architecture (e.g. iopl on arm64)
                continue
            rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ERRNO_BASE | errno.EPERM, nr, 0)
            if rc < 0:
                raise SeccompError(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")
        _deny_socket_families(lib, ctx, socket_families)
        fd = os.memfd_create("tre-seccomp")
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompError(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def filter_fd(program: bytes) -> int:
    """A readable file descriptor holding ``program``, at offset 0, for ``bwrap --seccomp``."""
    fd = os.memfd_create("tre-seccomp-bpf")
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
