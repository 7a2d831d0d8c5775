"""Settings: embedded defaults, environment and YAML sources, clear errors naming the setting."""

import pytest

from corrflow.config.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("CORRFLOW_"):
            monkeypatch.delenv(key)


def test_embedded_defaults_live_under_data_root(tmp_path):
    s = load_settings(data_root=tmp_path)
    assert s.prefect_home == tmp_path / "prefect"
    assert s.prefect_database_url.startswith("sqlite+aiosqlite:///" + str(tmp_path))
    assert s.catalog_uri == f"sqlite:///{tmp_path / 'catalog' / 'catalog.db'}"
    assert s.beamline.mode == "sim" and s.microscope.mode == "sim"
    assert not (tmp_path / "prefect").exists(), "building settings must not touch the disk"
    s.ensure_directories()
    assert (tmp_path / "beamline").is_dir() and (tmp_path / "compute").is_dir()


def test_environment_overrides_nested_fields_and_keeps_other_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRFLOW_SIMULATION__SEED", "11")
    monkeypatch.setenv("CORRFLOW_BEAMLINE__MODE", "epics")
    monkeypatch.setenv("CORRFLOW_BEAMLINE__EPICS_PREFIX", "BL2:")
    s = load_settings(data_root=tmp_path)
    assert s.simulation.seed == 11
    assert s.beamline.epics_prefix == "BL2:" and s.beamline.name == "sim-tomo"


def test_yaml_file_is_read_and_keyword_overrides_win(tmp_path):
    cfg = tmp_path / "corrflow.yaml"
    cfg.write_text("simulation:\n  seed: 5\n  xray_pixel_size_um: 4.0\ncatalog:\n  batch_size: 10\n")
    s = load_settings(cfg, data_root=tmp_path / "d")
    assert s.simulation.seed == 5 and s.simulation.xray_pixel_size_um == 4.0 and s.catalog.batch_size == 10
    assert s.data_root == tmp_path / "d"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CORRFLOW_SIMULATION__SEEDS": "1"}, "simulation.seeds: unknown setting"),
        ({"CORRFLOW_DATAROOT": "/x"}, "dataroot: unknown setting .environment variable CORRFLOW_DATAROOT"),
        ({"CORRFLOW_CATALOG": "{bad"}, 'field "catalog"'),
        ({"CORRFLOW_BEAMLINE__PROTECTIONS__BEAM_RESUME_ABOVE_MA": "50"}, "beam_resume_above_mA .50.0. must be >="),
        ({"CORRFLOW_CATALOG__BATCH_SIZE": "0"}, "catalog.batch_size"),
        ({"CORRFLOW_PREFECT__API_URL": "localhost:4200"}, "prefect.api_url"),
        ({"CORRFLOW_BEAMLINE__MODE": "epics"}, "needs epics_prefix"),
        ({"CORRFLOW_BEAMLINE__MODE": "real"}, "beamline.mode"),
        ({"CORRFLOW_SIMULATION__XRAY_DETECTOR_SHAPE_PX": "[4, 128]"}, "xray_detector_shape_px"),
    ],
)
@pytest.mark.fault("bad settings")
def test_wrong_settings_fail_with_the_setting_named(tmp_path, monkeypatch, env, named):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=named.replace("[", r"\[")):
        load_settings(data_root=tmp_path)


def test_bad_yaml_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SettingsError, match="must hold a mapping"):
        load_settings(bad)


def test_data_root_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SettingsError, match="data_root"):
        load_settings(data_root=f)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("127.attacker.example", False), ("10.1.2.3", False), ("beamline.example.org", False)],
)
def test_loopback_is_decided_on_the_address_not_the_spelling(host, loopback):
    from corrflow.config.settings import is_loopback_host

    assert is_loopback_host(host) is loopback


@pytest.mark.fault("bad settings")
def test_a_settings_error_never_prints_a_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRFLOW_SERVER__HOST", "0.0.0.0")
    monkeypatch.setenv("CORRFLOW_SERVER__TIled_ADMIN_PASSWORD".upper(), "hunter2-admin")
    monkeypatch.setenv("CORRFLOW_SERVER__PREFECT_AUTH_STRING", "no-colon-secret")
    monkeypatch.setenv("CORRFLOW_SERVER__POSTGRES_URL", "postgresql+asyncpg://corrflow:pg-s3cret@db:5432/x")
    with pytest.raises(SettingsError) as info:
        load_settings(data_root=tmp_path)
    text = str(info.value)
    assert "server" in text
    for secret in ("hunter2-admin", "no-colon-secret", "pg-s3cret"):
        assert secret not in text
