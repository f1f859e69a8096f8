# ruff: noqa: E501 - the kernel code in strings reads better unwrapped
"""Attacks run as code in a LIVE sandbox kernel (started through the hub, driven through the
proxy like JupyterLab does). Every attack must fail; each test also checks, where it can, that
the target really exists and is reachable from outside the sandbox, so a test cannot pass just
because the target was missing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import socketserver
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import AIRLOCK_CLIENT

from tre.hub.bwrap import cgroup_name
from tre.hub.harness import loopback_request

pytestmark = [pytest.mark.hub, pytest.mark.sandbox]
SECRET = "HMAC-SECRET-DO-NOT-LEAK"  # the content of the test installation's HMAC key


def run_json(kernel, code: str) -> object:
    """Run ``code`` (which must print one JSON document last) and return the document."""
    out = kernel.run(code)
    assert out["error"] is None, out
    return json.loads(out["stdout"].strip().splitlines()[-1])


# -- network -----------------------------------------------------------------------------------


class _Canary(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


@pytest.fixture
def canary():
    """TCP and UDP servers on the host's loopback that record every contact."""
    hits: list[str] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            hits.append("tcp")
            self.request.sendall(b"CANARY")

    tcp = _Canary(("127.0.0.1", 0), Handler)
    port = tcp.server_address[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    udp.settimeout(0.2)
    stop = threading.Event()

    def udp_loop():
        while not stop.is_set():
            try:
                udp.recvfrom(100)
                hits.append("udp")
            except TimeoutError:
                continue
            except OSError:
                return

    threads = [
        threading.Thread(target=tcp.serve_forever, daemon=True),
        threading.Thread(target=udp_loop, daemon=True),
    ]
    for t in threads:
        t.start()
    # the canary answers from the host: the attack below can only fail because of the sandbox
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(6) == b"CANARY"
    hits.clear()
    yield port, hits
    stop.set()
    tcp.shutdown()
    tcp.server_close()
    udp.close()


def test_no_tcp_or_udp_to_the_hosts_loopback(alice_kernel, canary, hub):
    port, hits = canary
    result = run_json(
        alice_kernel,
        f"""
import json, socket
res = {{}}
for name, addr in [("canary", ("127.0.0.1", {port})), ("hub", ("127.0.0.1", {hub.settings.hub_port})),
                   ("proxy_api", ("127.0.0.1", {hub.settings.hub.proxy_api_port}))]:
    try:
        socket.create_connection(addr, timeout=3).close(); res[name] = "connected"
    except OSError as e:
        res[name] = type(e).__name__
try:
    socket.create_connection(("::1", {port}), timeout=3).close(); res["ipv6"] = "connected"
except OSError as e:
    res["ipv6"] = type(e).__name__
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x" * 10, ("127.0.0.1", {port})); res["udp_sent"] = True
except OSError as e:
    res["udp_sent"] = type(e).__name__
print(json.dumps(res))
""",
    )
    assert result["canary"] != "connected"
    assert result["hub"] != "connected"
    assert result["proxy_api"] != "connected"
    assert result["ipv6"] != "connected"
    # a UDP datagram may be "sent" into the sandbox's own loopback, but never arrives here
    import time

    time.sleep(0.5)
    assert hits == []


def test_only_loopback_no_routes_no_dns(alice_kernel):
    result = run_json(
        alice_kernel,
        """
import json, socket, os
res = {"interfaces": [n for _, n in socket.if_nameindex()]}
res["routes"] = open("/proc/net/route").read().strip().splitlines()[1:]
res["resolv_conf"] = os.path.exists("/etc/resolv.conf")
try:
    socket.getaddrinfo("example.org", 443); res["dns"] = "resolved"
except OSError as e:
    res["dns"] = type(e).__name__
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("192.0.2.1", 53)); res["route_out"] = "yes"
except OSError as e:
    res["route_out"] = type(e).__name__
print(json.dumps(res))
""",
    )
    assert result["interfaces"] == ["lo"]
    assert result["routes"] == []
    assert result["dns"] != "resolved"
    assert result["route_out"] != "yes"  # connect() on UDP only picks a route: there is none
    assert result["resolv_conf"] is False


# -- the data ------------------------------------------------------------------------------------


def test_extract_is_readable_but_cannot_be_written(alice_kernel, hub):
    host_extract = hub.settings.extracts_dir / "wilms-outcomes.duckdb"
    before = hashlib.sha256(host_extract.read_bytes()).hexdigest()
    result = run_json(
        alice_kernel,
        """
import json, os, subprocess, duckdb
p = "/data/wilms-outcomes.duckdb"
res = {}
con = duckdb.connect(p, read_only=True)
res["rows"] = con.sql("select count(*) from patient").fetchall()[0][0]
con.close()
for name, fn in [
    ("append", lambda: open(p, "ab").write(b"x")),
    ("truncate", lambda: os.truncate(p, 0)),
    ("unlink", lambda: os.unlink(p)),
    ("rename", lambda: os.rename(p, "/data/moved")),
    ("chmod", lambda: os.chmod(p, 0o777)),
    ("new_file", lambda: open("/data/new.duckdb", "w")),
]:
    try:
        fn(); res[name] = "done"
    except OSError as e:
        res[name] = e.strerror
try:
    c = duckdb.connect(p); c.execute("create table evil(x int)"); c.close(); res["duckdb_rw"] = "done"
except Exception as e:
    res["duckdb_rw"] = type(e).__name__
r = subprocess.run(["mount", "-o", "remount,rw", p], capture_output=True, text=True)
res["remount"] = r.returncode
r = subprocess.run(["mount", "-o", "remount,rw", "/"], capture_output=True, text=True)
res["remount_root"] = r.returncode
print(json.dumps(res))
""",
    )
    assert result["rows"] == 200
    for attack in ("append", "truncate", "unlink", "rename", "chmod", "new_file", "duckdb_rw"):
        assert result[attack] != "done", attack
    assert result["remount"] != 0 and result["remount_root"] != 0
    assert hashlib.sha256(host_extract.read_bytes()).hexdigest() == before


def test_nothing_of_other_projects_or_the_hub_is_visible(alice_kernel, hub, carol_server):
    s = hub.settings
    # carol's project has an extract and (now that her server ran) a workspace on the host
    carol_ws = s.workspaces_dir / "leukaemia-incidence"
    (carol_ws / "carol-secret.csv").write_text("carol's results\n")
    hidden = [
        s.extracts_dir,
        s.extracts_dir / "leukaemia-incidence.duckdb",
        s.workspaces_dir,
        carol_ws,
        s.state_dir,
        s.hmac_key_file,
        s.state_dir / "jupyterhub.sqlite",
        s.state_dir / "hub" / "jupyterhub_cookie_secret",
        s.state_dir / "hub" / "proxy_auth_token",
        s.policies_dir,
        "/root",
        hub.settings.hub.runtime_dir / "sandboxes",
    ]
    for path in hidden[:-2]:
        assert os.path.exists(path), path  # they exist on the host
    assert s.hmac_key_file.read_text() == SECRET
    result = run_json(
        alice_kernel,
        f"""
import json, os
hidden = {json.dumps([str(p) for p in hidden])}
needle = {json.dumps(SECRET[::-1])}[::-1].encode()  # not literally in the kernel's history
res = {{"visible": [p for p in hidden if os.path.exists(p)]}}
# walk every file the sandbox can see (but the read-only system and environment, which sits
# at its host path: under /tmp when the checkout does)
env_dir = {json.dumps(str(s.hub.sandbox_env_dir.resolve()))}
found_keys, found_extracts, found_carol = [], [], []
for top in ["/data", "/home", "/tmp", "/run", "/etc", "/dev/shm"]:
    for root, dirs, files in os.walk(top):
        if root == env_dir or root.startswith(env_dir + "/"):
            continue
        for f in files:
            full = os.path.join(root, f)
            if f.endswith(".duckdb"):
                found_extracts.append(full)
            if "carol" in f:
                found_carol.append(full)
            try:
                if needle in open(full, "rb").read(1 << 20):
                    found_keys.append(full)
            except OSError:
                pass
res.update(keys=found_keys, extracts=found_extracts, carol=found_carol)
res["data"] = os.listdir("/data")
res["home"] = sorted(os.listdir("/home"))
print(json.dumps(res))
""",
    )
    assert result["visible"] == []
    assert result["keys"] == []
    assert result["extracts"] == ["/data/wilms-outcomes.duckdb"]
    assert result["carol"] == []
    assert result["data"] == ["wilms-outcomes.duckdb"]
    assert result["home"] == ["jovyan"]


def test_workspace_is_writable_and_lands_in_the_projects_workspace(alice_kernel, hub):
    result = run_json(
        alice_kernel,
        """
import json, os
open("/home/jovyan/work/note.txt", "w").write("hello from the sandbox")
res = {"cwd": os.getcwd()}
try:
    open("/etc/evil", "w"); res["etc"] = "written"
except OSError as e:
    res["etc"] = e.strerror
try:
    open("/usr/evil", "w"); res["usr"] = "written"
except OSError as e:
    res["usr"] = e.strerror
try:
    open("/evil", "w"); res["root"] = "written"
except OSError as e:
    res["root"] = e.strerror
print(json.dumps(res))
""",
    )
    assert result["cwd"] == "/home/jovyan/work"
    for where in ("etc", "usr", "root"):
        assert result[where] != "written", where
    host = hub.settings.workspaces_dir / "wilms-outcomes" / "note.txt"
    assert host.read_text() == "hello from the sandbox"
    assert host.stat().st_uid != 0  # written as the unprivileged sandbox user


def test_no_setuid_program_of_the_sandbox_user_for_local_accounts(alice_kernel, hub):
    """A sandbox owned its workspace's top directory: it made it 0777 and left a setuid copy of
    a program there, and any local account (here `nobody`) that ran it became the sandbox user,
    owner of every project's workspace. Inside, setuid does nothing (nosuid, no_new_privs);
    outside, the directory is root's (group: the sandbox user's) and stays 0770."""
    ws = hub.settings.workspaces_dir / "wilms-outcomes"
    planted = ws / "tools" / "planted-id"
    result = run_json(
        alice_kernel,
        """
import json, os, shutil
os.makedirs("tools", exist_ok=True)
shutil.copy("/usr/bin/id", "tools/planted-id")
os.chmod("tools/planted-id", 0o6755)
os.chmod("tools", 0o777)
res = {"mode": oct(os.stat("tools/planted-id").st_mode)}
try:
    os.chmod("/home/jovyan/work", 0o777); res["top"] = "chmod-ed"
except OSError as e:
    res["top"] = e.strerror
print(json.dumps(res))
""",
    )
    try:
        assert planted.stat().st_mode & 0o4000, result  # the sandbox did plant it
        try:  # as `nobody`, a local account with no business in any workspace
            euid = subprocess.run(
                [str(planted), "-u"], capture_output=True, text=True, user=65534, group=65534
            ).stdout.strip()
        except PermissionError:
            euid = "refused"
        assert euid == "refused", f"nobody ran it with euid {euid}"
        assert result["top"] != "chmod-ed"
        top = ws.stat()
        assert top.st_uid == 0 and top.st_mode & 0o7777 == 0o770
    finally:
        shutil.rmtree(ws / "tools")


# -- processes and privileges -----------------------------------------------------------------


def test_no_host_processes_no_privileges_no_setuid(alice_kernel, hub):
    hub_pid = hub.proc.pid
    result = run_json(
        alice_kernel,
        f"""
import json, os, ctypes, subprocess
res = {{"uid": os.getuid(), "euid": os.geteuid()}}
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
res["npids"] = len(pids)
cmdlines = []
for p in pids:
    try:
        cmdlines.append(open(f"/proc/{{p}}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    except OSError:
        pass
res["hub_visible"] = any("jupyterhub -f" in c or "configurable-http-proxy" in c for c in cmdlines)
try:
    os.kill({hub_pid}, 0); res["kill_hub"] = "sent"
except OSError as e:
    res["kill_hub"] = type(e).__name__
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
res["ptrace_hub"] = libc.ptrace(PTRACE_ATTACH, {hub_pid}, 0, 0), ctypes.get_errno()
# even the sandbox's own processes cannot be traced (seccomp), nor can it make namespaces
res["ptrace_own"] = libc.ptrace(PTRACE_ATTACH, 1, 0, 0), ctypes.get_errno()
res["unshare_net"] = libc.unshare(0x40000000), ctypes.get_errno()
status_now = open("/proc/self/status").read()
res["seccomp"] = [l.split()[1] for l in status_now.splitlines() if l.startswith("Seccomp:")][0]
try:
    os.setuid(0); res["setuid"] = "root"
except OSError as e:
    res["setuid"] = e.strerror
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
res["capeff"] = status["CapEff"].strip()
res["capbnd"] = status["CapBnd"].strip()
res["nonewprivs"] = status["NoNewPrivs"].strip()
# setuid-root binaries of the host: present, but they cannot raise privileges here
setuid = []
for d in ("/usr/bin", "/usr/sbin", "/usr/lib"):
    for root, dirs, files in os.walk(d):
        for f in files:
            full = os.path.join(root, f)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if st.st_mode & 0o4000 and not os.path.islink(full):
                setuid.append(full)
res["setuid_binaries"] = setuid
res["su"] = subprocess.run(["su", "-c", "id -u", "root"], capture_output=True, text=True, input="").returncode if os.path.exists("/usr/bin/su") else "absent"
r = subprocess.run(["mount", "-t", "tmpfs", "none", "/tmp"], capture_output=True, text=True)
res["mount"] = r.returncode
r = subprocess.run(["unshare", "--user", "--map-root-user", "id", "-u"], capture_output=True, text=True)
res["unshare_root"] = r.stdout.strip()
print(json.dumps(res))
""",
    )
    assert result["uid"] != 0 and result["euid"] != 0
    assert result["npids"] < 20  # only the sandbox's own processes
    assert result["hub_visible"] is False
    assert result["kill_hub"] == "ProcessLookupError"
    assert result["ptrace_hub"][0] == -1
    assert result["ptrace_own"] == [-1, 1]  # EPERM
    assert result["unshare_net"] == [-1, 1]
    assert result["seccomp"] == "2"  # filter mode
    assert result["setuid"] != "root"
    assert int(result["capeff"], 16) == 0 and int(result["capbnd"], 16) == 0
    assert result["nonewprivs"] == "1"
    assert result["setuid_binaries"], "the test needs a setuid binary to attack"
    assert result["su"] != 0
    assert result["mount"] != 0
    assert result["unshare_root"] != "0"  # no nested user namespace to be "root" in


def test_no_descriptor_of_the_hubs_log_or_terminal(alice_kernel, hub, carol_server):
    """Every sandbox ran with the hub's own stdin, stdout and stderr. A descriptor is re-opened
    through /proc/<pid>/fd/<n> with the permissions of the file it names, whatever the
    directories above it: any kernel read the hub's whole log (every user's and project's
    server output and the host paths of their sandboxes) and wrote lines into it."""
    assert "carol.leukaemia-incidence" in hub.log_path.read_text()  # the log names carol's
    marker = f"FORGED-{os.getpid()}-{id(hub)}"
    result = run_json(
        alice_kernel,
        f"""
import json, os
res = {{"targets": {{}}, "read": [], "written": []}}
needle = "carol.leukaemia-" + "incidence"
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        fds = os.listdir(f"/proc/{{pid}}/fd")
    except OSError:
        continue
    for fd in fds:
        path = f"/proc/{{pid}}/fd/{{fd}}"
        try:
            target = os.readlink(path)
        except OSError:
            continue
        res["targets"][f"{{pid}}/{{fd}}"] = target
        if not target.startswith("/"):
            continue  # sockets, pipes, anonymous inodes
        try:
            with open(path, "rb") as fh:
                if needle.encode() in fh.read(1 << 24):
                    res["read"].append(target)
        except OSError:
            pass
        if target != "/dev/null":
            try:
                with open(path, "ab") as fh:
                    fh.write(b"{marker}\\n")
                res["written"].append(target)
            except OSError:
                pass
print(json.dumps(res))
""",
    )
    targets = result["targets"]
    assert any(k.endswith("/1") for k in targets), "the test must see the processes' stdout"
    assert result["read"] == []  # nothing of another project through any descriptor
    assert marker not in hub.log_path.read_text()
    assert str(hub.log_path) not in targets.values()
    # stdin is nobody's terminal (a kernel's is a pipe from its server)
    assert targets["1/0"] == "/dev/null"
    assert {t for k, t in targets.items() if k.endswith("/0") and t.startswith("/")} == {
        "/dev/null"
    }


# raw system call numbers, resolved for this machine by libseccomp: a filter that forgets one
# fails here even where libc has no wrapper for it
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsmount",
    "open_tree", "move_mount", "open_by_handle_at", "name_to_handle_at", "keyctl", "add_key",
    "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "init_module", "finit_module", "delete_module", "kexec_load", "syslog",
)  # fmt: skip


