"""JupyterHub configuration of the docker-compose deployment (see docs/deployment.md).

Everything site-specific comes from the environment that docker-compose.yml sets from ``.env``;
secrets come from files under /run/secrets. The embedded (bubblewrap) deployment does not use
this file: it generates its configuration with ``tre hub config``.
"""

# ruff: noqa: F821 - `get_config` is provided by JupyterHub when it loads this file
import os
from pathlib import Path

from tre.hub.access import named_server_gate
from tre.hub.roles import admin_roles
from tre.settings import check_public_url, public_origin


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None or value == "":
        raise SystemExit(f"jupyterhub_config: {name} must be set (see .env.example)")
    return value


def secret(name: str) -> str:
    # compose secrets are files under /run/secrets (TRE_SECRETS_DIR overrides it for tests)
    return Path(os.environ.get("TRE_SECRETS_DIR", "/run/secrets"), name).read_text().strip()


c = get_config()

policies_dir = env("TRE_POLICIES_DIR", "/srv/tre/policies")
try:
    public_url = check_public_url(env("TRE_PUBLIC_URL"))
except ValueError as exc:
    raise SystemExit(f"jupyterhub_config: TRE_PUBLIC_URL: {exc}") from None
# the airlock is told its public URL (TRE_AIRLOCK_PUBLIC_URL, its OAuth redirect) by compose:
# it must be the host the hub gives the service, or logins to the airlock fail
airlock_public_url = public_origin(public_url, "airlock", "service") + "/services/airlock/"
if env("TRE_AIRLOCK_PUBLIC_URL") != airlock_public_url:
    raise SystemExit(
        f"jupyterhub_config: TRE_AIRLOCK_PUBLIC_URL must be {airlock_public_url} "
        f"(the airlock's own host under TRE_PUBLIC_URL={public_url})"
    )

# --- hub, proxy, database -------------------------------------------------------------------
c.JupyterHub.bind_url = public_url
# origin separation: each user's servers on <user>.<host>, the airlock on
# airlock--service.<host> (wildcard DNS and certificate): a sandbox's pages can never run in
# the hub's or the airlock's origin; __Host- cookies cannot be tossed from a sibling host
c.JupyterHub.subdomain_host = public_url
c.JupyterHub.cookie_host_prefix_enabled = public_url.startswith("https://")
c.JupyterHub.hub_bind_url = "http://0.0.0.0:8081"
c.JupyterHub.hub_connect_url = "http://hub:8081"
c.JupyterHub.db_url = (
    f"postgresql+psycopg://tre_hub:{secret('hub_db_password')}@postgres:5432/jupyterhub"
)
c.JupyterHub.cookie_secret = bytes.fromhex(secret("hub_cookie_secret"))
c.JupyterHub.pid_file = "/srv/tre/hub/jupyterhub.pid"
c.JupyterHub.proxy_class = "configurable-http-proxy"
c.ConfigurableHTTPProxy.should_start = False  # its own container (images/proxy)
c.ConfigurableHTTPProxy.api_url = "http://172.31.250.2:8001"  # the backend network only
c.ConfigurableHTTPProxy.auth_token = secret("proxy_auth_token")
c.JupyterHub.cleanup_servers = False
c.JupyterHub.allow_named_servers = True
c.JupyterHub.default_url = "/hub/home"
c.JupyterHub.redirect_to_server = False

# --- login: the institutional identity provider, checked against the registry ---------------
c.JupyterHub.authenticator_class = "tre.hub.auth.TREOIDCAuthenticator"
c.TREOIDCAuthenticator.policies_dir = policies_dir
c.TREOIDCAuthenticator.client_id = env("OIDC_CLIENT_ID")
c.TREOIDCAuthenticator.client_secret = secret("oidc_client_secret")
c.TREOIDCAuthenticator.oauth_callback_url = f"{public_url}/hub/oauth_callback"
c.TREOIDCAuthenticator.authorize_url = env("OIDC_AUTHORIZE_URL")
c.TREOIDCAuthenticator.token_url = env("OIDC_TOKEN_URL")
c.TREOIDCAuthenticator.userdata_url = env("OIDC_USERINFO_URL")
c.TREOIDCAuthenticator.username_claim = env("OIDC_USERNAME_CLAIM", "preferred_username")
c.TREOIDCAuthenticator.project_group_prefix = env("OIDC_PROJECT_GROUP_PREFIX", "tre-project-")
c.TREOIDCAuthenticator.enable_auth_state = True  # keys in JUPYTERHUB_CRYPT_KEY
os.environ.setdefault("JUPYTERHUB_CRYPT_KEY", secret("hub_crypt_key"))

# --- sandboxes: one container per (user, project) on the internal network --------------------
c.JupyterHub.spawner_class = "tre.hub.docker.TREDockerSpawner"
c.TREDockerSpawner.image = env("TRE_NOTEBOOK_IMAGE")  # must be name@sha256:<digest>
c.TREDockerSpawner.policies_dir = policies_dir
c.TREDockerSpawner.network_name = "tre-sandboxes"
c.TREDockerSpawner.extracts_volume = "tre-extracts"
c.TREDockerSpawner.workspaces_volume = "tre-workspaces"
c.TREDockerSpawner.workspaces_local_dir = "/srv/tre/var/workspaces"
c.TREDockerSpawner.extracts_local_dir = "/srv/tre/var/extracts"
c.TREDockerSpawner.airlock_url = "http://airlock:8100/services/airlock/"
c.TREDockerSpawner.mem_limit = env("TRE_SANDBOX_MEMORY", "4G")
c.TREDockerSpawner.cpu_limit = float(env("TRE_SANDBOX_CPUS", "2"))
c.TREDockerSpawner.pids_limit = int(env("TRE_SANDBOX_PIDS", "512"))
# a sandbox's own token may report activity, be its own server and call the airlock; no more
c.Spawner.server_token_scopes = [
    "users:activity!user",
    "access:servers!server",
    "access:services!service=airlock",
]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 60

# refuse a project the user may not start before the hub records a server (tre.hub.access)
c.JupyterHub.named_server_limit_per_user = named_server_gate(policies_dir, "/srv/tre/var/extracts")

# --- the airlock, as a JupyterHub service (runs in its own container) ------------------------
c.JupyterHub.services = [
    {
        "name": "airlock",
        "url": "http://airlock:8100",
        "api_token": secret("airlock_api_token"),
        "oauth_no_confirm": True,
        "display": True,
    },
    {
        "name": "idle-culler",
        "command": ["python3", "-m", "jupyterhub_idle_culler", "--timeout=3600"],
    },
    # the `enforcer` container (tre project enforce --loop) and `tre project apply` in `admin`
    {"name": "tre-provision", "api_token": secret("provision_api_token")},
]
c.JupyterHub.load_roles = [
    {"name": "user", "scopes": ["self", "access:services!service=airlock"]},
    {"name": "tre-airlock", "scopes": ["read:users:name"], "services": ["airlock"]},
    {
        "name": "tre-idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    },
    {
        "name": "tre-provision",
        "scopes": ["admin:users", "admin:groups", "admin:servers"],
        "services": ["tre-provision"],
    },
    # TRE admins (the `tre-admins` group, set at each login): the `tre-admin` role, which runs
    # the hub without access to researchers' servers; nobody is a JupyterHub `admin`
    *admin_roles(),
]
