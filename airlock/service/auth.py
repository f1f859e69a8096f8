"""Identity from JupyterHub: the airlock is a hub service.

Browsers log in with the hub's OAuth (``HubOAuth``, authorization code + PKCE); API callers send
``Authorization: token <hub token>``. Either way the token is validated against the hub API
(``GET /hub/api/user``, cached briefly by ``HubOAuth``) and only what the HUB says counts:
- the user's name (roles then come from the TRE registry, not from the hub or the client);
- the token's scopes. JupyterHub gives each server a token whose access scope is filtered to that
  server: ``access:servers!server=<user>/<server name>`` (``User.spawn`` in jupyterhub 6 turns the
  ``!server`` filter of ``Spawner.server_token_scopes`` into ``!server=<user>/<name>``). Servers are
  named after projects, so such a token is a SANDBOX token, restricted to that project and to
  author actions. A token carrying server filters of more than one server, or of another user, is
  refused.
- every token must also hold ``access:services!service=<airlock service name>``: the hub decides
  who may use the airlock at all (server tokens need it in ``Spawner.server_token_scopes``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

from jupyterhub.services.auth import HubOAuth, check_scopes

SERVER_SCOPE_PREFIX = "access:servers!server="


@dataclass(frozen=True)
class Identity:
    name: str
    sandbox_project: str | None = None


class IdentityProvider(Protocol):
    async def identify(self, token: str) -> Identity | None: ...


class TokenRefused(Exception):  # noqa: N818
    """The hub knows the token but it may not be used here (reason in the message)."""


def sandbox_project_from_scopes(name: str, scopes: set[str]) -> str | None:
    """The project whose sandbox holds this token, or None for a user's own token."""
    servers = {s[len(SERVER_SCOPE_PREFIX) :] for s in scopes if s.startswith(SERVER_SCOPE_PREFIX)}
    if not servers:
        return None
    if len(servers) > 1:
        raise TokenRefused("a token tied to several servers cannot act on the airlock")
    owner, _, server_name = next(iter(servers)).partition("/")
    if owner != name or not server_name:
        raise TokenRefused("the token is tied to another user's server")
    return server_name


@dataclass
class HubConfig:
    api_url: str  # e.g. http://127.0.0.1:8081/hub/api
    api_token: str  # the service's token (also its OAuth client secret)
    service_name: str = "airlock"
    prefix: str = "/services/airlock/"
    client_id: str = "service-airlock"
    hub_host: str = ""  # public origin of the hub when it differs from ours ("" = same proxy)
    hub_prefix: str = "/hub/"
    # where the hub sends the browser back after login: our public URL (the hub registers
    # <service host><prefix>oauth_callback); "" = <prefix>oauth_callback on the same host
    public_url: str = ""
    cache_max_age: int = 30  # seconds a validated token is trusted before asking the hub again

    @classmethod
    def from_env(cls) -> HubConfig:
        """The environment JupyterHub gives its services."""
        try:
            api_url = os.environ["JUPYTERHUB_API_URL"]
            token = os.environ["JUPYTERHUB_API_TOKEN"]
        except KeyError as exc:
            raise RuntimeError(
                f"{exc.args[0]} is not set: run the airlock as a JupyterHub service"
            ) from None
        name = os.environ.get("JUPYTERHUB_SERVICE_NAME", "airlock")
        return cls(
            api_url=api_url,
            api_token=token,
            service_name=name,
            prefix=os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{name}/"),
            client_id=os.environ.get("JUPYTERHUB_CLIENT_ID", f"service-{name}"),
            hub_host=os.environ.get("JUPYTERHUB_HOST", ""),
            hub_prefix=os.environ.get("JUPYTERHUB_BASE_URL", "/").rstrip("/") + "/hub/",
            public_url=os.environ.get("JUPYTERHUB_PUBLIC_URL", ""),
        )

    @property
    def oauth_redirect_uri(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/") + "/oauth_callback"
        return self.prefix + "oauth_callback"

    def hub_oauth(self) -> HubOAuth:
        return HubOAuth(
            api_url=self.api_url,
            api_token=self.api_token,
            oauth_client_id=self.client_id,
            oauth_redirect_uri=self.oauth_redirect_uri,
            hub_host=self.hub_host,
            hub_prefix=self.hub_prefix,
            base_url=self.prefix,
            access_scopes={f"access:services!service={self.service_name}"},
            cache_max_age=self.cache_max_age,
        )


class HubIdentityProvider:
    """Validates tokens against the hub's ``/hub/api/user``."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.hub_auth = config.hub_oauth()

    async def user_model(self, token: str) -> dict[str, Any] | None:
        return await self.hub_auth.user_for_token(token, sync=False)

    async def identify(self, token: str) -> Identity | None:
        model = await self.user_model(token)
        if not model or model.get("kind", "user") != "user" or not model.get("name"):
            return None  # unknown token, or a service's token (services are not people)
        scopes = set(model.get("scopes") or [])
        if not check_scopes(self.hub_auth.access_scopes, scopes):
            raise TokenRefused("this token has no access to the airlock service")
        name = str(model["name"])
        return Identity(name=name, sandbox_project=sandbox_project_from_scopes(name, scopes))

    def authorize_url(self, state: str, code_challenge: str) -> str:
        from urllib.parse import urlencode

        params = {
            "client_id": self.hub_auth.oauth_client_id,
            "redirect_uri": self.hub_auth.oauth_redirect_uri,
            "response_type": "code",
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        return f"{self.hub_auth.oauth_authorization_url}?{urlencode(params)}"

    def pkce(self) -> tuple[str, str]:
        verifier, challenge, _method = self.hub_auth.generate_pkce_code_challenge()
        return verifier, challenge

    async def token_for_code(self, code: str, verifier: str) -> str:
        return await self.hub_auth.token_for_code(code, code_verifier=verifier, sync=False)
