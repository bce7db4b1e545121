"""The hub's configuration: the example file loads, overrides apply, mistakes name the key."""

from pathlib import Path

import pytest

from agent.settings import ConfigError
from sync.hub.settings import load_hub_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "hub.example.toml"


def test_example_config_loads_with_its_stores():
    config = load_hub_config(EXAMPLE, environ={})
    assert [(s.id, s.region) for s in config.stores] == [("store-0042", "north"), ("store-0043", "north")]
    assert config.storage.synchronous == "FULL" and config.mqtt.topic_prefix == "retail"


def test_environment_overrides_a_key():
    config = load_hub_config(EXAMPLE, environ={"EDGE_HUB__MQTT__PORT": "1884"})
    assert config.mqtt.port == 1884


def test_snapshot_refresh_interval_is_configurable():
    assert load_hub_config(EXAMPLE, environ={}).availability.refresh_s == 60
    config = load_hub_config(EXAMPLE, environ={"EDGE_HUB__AVAILABILITY__REFRESH_S": "10"})
    assert config.availability.refresh_s == 10
    with pytest.raises(ConfigError, match="availability.refresh_s"):
        load_hub_config(EXAMPLE, environ={"EDGE_HUB__AVAILABILITY__REFRESH_S": "0"})


def test_unknown_key_and_missing_stores_and_duplicates_are_errors(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('[hub]\nid = "h"\ncolour = "red"\n[[stores]]\nid = "s1"\n')
    with pytest.raises(ConfigError, match="unknown key hub.colour"):
        load_hub_config(path, environ={})
    path.write_text('[hub]\nid = "h"\n')
    with pytest.raises(ConfigError, match="stores"):
        load_hub_config(path, environ={})
    path.write_text('[[stores]]\nid = "s1"\n[[stores]]\nid = "s1"\n')
    with pytest.raises(ConfigError, match="listed twice"):
        load_hub_config(path, environ={})


def test_ingest_window_and_rejection_keys_have_defaults_and_overrides(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('[ingest]\nmax_ahead = 50\n[[stores]]\nid = "s1"\n')
    config = load_hub_config(path, environ={"EDGE_HUB__INGEST__REJECTIONS_KEPT": "7"})
    assert (config.ingest.max_ahead, config.ingest.rejections_kept, config.ingest.refusal_log_interval_s) == (50, 7, 60)
    path.write_text('[ingest]\nmax_ahead = 0\n[[stores]]\nid = "s1"\n')
    with pytest.raises(ConfigError, match="max_ahead"):
        load_hub_config(path, environ={})
