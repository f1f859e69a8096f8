"""What a TRE administrator may do in JupyterHub: run the hub, never act as a researcher.

A TRE admin (``policies/staff.yaml`` ``admins``, confirmed by the IdP's admin group with OIDC)
is put in the hub group ``tre-admins`` by the authenticators at each login and refresh. That
group holds the role ``tre-admin`` below, and nobody is a JupyterHub *admin*: JupyterHub's
built-in ``admin`` role holds every scope, among them ``access:servers`` (open any researcher's
sandbox: their code and their project's data) and ``tokens``/``admin:users`` (issue a token
as any user and act as them, e.g. vote in the airlock as an output checker). Separation of
duties: an admin sees users, servers and groups on the admin page and stops servers, and that is
all; project membership and staff roles change in the registry (``tre project ...`` or the
airlock's admin API), not in the hub.

Used by the generated configuration (``tre.hub.config``) and the docker-compose one
(``images/hub/jupyterhub_config.py``), so both grant exactly this.
"""

from __future__ import annotations

from typing import Any

ADMINS_GROUP = "tre-admins"  # the hub group of the TRE admins (tre.hub.auth.Access.hub_groups)
# the output checkers' hub group: it holds no hub role (the airlock reads staff.yaml itself)
CHECKERS_GROUP = "output-checkers"
TRE_ADMIN_ROLE = "tre-admin"

# JupyterHub 6 scopes (jupyterhub/scopes.py). The admin page (/hub/admin) needs ``admin-ui``
# and lists users with their servers (/hub/api/users?include_stopped_servers) and groups
# (/hub/api/groups); its "Stop server" button needs ``delete:servers``.
TRE_ADMIN_SCOPES = [
    "admin-ui",
    "list:users",
    "read:users",  # name, groups, last activity (not auth state)
    "read:servers",  # server models, not their state
    "delete:servers",  # stop a server for maintenance
    "list:groups",
    "read:groups",
]

# Scopes that must never reach a TRE admin (checked by the tests against JupyterHub's own
# expansion of TRE_ADMIN_SCOPES): entering a sandbox, acting as another user, reading tokens or
# auth state (the IdP's tokens), starting servers as someone else, changing users or groups
# (group membership grants roles: ``tre-admins`` itself).
FORBIDDEN_ADMIN_SCOPES = frozenset(
    {
        "access:servers",
        "shares",
        "tokens",
        "read:tokens",
        "admin:users",
        "users",
        "admin:auth_state",
        "admin:servers",
        "admin:server_state",
        "servers",
        "start:servers",
        "admin:groups",
        "groups",
        "admin:services",
        "shutdown",
    }
)


def admin_roles() -> list[dict[str, Any]]:
    """The ``load_roles`` entries for administrators.

    ``tre-admin`` is held by the ``tre-admins`` group (whose members the authenticators set).
    The built-in ``admin`` role is pinned to no user: at every start JupyterHub then removes it,
    and the admin flag, from anyone who still has it in the database (a hub that granted it
    before, or someone made admin by hand), so that their existing tokens and cookies lose it
    too instead of keeping it until their next login."""
    return [
        {
            "name": TRE_ADMIN_ROLE,
            "description": "TRE administrators: run the hub; no access to researchers' servers",
            "scopes": list(TRE_ADMIN_SCOPES),
            "groups": [ADMINS_GROUP],
        },
        {"name": "admin", "users": []},
    ]
