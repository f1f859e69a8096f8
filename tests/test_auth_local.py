"""TRELocalAuthenticator: local demo accounts with scrypt-hashed passwords, checked against the
registry. Unit tests of the password file and the authenticator, then the real login form of a
real JupyterHub behind a real configurable-http-proxy."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading

import httpx
import pytest
from tornado import web

from tests.oidc.harness import start_hub, write_policies, xsrf_from
from tre.hub.auth import (
    ADMINS_GROUP,
    CHECKERS_GROUP,
    LoginThrottle,
    PasswordError,
    PasswordFile,
    TRELocalAuthenticator,
    TREOIDCAuthenticator,
    ensure_accounts,
    verify_password,
)

PASSWORDS = {
    "alice": "alice-correct-horse-1",
    "bob": "bob-battery-staple-22",
    "carol": "carol-closed-project-3",  # only in a project that has ended
    "erin": "erin-suspended-proj-4",  # only in a suspended project
    "dave": "dave-not-registered-5",  # has a password but is in no declaration
    "checker1": "checker-one-password",
    "admin": "admin-admin-password",
}


@pytest.fixture(scope="module")
def hashed_accounts(tmp_path_factory) -> bytes:
    # scrypt is deliberately slow: hash the accounts once per module, copy the file per test
    pw = PasswordFile(tmp_path_factory.mktemp("accounts") / "hub-users.json")
    for name, password in PASSWORDS.items():
        pw.set_password(name, password)
    return pw.path.read_bytes()


@pytest.fixture
def accounts(tmp_path, hashed_accounts):
    policies = write_policies(tmp_path)
    pw = PasswordFile(tmp_path / "secrets" / "hub-users.json")
    pw.path.parent.mkdir(mode=0o700)
    pw.path.write_bytes(hashed_accounts)
    pw.path.chmod(0o600)
    return policies, pw


def login(auth: TRELocalAuthenticator, username: str, password: str):
    return asyncio.run(
        auth.get_authenticated_user(None, {"username": username, "password": password})
    )


@pytest.fixture
def authenticator(accounts):
    policies, pw = accounts
    return TRELocalAuthenticator(password_file=str(pw.path), policies_dir=str(policies))


# ---------------------------------------------------------------- password file


def test_password_file_stores_salted_scrypt_hashes_only(accounts):
    _, pw = accounts
    raw = pw.path.read_text()
    data = json.loads(raw)
    for name, password in PASSWORDS.items():
        assert password not in raw
        assert data["users"][name].startswith("scrypt$")
    # same password twice -> different salts -> different hashes
    pw.set_password("frank", "same-password-twice")
    pw.set_password("grace", "same-password-twice")
    users = json.loads(pw.path.read_text())["users"]
    assert users["frank"] != users["grace"]
    assert stat.S_IMODE(os.stat(pw.path).st_mode) == 0o600


@pytest.mark.parametrize(
    "name,password",
    [
        ("Alice Smith", "long-enough-password"),
        ("../etc", "long-enough-password"),
        ("eve", "short"),
        ("eve", "x" * 2000),
    ],
)
def test_bad_account_input_is_refused_and_changes_nothing(accounts, name, password):
    _, pw = accounts
    before = pw.path.read_bytes()
    with pytest.raises(PasswordError):
        pw.set_password(name, password)
    assert pw.path.read_bytes() == before


def test_verify_rejects_wrong_unknown_empty(accounts):
    _, pw = accounts
    assert pw.verify("alice", PASSWORDS["alice"])
    assert not pw.verify("alice", PASSWORDS["bob"])
    assert not pw.verify("alice", PASSWORDS["alice"] + " ")
    assert not pw.verify("alice", "")
    assert not pw.verify("nobody", PASSWORDS["alice"])
    assert not pw.verify("", "")
    assert not pw.verify("alice", PASSWORDS["alice"] + "x" * 5_000_000)  # refused without hashing
    assert not verify_password("x", "md5$abc")  # unknown scheme never matches
    assert not verify_password("x", "garbage")


def test_corrupt_password_file_refuses_everyone_and_add_user_fails_cleanly(tmp_path):
    path = tmp_path / "hub-users.json"
    path.write_text("{not json")
    pw = PasswordFile(path)
    assert not pw.verify("alice", "anything-at-all")
    with pytest.raises(PasswordError):
        pw.set_password("alice", "a-new-long-password")
    assert path.read_text() == "{not json"


def test_ensure_accounts_creates_only_missing_accounts(tmp_path):
    path = tmp_path / "users.json"
    first = ensure_accounts(path, ["alice", "bob"])
    assert set(first) == {"alice", "bob"}
    assert all(PasswordFile(path).verify(n, p) for n, p in first.items())
    second = ensure_accounts(path, ["alice", "bob", "checker1"])
    assert set(second) == {"checker1"}  # alice and bob keep their passwords
    assert PasswordFile(path).verify("alice", first["alice"])


def test_remove_user(accounts):
    _, pw = accounts
    assert pw.remove("bob")
    assert not pw.verify("bob", PASSWORDS["bob"])
    assert not pw.remove("bob")
    assert pw.verify("alice", PASSWORDS["alice"])


def test_cli_add_user_prints_a_password_that_works(tmp_path):
    from typer.testing import CliRunner

    from tre.cli import app

    path = tmp_path / "users.json"
    runner = CliRunner()
    out = runner.invoke(app, ["hub", "add-user", "alice", "--password-file", str(path)])
    assert out.exit_code == 0, out.output
    name, password = out.stdout.strip().split("\t")
    assert name == "alice" and len(password) >= 12
    assert PasswordFile(path).verify("alice", password)
    bad = runner.invoke(app, ["hub", "add-user", "Bad Name", "--password-file", str(path)])
    assert bad.exit_code != 0 and "not a valid user name" in bad.output
    short = runner.invoke(
        app,
        ["hub", "add-user", "bob", "--password-stdin", "--password-file", str(path)],
        input="short\n",
    )
    assert short.exit_code != 0 and "at least 12 characters" in short.output
    assert PasswordFile(path).usernames() == ["alice"]
    assert (
        runner.invoke(app, ["hub", "list-users", "--password-file", str(path)]).stdout == "alice\n"
    )


def test_cli_writes_the_password_file_the_hub_reads(tmp_path, monkeypatch):
    # with the HMAC key kept outside the state dir (as deployments should), `tre hub add-user`
    # used to write <state_dir>/secrets/hub-users.json while the hub read the file beside the key
    from typer.testing import CliRunner

    from tre.cli import app
    from tre.hub.config import password_file
    from tre.settings import get_settings, load_settings

    monkeypatch.setenv("TRE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TRE_HMAC_KEY_FILE", str(tmp_path / "keys" / "hmac.key"))
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["hub", "add-user", "alice"])
        assert out.exit_code == 0, out.output
        _, password = out.stdout.strip().splitlines()[0].split("\t")
        hub_reads = TRELocalAuthenticator().password_file
        assert hub_reads == str(password_file(load_settings()))
        assert PasswordFile(hub_reads).verify("alice", password)
    finally:
        get_settings.cache_clear()


# ---------------------------------------------------------------- authenticator


def test_right_password_of_a_member_logs_in_with_project_groups(authenticator):
    model = login(authenticator, "alice", PASSWORDS["alice"])
    assert model["name"] == "alice"
    assert model["groups"] == ["project-neuro-survival", "project-wilms-outcomes"]
    assert model["admin"] is False


@pytest.mark.parametrize(
    "username,password",
    [
        ("alice", "wrong-password-here"),
        ("alice", ""),
        ("nobody", PASSWORDS["alice"]),
        ("", PASSWORDS["alice"]),
        ("alice", PASSWORDS["bob"]),  # someone else's password
    ],
)
def test_wrong_unknown_or_empty_is_refused(authenticator, username, password):
    assert login(authenticator, username, password) is None


@pytest.mark.parametrize("username", ["dave", "carol", "erin"])
def test_right_password_but_not_registered_is_refused_with_a_clear_message(authenticator, username):
    with pytest.raises(web.HTTPError) as err:
        login(authenticator, username, PASSWORDS[username])
    assert err.value.status_code == 403
    assert "not registered" in err.value.log_message


def test_password_check_does_not_block_the_hub_event_loop(authenticator, monkeypatch):
    """scrypt runs in a worker thread, not in the hub's event loop thread."""
    threads: list[str] = []
    real_verify = PasswordFile.verify

    def recording_verify(self, username, password):
        threads.append(threading.current_thread().name)
        return real_verify(self, username, password)

    monkeypatch.setattr(PasswordFile, "verify", recording_verify)
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop in this thread
    assert login(authenticator, "alice", PASSWORDS["alice"])["name"] == "alice"
    assert login(authenticator, "alice", "a-wrong-password") is None
    assert len(threads) == 2 and loop_thread not in threads


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("username", ["alice", "nobody"])  # known or not: the same answer
def test_repeated_wrong_passwords_delay_further_attempts(authenticator, monkeypatch, username):
    clock = FakeClock()
    authenticator.throttle = LoginThrottle(free_failures=5, max_delay=300, clock=clock)
    checked: list[str] = []
    real_verify = PasswordFile.verify

    def counting_verify(self, name, password):
        checked.append(name)
        return real_verify(self, name, password)

    monkeypatch.setattr(PasswordFile, "verify", counting_verify)
    for i in range(5):
        assert login(authenticator, username, f"guess-number-{i}") is None
    # the 6th attempt is refused without a password check, even with the right password
    with pytest.raises(web.HTTPError) as err:
        login(authenticator, username, PASSWORDS["alice"])
    assert err.value.status_code == 429 and "try again in 1 seconds" in err.value.log_message
    assert len(checked) == 5
    clock.now += 1.5
    assert login(authenticator, username, "guess-number-6") is None
    with pytest.raises(web.HTTPError) as err:  # the delay doubles
        login(authenticator, username, "guess-number-7")
    assert "try again in 2 seconds" in err.value.log_message
    clock.now += 3600
    if username == "alice":
        assert login(authenticator, "alice", PASSWORDS["alice"])["name"] == "alice"
        assert login(authenticator, "alice", "wrong-after-success") is None  # counter was reset
    # other names are not affected
    assert login(authenticator, "bob", PASSWORDS["bob"])["name"] == "bob"