def test_kernel_attack_surface_is_denied_by_raw_system_call(alice_kernel):
    """io_uring (whose operations seccomp never sees), pidfd_getfd and process_madvise were
    allowed; sockets of any family were allowed, AF_VSOCK included, which no network namespace
    confines (a port bound inside a sandbox was taken on the host too). Now every one fails,
    and system calls of another ABI (x32, i386 int 0x80) kill the caller."""
    from tre.hub.seccomp import _lib

    lib = _lib()
    numbers = {name: lib.seccomp_syscall_resolve_name(name.encode()) for name in DENIED}
    numbers = {name: nr for name, nr in numbers.items() if nr >= 0}
    assert "io_uring_setup" in numbers and "ptrace" in numbers
    result = run_json(
        alice_kernel,
        f"""
import ctypes, errno, json, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)  # struct io_uring_params
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
res = {{"syscalls": {{}}}}
for name, nr in {json.dumps(numbers)}.items():
    args = (8, ctypes.addressof(params)) if name == "io_uring_setup" else (0, 0, 0, 0, 0)
    res["syscalls"][name] = call(nr, *args)
families = set()
for fam in range(64):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_RAW):
        try:
            socket.socket(fam, kind).close()
            families.add(fam)
        except OSError:
            pass
res["families"] = sorted(families)
try:
    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close(); res["vsock"] = "ok"
except OSError as e:
    res["vsock"] = errno.errorcode[e.errno]
# the kernel reads an int: high bits must not smuggle AF_VSOCK (40) past the filter
res["vsock_high_bits"] = call(socket.SYS_socket if hasattr(socket, "SYS_socket") else 41, (1 << 32) | 40, 1, 0)
abi = {{
    "x32": "import ctypes; print('ran', ctypes.CDLL(None).syscall(0x40000000 + 39))",
    "i386": "import ctypes, mmap; m = mmap.mmap(-1, 4096, prot=7); m.write(bytes.fromhex('b814000000cd80c3')); "
            "print('ran', ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))())",
}}
res["abi"] = {{k: (p.returncode, p.stdout) for k, code in abi.items()
              for p in [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)]}}
print(json.dumps(res))
""",
    )
    assert result["syscalls"] == dict.fromkeys(numbers, "EPERM"), result["syscalls"]
    assert set(result["families"]) <= {1, 2, 10, 16}, result["families"]  # unix, inet(6), netlink
    assert {1, 2}.issubset(result["families"])
    assert result["vsock"] == "EAFNOSUPPORT"
    assert result["vsock_high_bits"] == "EAFNOSUPPORT"
    for abi, (code, out) in result["abi"].items():
        assert code != 0 and "ran" not in out, (abi, code, out)  # killed (SIGSYS), never run


