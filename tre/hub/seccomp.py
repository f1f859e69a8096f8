"""A seccomp filter for the sandboxes: deny the system calls a notebook never needs and that
are the usual kernel attack surface or escape paths (ptrace, mount, namespaces, keyrings, bpf,
perf, userfaultfd, module loading, ...). Everything else is allowed (an allow-list would break
arbitrary scientific code).

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
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def compile_filter(denied: tuple[str, ...] = DENIED_SYSCALLS) -> bytes:
    """The BPF program (for this machine's architecture) denying ``denied`` with EPERM."""
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
