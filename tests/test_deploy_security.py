"""Security of production mode: Prefect basic auth + CSRF, Tiled API keys with scopes, 401 without them.

The shared test facility runs with ``auth: on`` on loopback (nothing here binds elsewhere); that
a non-loopback address turns auth on is checked on the settings and the generated configurations.
"""

from __future__ import annotations

import base64

import httpx
import pytest
from facility_helpers import SharedFacility

from corrflow.operations.server import prefect_api_url, prefect_server_environment, tiled_key, tiled_server_config, tiled_url
from corrflow.config.settings import SettingsError, load_settings


@pytest.fixture(scope="module")
def facility(request):
    facility = SharedFacility.get(request.config)
    facility.ensure_tiled()
    return facility


def _basic(auth_string: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def test_prefect_api_refuses_calls_without_credentials_and_without_csrf_token(facility):
    url = prefect_api_url(facility.settings)
    auth = _basic(facility.settings.server.prefect_auth_string)
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


def test_a_non_loopback_address_turns_auth_on_and_cannot_turn_it_off(tmp_path):
    with pytest.raises(SettingsError, match="not loopback: set prefect_auth_string, tiled_admin_password"):
        load_settings(data_root=tmp_path, server={"host": "192.0.2.10"})
    with pytest.raises(SettingsError, match="cannot be off"):
        load_settings(data_root=tmp_path, server={"host": "192.0.2.10", "auth": "off"})
    exposed = load_settings(
        data_root=tmp_path, server={"host": "192.0.2.10", "prefect_auth_string": "ops:s3cret", "tiled_admin_password": "pw"}
    )
    assert exposed.server.auth_enabled
    env = prefect_server_environment(exposed)
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == "ops:s3cret" and env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    config = tiled_server_config(exposed)
    assert config["authentication"]["allow_anonymous_access"] is False and "single_user_api_key" not in config["authentication"]
    loopback = load_settings(data_root=tmp_path)
    assert not loopback.server.auth_enabled and "PREFECT_SERVER_API_AUTH_STRING" not in prefect_server_environment(loopback)