def test_one_users_two_project_sandboxes_share_nothing(alice_kernel, alice_second_kernel, hub):
    """alice in wilms-outcomes and in second-study at once: same user, same host uid. What one
    sandbox leaves in /tmp, /dev/shm, $HOME, its workspace, SysV IPC or an abstract unix socket
    is not seen by the other; no process of one is visible to the other; and the airlock takes
    no request for second-study from the wilms-outcomes sandbox (it would snapshot and check
    second-study's workspace files for a sandbox of another project)."""
    result_b = run_json(
        alice_second_kernel,
        """
import ctypes, json, os, socket
for d in ("/tmp", "/dev/shm", "/home/jovyan", "/home/jovyan/work"):
    open(os.path.join(d, "b-marker.txt"), "w").write("second-study")
libc = ctypes.CDLL(None, use_errno=True)
shm = libc.shmget(0x7E5B, 4096, 0o1600)  # IPC_CREAT | 0600
sem = libc.semget(0x7E5B, 1, 0o1600)
msq = libc.msgget(0x7E5B, 0o1600)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0tre-second-study"); s.listen()
globals()["_listener"] = s
print(json.dumps({"ipc": [shm, sem, msq], "ns": {n: os.readlink("/proc/self/ns/" + n) for n in ("ipc", "net", "mnt", "pid", "uts", "user")}}))
""",
    )
    assert all(i >= 0 for i in result_b["ipc"]), result_b  # made in B
    assert (hub.settings.workspaces_dir / "second-study" / "b-marker.txt").exists()
    result_a = run_json(
        alice_kernel,
        AIRLOCK_CLIENT
        + """
import ctypes, socket
res = {"ns": {n: os.readlink("/proc/self/ns/" + n) for n in ("ipc", "net", "mnt", "pid", "uts", "user")}}
found = []
for top in ("/tmp", "/dev", "/home", "/run"):
    for root, dirs, files in os.walk(top):
        if "b-marker.txt" in files:
            found.append(root)
# every visible process's root and cwd: none is in second-study's sandbox
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for link in ("root", "cwd"):
        try:
            if os.path.exists(f"/proc/{pid}/{link}/b-marker.txt"):
                found.append(f"/proc/{pid}/{link}")
        except OSError:
            pass
res["found"] = found
cmdlines = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
    except OSError:
        pass
res["b_process"] = any("second-" + "study" in c for c in cmdlines)
libc = ctypes.CDLL(None, use_errno=True)
res["ipc"] = [libc.shmget(0x7E5B, 0, 0), libc.semget(0x7E5B, 0, 0), libc.msgget(0x7E5B, 0)]
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    c.connect("\\0tre-second-study"); res["abstract"] = "connected"
except OSError as e:
    res["abstract"] = e.strerror
r = airlock.post("/requests", json={"project": "second-study", "title": "x", "context": "x",
                 "controls": "x", "files": [{"path": "b-marker.txt", "group": "tables"}], "submit": True})
res["airlock_b"] = r.status_code
print(json.dumps(res))
""",
    )
    for ns, inode in result_a["ns"].items():
        assert inode != result_b["ns"][ns], ns  # a namespace of its own, each
    assert result_a["found"] == []
    assert result_a["b_process"] is False
    assert result_a["ipc"] == [-1, -1, -1]  # ENOENT: SysV IPC is per sandbox
    assert result_a["abstract"] != "connected"
    assert result_a["airlock_b"] in (400, 403), result_a