def test_concurrent_guesses_cannot_outrun_the_delay(authenticator):
    async def burst() -> list:
        attempts = [
            authenticator.get_authenticated_user(
                None, {"username": "alice", "password": f"guess-{i}"}
            )
            for i in range(30)
        ]
        return await asyncio.gather(*attempts, return_exceptions=True)

    results = asyncio.run(burst())
    checked = [r for r in results if r is None]
    delayed = [r for r in results if isinstance(r, web.HTTPError) and r.status_code == 429]
    assert len(checked) == 5 and len(delayed) == 25


def test_throttle_memory_is_bounded():
    throttle = LoginThrottle(free_failures=1, max_names=100)
    for i in range(10_000):
        throttle.failed(f"spray-{i}")
    assert len(throttle._failures) == 100


def test_staff_get_their_groups_and_never_hub_admin_rights(authenticator):
    checker = login(authenticator, "checker1", PASSWORDS["checker1"])
    assert checker["groups"] == [CHECKERS_GROUP] and checker["admin"] is False
    admin = login(authenticator, "admin", PASSWORDS["admin"])
    # a TRE admin's rights come from the tre-admins group (the tre-admin role), never from
    # JupyterHub's admin flag, which the login sets False (lowering one set by older versions)
    assert admin["groups"] == [ADMINS_GROUP] and admin["admin"] is False


