"""Stop, hub restart, idle culling, and the hub on PostgreSQL."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_AUTH, make_state

from tre.hub.harness import HubInstance, Kernel, loopback_request

pytestmark = [pytest.mark.hub, pytest.mark.sandbox]


def pids_in_namespace(inode: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/pid").st_ino == inode:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def server_state(hub: HubInstance, user: str, name: str) -> dict:
    model = hub.api("GET", f"/users/{user}?include_stopped_servers=1").json()
    return model["servers"][name]["state"]


def test_stop_kills_every_process_of_the_sandbox(hub):
    r = hub.start_server("bob", "wilms-outcomes")
    assert r.status_code in (201, 202), r.text
    kernel = Kernel(hub, "bob", "wilms-outcomes", hub.user_token("bob"))
    # a process that leaves its session and process group, as a daemon would
    out = kernel.run(
        "import subprocess; p = subprocess.Popen(['sleep', '1000'], start_new_session=True); "
        "print(p.pid)"
    )
    assert out["error"] is None, out
    state = server_state(hub, "bob", "wilms-outcomes")
    inode = state["pidns"]
    assert inode and len(pids_in_namespace(inode)) >= 4  # init, server, kernel, sleep
    socket_dir = Path(state["socket"]).parent
    assert socket_dir.exists()
    hub.stop_server("bob", "wilms-outcomes")
    deadline = time.monotonic() + 10
    while pids_in_namespace(inode) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids_in_namespace(inode) == []
    assert not socket_dir.exists()


def test_a_swapped_server_socket_does_not_redirect_the_proxy(hub):
    """The sandbox's server socket lives in a host directory the sandbox writes
    (``/run/tre/server``). The sandbox renames its socket away and puts a symlink to a socket of
    the host in its place: the proxy and the hub (root) must not connect through it."""
    import socket
    import threading

    daemon_dir = Path(tempfile.mkdtemp(dir="/tmp"))  # stands for a root daemon's socket
    daemon = socket.socket(socket.AF_UNIX)
    daemon.bind(str(daemon_dir / "daemon.sock"))
    daemon.listen(8)
    daemon.settimeout(0.2)
    hits: list[bytes] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = daemon.accept()
            except TimeoutError:
                continue
            with conn:
                hits.append(conn.recv(4096))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nDAEMON")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        r = hub.start_server("bob", "wilms-outcomes")
        assert r.status_code in (201, 202), r.text
        token = hub.user_token("bob")
        kernel = Kernel(hub, "bob", "wilms-outcomes", token)
        out = kernel.run(
            "import os\n"
            "os.rename('/run/tre/server/jupyter.sock', '/run/tre/server/moved.sock')\n"
            f"os.symlink({str(daemon_dir / 'daemon.sock')!r}, '/run/tre/server/jupyter.sock')\n"
            "print(os.readlink('/run/tre/server/jupyter.sock'))"
        )
        assert out["error"] is None and "daemon.sock" in out["stdout"], out
        status = loopback_request(
            "GET",
            f"{hub.server_url('bob', 'wilms-outcomes')}/api/status",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        )
        assert hits == []  # root never connected to the host's socket
        assert status.status_code == 200 and "DAEMON" not in status.text  # still bob's server
    finally:
        done.set()
        thread.join(5)
        daemon.close()
        hub.stop_server("bob", "wilms-outcomes")
        shutil.rmtree(daemon_dir, ignore_errors=True)


@pytest.fixture
def own_hub(sandbox_env):
    """A hub of its own (restarted or reconfigured by the test)."""
    roots = []

    def make(**hub_settings) -> HubInstance:
        root = Path(tempfile.mkdtemp(prefix="trehub-", dir="/tmp"))
        roots.append(root)
        return HubInstance(make_state(root, **hub_settings), extra_config=TEST_AUTH)

    instances: list[HubInstance] = []

    def start(**hub_settings) -> HubInstance:
        instance = make(**hub_settings).start()
        instances.append(instance)
        return instance

    yield start
    from conftest import stop_everything

    for instance in instances:
        if instance.proc and instance.proc.poll() is None:
            stop_everything(instance)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_sandboxes_survive_a_hub_restart_and_stay_reachable(own_hub):
    hub = own_hub()
    hub.create_user("alice")
    hub.start_server("alice", "wilms-outcomes")
    token = hub.user_token("alice")
    kernel = Kernel(hub, "alice", "wilms-outcomes", token)
    assert kernel.run("x = 41; print('set')")["stdout"].strip() == "set"
    state = server_state(hub, "alice", "wilms-outcomes")

    hub.stop()
    os.kill(state["pid"], 0)  # the sandbox outlived the hub (and its proxy)
    assert pids_in_namespace(state["pidns"])

    hub.start()
    servers = hub.api("GET", "/users/alice").json()["servers"]
    assert servers.get("wilms-outcomes", {}).get("ready") is True, hub.log(20000)
    # the same kernel, with its state, through the new proxy's route to the unix socket
    assert kernel.run("print(x + 1)")["stdout"].strip() == "42"
    assert server_state(hub, "alice", "wilms-outcomes")["pid"] == state["pid"]
    hub.stop_server("alice", "wilms-outcomes")
    assert pids_in_namespace(state["pidns"]) == []


@pytest.mark.slow
@pytest.mark.postgres
def test_idle_culler_stops_idle_sandboxes_on_a_postgresql_hub(own_hub, require_postgres):
    """The hub runs on PostgreSQL (its own database), and the idle culler service, configured
    from the TRE settings, stops a sandbox nobody uses."""
    import psycopg

    admin_url = require_postgres.replace("postgresql+psycopg://", "postgresql://")
    dbname = f"tre_hub_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db_url = require_postgres.rsplit("/", 1)[0] + f"/{dbname}"
    try:
        hub = own_hub(db_url=db_url, idle_timeout_seconds=8, cull_interval_seconds=3)
        assert hub.settings.hub_db_url == db_url
        hub.create_user("alice")
        hub.start_server("alice", "wilms-outcomes")
        with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            users = {r[0] for r in conn.execute("SELECT name FROM users")}
            spawners = {r[0] for r in conn.execute("SELECT name FROM spawners")}
        assert "alice" in users and "wilms-outcomes" in spawners
        state = server_state(hub, "alice", "wilms-outcomes")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            model = hub.api("GET", "/users/alice").json()["servers"]
            if "wilms-outcomes" not in model or not model["wilms-outcomes"]["ready"]:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the idle sandbox was not culled:\n{hub.log()}")
        deadline = time.monotonic() + 10
        while pids_in_namespace(state["pidns"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pids_in_namespace(state["pidns"]) == []
        assert "idle-culler" in hub.log()
        hub.stop()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