def test_resource_limits_apply(alice_kernel, hub):
    limit = hub.settings.hub.max_file_size_mb
    result = run_json(
        alice_kernel,
        f"""
import json, resource
res = {{"as": resource.getrlimit(resource.RLIMIT_AS)[0],
       "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
       "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0]}}
try:
    with open("/home/jovyan/work/big.bin", "wb") as f:
        chunk = b"x" * (1 << 20)
        for _ in range({limit} + 2):
            f.write(chunk)
    res["big_file"] = "written"
except OSError as e:
    res["big_file"] = e.strerror
try:
    blob = bytearray({hub.settings.hub.memory_limit_mb} * 1024 * 1024 + 1); res["alloc"] = "done"
except MemoryError:
    res["alloc"] = "MemoryError"
print(json.dumps(res))
""",
    )
    s = hub.settings.hub
    assert result["as"] == s.memory_limit_mb * 1024 * 1024
    assert result["nproc"] == s.max_processes
    assert result["fsize"] == s.max_file_size_mb * 1024 * 1024
    assert result["big_file"] != "written"
    assert result["alloc"] == "MemoryError"
    big = hub.settings.workspaces_dir / "wilms-outcomes" / "big.bin"
    assert big.stat().st_size <= limit * 1024 * 1024
    big.unlink()


