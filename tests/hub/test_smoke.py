from tre.hub.harness import Kernel


def test_alice_runs_code_in_her_sandbox(hub):
    r = hub.start_server("alice", "wilms-outcomes")
    assert r.status_code in (201, 202), r.text
    token = hub.user_token("alice")
    k = Kernel(hub, "alice", "wilms-outcomes", token)
    out = k.run("import os; print(os.getuid(), os.listdir('/data'))")
    assert out["error"] is None, out
    assert "wilms-outcomes.duckdb" in out["stdout"]