def test_registry_changes_take_effect_on_refresh(accounts, authenticator):
    policies, _ = accounts

    class User:
        name = "bob"

    assert asyncio.run(authenticator.refresh_user(User()))["groups"] == ["project-wilms-outcomes"]
    project = policies / "projects" / "wilms-outcomes.yaml"
    project.write_text(project.read_text().replace("- username: bob\n", ""))
    assert asyncio.run(authenticator.refresh_user(User())) is False
    with pytest.raises(web.HTTPError):
        login(authenticator, "bob", PASSWORDS["bob"])


def test_allow_all_cannot_be_switched_on():
    with pytest.raises(Exception, match="allow_all"):
        TRELocalAuthenticator(allow_all=True)


@pytest.mark.parametrize("cls", [TRELocalAuthenticator, TREOIDCAuthenticator])
def test_admin_users_cannot_be_set(cls):
    """JupyterHub makes every name in admin_users a hub admin (every scope) at each start."""
    from traitlets.config import Config

    config = Config()
    config.Authenticator.admin_users = {"admin"}
    with pytest.raises(Exception, match="admin_users cannot be set"):
        cls(config=config)
    with pytest.raises(Exception, match="admin_users cannot be set"):
        cls(admin_users={"admin"})
    assert cls().admin_users == set()


# ---------------------------------------------------------------- through a real hub


@pytest.mark.hub
def test_login_form_of_a_real_hub(accounts, tmp_path, require_proxy):
    policies, pw = accounts
    hub = start_hub(
        tmp_path,
        require_proxy,
        f"""
        c.JupyterHub.authenticator_class = "tre.hub.auth.TRELocalAuthenticator"
        c.TRELocalAuthenticator.password_file = "{pw.path}"
        c.TRELocalAuthenticator.policies_dir = "{policies}"
        """,
    )
    try:

        def attempt(username: str, password: str) -> httpx.Response:
            with httpx.Client(base_url=hub.url, timeout=20) as client:
                form = client.get("/hub/login")
                assert form.status_code == 200
                return client.post(
                    "/hub/login",
                    data={
                        "username": username,
                        "password": password,
                        "_xsrf": xsrf_from(form.text),
                    },
                )

        ok = attempt("alice", PASSWORDS["alice"])
        assert ok.status_code == 302, ok.text
        assert ok.headers["location"].endswith("/hub/home")
        for username, password in [
            ("alice", "not-her-password"),
            ("alice", ""),
            ("zed", "whatever-long"),
        ]:
            bad = attempt(username, password)
            assert bad.status_code == 403
            assert "Invalid username or password" in bad.text
        refused = attempt("dave", PASSWORDS["dave"])
        assert refused.status_code == 403
        assert "not registered in this trusted research environment" in refused.text
        # guessing bob's password: after 5 wrong ones, even the right one is delayed
        for i in range(5):
            assert attempt("bob", f"bob-guess-number-{i}").status_code == 403
        delayed = attempt("bob", PASSWORDS["bob"])
        assert delayed.status_code == 429
        assert "Too many failed logins" in delayed.text

        users = {u["name"]: u for u in hub.api("/users").json()}
        assert set(users) == {"alice"}  # nobody refused was created
        assert sorted(users["alice"]["groups"]) == [
            "project-neuro-survival",
            "project-wilms-outcomes",
        ]
    finally:
        hub.process.stop()
