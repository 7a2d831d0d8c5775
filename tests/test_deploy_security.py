"""Security of production mode: Prefect basic auth + CSRF, Tiled API keys with scopes, 401 without them.

The shared test facility runs with ``auth: on`` on loopback (nothing here binds elsewhere); that
a non-loopback address turns auth on is checked on the settings and the generated configurations.
"""

from __future__ import annotations

import base64

import httpx
import pytest
from facility_helpers import SharedFacility

from corrflow.operations.server import (
    ServerError,
    client_environment,
    prefect_api_url,
    prefect_server_environment,
    servers_up,
    tiled_key,
    tiled_server_config,
    tiled_url,
)
from corrflow.config.settings import SettingsError, load_settings


@pytest.fixture(scope="module")
def facility(request):
    facility = SharedFacility.get(request.config)
    facility.ensure_tiled()
    return facility


def _basic(auth_string: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


@pytest.mark.fault("auth")
def test_prefect_api_refuses_calls_without_credentials_and_without_csrf_token(facility):
    url = prefect_api_url(facility.settings)
    auth = _basic(facility.settings.server.prefect_auth_string.get_secret_value())
    assert httpx.get(f"{url}/admin/version").status_code == 401
    assert httpx.get(f"{url}/admin/version", headers=_basic("corrflow:wrong")).status_code == 401
    assert httpx.get(f"{url}/admin/version", headers=auth).status_code == 200
    # Writes are refused without credentials too (the CSRF check answers first: 403).
    assert httpx.post(f"{url}/flows/filter", json={}).status_code in (401, 403)
    no_csrf = httpx.post(f"{url}/flows/filter", json={}, headers=auth)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    with httpx.Client(headers=auth) as client:
        token = client.get(f"{url}/csrf-token", params={"client": "corrflow-test"}).json()["token"]
        ok = client.post(f"{url}/flows/filter", json={}, headers={"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "corrflow-test"})
    assert ok.status_code == 200


@pytest.mark.fault("auth")
def test_tiled_requires_a_key_and_enforces_its_scopes(facility):
    base = tiled_url(facility.settings) + "/api/v1"
    reader, writer = tiled_key(facility.settings, "reader"), tiled_key(facility.settings, "writer")
    assert httpx.get(f"{base}/metadata/").status_code == 401
    assert httpx.get(f"{base}/metadata/", headers={"Authorization": "Apikey not-a-key"}).status_code == 401
    assert httpx.get(f"{base}/metadata/", headers={"Authorization": f"Apikey {reader}"}).status_code == 200
    from tiled.client import from_uri

    as_reader = from_uri(tiled_url(facility.settings), api_key=reader)
    as_writer = from_uri(tiled_url(facility.settings), api_key=writer)
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            as_reader.create_container(key="scope-test-reader", metadata={"purpose": "scope test"})
        assert refused.value.response.status_code in (401, 403)
        created = as_writer.create_container(key="scope-test-writer", metadata={"purpose": "scope test"})
        assert created.metadata["purpose"] == "scope test"
        assert "scope-test-writer" in as_reader and "scope-test-reader" not in as_reader  # readers read
    finally:
        as_reader.context.close()
        as_writer.context.close()
    whoami = httpx.get(f"{base}/auth/whoami", headers={"Authorization": f"Apikey {reader}"}).json()
    assert whoami["type"] == "service"


@pytest.mark.fault("auth")
def test_a_non_loopback_address_turns_auth_on_and_cannot_turn_it_off(tmp_path):
    with pytest.raises(SettingsError, match="not loopback: set prefect_auth_string"):
        load_settings(data_root=tmp_path, server={"host": "192.0.2.10"})
    # A client (a worker) needs only the Prefect credential; the servers also need the admin password.
    client = load_settings(data_root=tmp_path, server={"host": "192.0.2.10", "prefect_auth_string": "ops:s3cret"})
    assert client.server.missing_server_secrets() == ["tiled_admin_password"]
    with pytest.raises(ServerError, match="server.tiled_admin_password"):
        with servers_up(client):
            pass
    with pytest.raises(SettingsError, match="cannot be off"):
        load_settings(data_root=tmp_path, server={"host": "192.0.2.10", "auth": "off"})
    exposed = load_settings(
        data_root=tmp_path, server={"host": "192.0.2.10", "prefect_auth_string": "ops:s3cret", "tiled_admin_password": "pw"}
    )
    assert exposed.server.auth_enabled and exposed.server.missing_server_secrets() == []
    env = prefect_server_environment(exposed)
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == "ops:s3cret" and env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    config = tiled_server_config(exposed)
    assert config["authentication"]["allow_anonymous_access"] is False and "single_user_api_key" not in config["authentication"]
    loopback = load_settings(data_root=tmp_path)
    assert not loopback.server.auth_enabled and "PREFECT_SERVER_API_AUTH_STRING" not in prefect_server_environment(loopback)


@pytest.mark.fault("auth")
def test_a_worker_gets_its_scoped_credentials_and_never_the_admin_password(facility):
    """The settings file every worker and flow run reads: the Prefect credential and the Tiled writer
    key, no Tiled admin password; the writer key cannot log in as the admin nor issue keys."""
    import yaml

    from corrflow.config.settings import CONFIG_ENV_VAR

    settings = facility.settings
    admin_password = settings.server.tiled_admin_password.get_secret_value()
    env = client_environment(settings)
    text = open(env[CONFIG_ENV_VAR]).read()
    assert admin_password not in text and "tiled_admin_password" not in text
    written = yaml.safe_load(text)
    writer = tiled_key(settings, "writer")
    assert written["catalog"]["api_key"] == writer
    assert env["PREFECT_API_AUTH_STRING"] == settings.server.prefect_auth_string.get_secret_value()
    worker_settings = load_settings(config_file=env[CONFIG_ENV_VAR])
    assert worker_settings.server.tiled_admin_password is None
    base = tiled_url(settings).rstrip("/") + "/api/v1"
    as_writer = {"Authorization": f"Apikey {writer}"}
    assert httpx.get(f"{base}/auth/whoami", headers=as_writer).json()["type"] == "service"
    assert httpx.post(f"{base}/auth/apikey", json={"scopes": ["admin:apikeys"]}, headers=as_writer).status_code in (401, 403)


@pytest.mark.fault("auth")
def test_each_site_s_workers_get_their_own_writer_key_and_revoking_one_stops_only_that_site(facility):
    """One Tiled service principal per site: a site's settings file holds its own key, never
    another site's nor the operators'; revoking the beamline's key refuses the beamline's writes
    while the compute site goes on writing; the next provisioning issues the beamline a new key."""
    import yaml

    from corrflow.config.settings import CONFIG_ENV_VAR, SITES
    from corrflow.operations.server import provision_tiled_keys, revoke_tiled_key, site_writer

    settings = facility.settings
    base = tiled_url(settings).rstrip("/") + "/api/v1"
    keys = {site: yaml.safe_load(open(client_environment(settings, site)[CONFIG_ENV_VAR]))["catalog"]["api_key"] for site in SITES}
    operators = tiled_key(settings, "writer")
    assert len({*keys.values(), operators}) == len(SITES) + 1, "every site and the operators hold a key of their own"
    assert all(keys[site] == tiled_key(settings, site_writer(site)) for site in SITES)
    principals = {site: httpx.get(f"{base}/auth/whoami", headers={"Authorization": f"Apikey {key}"}).json() for site, key in keys.items()}
    assert len({p["uuid"] for p in principals.values()}) == len(SITES) and all(p["type"] == "service" for p in principals.values())

    from tiled.client import from_uri

    def write(site_key: str, name: str) -> int:
        """HTTP status of creating a node with ``site_key`` (200: written)."""
        try:
            client = from_uri(tiled_url(settings), api_key=site_key)
        except httpx.HTTPStatusError as exc:
            return exc.response.status_code
        try:
            client.create_container(key=name, metadata={"purpose": "per-site key test"})
            return 200
        except httpx.HTTPStatusError as exc:
            return exc.response.status_code
        finally:
            client.context.close()

    suffix = tiled_key(settings, "reader")[:6]
    assert write(keys["beamline"], f"auth-beamline-{suffix}") == 200
    try:
        revoke_tiled_key(settings, site_writer("beamline"))
        assert write(keys["beamline"], f"auth-beamline-revoked-{suffix}") == 401
        assert write(keys["compute"], f"auth-compute-{suffix}") == 200
    finally:
        renewed = provision_tiled_keys(settings)[site_writer("beamline")]
    assert renewed != keys["beamline"]
    assert write(renewed, f"auth-beamline-renewed-{suffix}") == 200


def test_secrets_are_secret_types_never_printed(tmp_path):
    settings = load_settings(
        data_root=tmp_path,
        server={"host": "192.0.2.10", "prefect_auth_string": "ops:s3cret-auth", "tiled_admin_password": "s3cret-admin"},
        catalog={"api_key": "s3cret-key"},
    )
    shown = repr(settings) + str(settings.model_dump()) + settings.model_dump_json()
    for secret in ("s3cret-auth", "s3cret-admin", "s3cret-key"):
        assert secret not in shown
    assert settings.catalog.api_key.get_secret_value() == "s3cret-key"