def test_a_fork_bomb_is_contained_by_the_sandboxs_cgroup(alice_kernel, hub):
    """Where the host's cgroups are writable (they are on this machine), each sandbox gets its
    own memory and pids cgroup: a fork bomb stops at the sandbox's pids.max."""
    from tests.conftest import require_component

    writable = os.access("/sys/fs/cgroup/pids", os.W_OK) and os.path.exists(
        "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    )
    require_component(writable, "writable cgroup v1 pids/memory controllers")
    state = hub.api("GET", "/users/alice?include_stopped_servers=1").json()["servers"]
    keeper = state["wilms-outcomes"]["state"]["pid"]
    groups = dict(
        line.split(":", 2)[1:] for line in Path(f"/proc/{keeper}/cgroup").read_text().splitlines()
    )
    key = cgroup_name(hub.settings.hub.runtime_dir, "alice.wilms-outcomes")
    assert key.startswith("tre-sandbox-alice.wilms-outcomes-")
    assert groups["pids"].endswith(key) and groups["memory"].endswith(key), groups
    pids_dir = Path("/sys/fs/cgroup/pids") / groups["pids"].lstrip("/")
    memory_dir = Path("/sys/fs/cgroup/memory") / groups["memory"].lstrip("/")
    assert int((pids_dir / "pids.max").read_text()) == hub.settings.hub.sandbox_max_pids
    limit = int((memory_dir / "memory.limit_in_bytes").read_text())
    assert limit == hub.settings.hub.sandbox_memory_mb * 1024 * 1024
    result = run_json(
        alice_kernel,
        f"""
import json, subprocess
procs, err = [], None
try:
    for _ in range({hub.settings.hub.sandbox_max_pids} * 2):
        procs.append(subprocess.Popen(["sleep", "60"]))
except OSError as e:
    err = e.errno
n = len(procs)
for p in procs:
    p.kill(); p.wait()
print(json.dumps({{"spawned": n, "errno": err}}))
""",
    )
    assert result["errno"] == 11, result  # EAGAIN: no more processes in this sandbox
    assert result["spawned"] < hub.settings.hub.sandbox_max_pids


# -- the sandbox's hub token -------------------------------------------------------------------


def test_sandbox_token_has_only_its_own_scopes(alice_kernel):
    """From inside the sandbox, through the hub's unix socket, with JUPYTERHUB_API_TOKEN."""
    result = run_json(
        alice_kernel,
        """
import json, os, httpx
c = httpx.Client(transport=httpx.HTTPTransport(uds="/run/tre/hub/hub.sock"), base_url="http://hub",
                 headers={"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]})
res = {"me": c.get("/hub/api/user").json()}
res["list_users"] = c.get("/hub/api/users").status_code
res["bob"] = c.get("/hub/api/users/bob").status_code
res["make_admin"] = c.patch("/hub/api/users/alice", json={"admin": True}).status_code
res["create_user"] = c.post("/hub/api/users/eve").status_code
res["new_token"] = c.post("/hub/api/users/alice/tokens", json={}).status_code
res["start_other"] = c.post("/hub/api/users/alice/servers/no-extract").status_code
res["stop_carol"] = c.delete("/hub/api/users/carol/servers/leukaemia-incidence").status_code
res["proxy"] = c.get("/hub/api/proxy").status_code
res["services"] = c.get("/hub/api/services").status_code
res["shutdown"] = c.post("/hub/api/shutdown").status_code
print(json.dumps(res))
""",
    )
    assert set(result["me"]["scopes"]) == {
        "access:servers!server=alice/wilms-outcomes",
        "access:services!service=airlock",
        "users:activity!user=alice",
        "read:users:activity!user=alice",
        "read:users:groups!user=alice",
        "read:users:name!user=alice",
    }
    assert result["me"]["admin"] is False
    for call in (
        "list_users",
        "bob",
        "make_admin",
        "create_user",
        "new_token",
        "start_other",
        "stop_carol",
        "proxy",
        "services",
        "shutdown",
    ):
        assert result[call] in (403, 404), (call, result[call])


def test_sandbox_token_cannot_reach_another_users_server(hub, alice_kernel, carol_server):
    token = alice_kernel.run("import os; print(os.environ['JUPYTERHUB_API_TOKEN'])")["stdout"]
    token = token.strip()
    headers = {"Authorization": f"token {token}"}
    own = loopback_request(
        "GET", f"{hub.server_url('alice', 'wilms-outcomes')}/api/status", headers=headers
    )
    assert own.status_code == 200  # the token works for its own server...
    other = loopback_request(
        "GET", f"{hub.server_url('carol', carol_server)}/api/kernels", headers=headers
    )
    assert other.status_code in (302, 403), other.status_code  # ...and nowhere else
    assert "api/kernels" not in other.headers.get("location", "")
