#!/bin/bash
# First start of the PostgreSQL container: one role and one database each for the hub and the
# airlock (least privilege: neither can read the other's tables). Passwords come from the
# compose secrets, never from this file.
set -euo pipefail
hub_pw="$(cat /run/secrets/hub_db_password)"
airlock_pw="$(cat /run/secrets/airlock_db_password)"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v hub_pw="$hub_pw" -v airlock_pw="$airlock_pw" <<'EOSQL'
CREATE ROLE tre_hub LOGIN PASSWORD :'hub_pw';
CREATE DATABASE jupyterhub OWNER tre_hub;
REVOKE ALL ON DATABASE jupyterhub FROM PUBLIC;
CREATE ROLE tre_airlock LOGIN PASSWORD :'airlock_pw';
CREATE DATABASE airlock OWNER tre_airlock;
REVOKE ALL ON DATABASE airlock FROM PUBLIC;
EOSQL
