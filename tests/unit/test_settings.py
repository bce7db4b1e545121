"""Config loading: defaults, environment overrides, errors naming key and file."""

import pytest

from agent.settings import AgentConfig, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract(tmp_path):
    cfg = load_config(write(tmp_path, '[store]\nid = "store-0042"\n'), AgentConfig, "EDGE_AGENT", {})
    assert cfg.storage.path == "/var/lib/edge-agent/events.db"
    assert (cfg.api.host, cfg.api.port, cfg.api.write_token) == ("127.0.0.1", 8080, "")
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.topic_prefix, cfg.mqtt.protocol) == ("127.0.0.1", 1883, "retail", 5)
    assert (cfg.sync.batch_max_events, cfg.sync.ack_timeout_s) == (500, 10)


def test_environment_overrides_any_key(tmp_path):
    path = write(tmp_path, '[store]\nid = "store-0042"\n')
    cfg = load_config(path, AgentConfig, "EDGE_AGENT",
                      {"EDGE_AGENT__MQTT__PORT": "1884", "EDGE_AGENT__STORE__ID": "store-7",
                       "EDGE_AGENT__SYNC__ENABLED": "false", "EDGE_AGENT__API__HOST": "0.0.0.0"})
    assert (cfg.mqtt.port, cfg.store.id, cfg.sync.enabled, cfg.api.host) == (1884, "store-7", False, "0.0.0.0")


@pytest.mark.parametrize("text, env, message", [
    ('[store]\nid = "s"\n[mqtt]\nprot = 5\n', {}, "unknown key mqtt.prot"),
    ('[store]\nid = "s"\n[mqtt]\nport = "x"\n', {}, "mqtt.port"),
    ('[storage]\npath = "/x"\n', {}, "missing key store"),
    ('[store]\nid = "bad id"\n', {}, "store.id"),
    ('[store]\nid = "s"\n', {"EDGE_AGENT__MQTT__PORT": "not-a-port"}, "mqtt.port"),
    ('[store]\nid = "s"\n', {"EDGE_AGENT__NOPE__KEY": "1"}, "unknown key nope"),
    ('[store\n', {}, "not valid TOML"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, env, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, AgentConfig, "EDGE_AGENT", env)
    assert message in str(info.value) and str(path) in str(info.value)


def test_non_loopback_api_without_token_refuses_to_start(tmp_path):
    cfg = load_config(write(tmp_path, '[store]\nid = "s"\n[api]\nhost = "0.0.0.0"\n'), AgentConfig, "EDGE_AGENT", {})
    with pytest.raises(ConfigError, match="write_token"):
        cfg.check_exposure()
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    cfg = load_config(write(tmp_path, f'[store]\nid = "s"\n[api]\nhost = "0.0.0.0"\nwrite_token_file = "{secret}"\n'),
                      AgentConfig, "EDGE_AGENT", {})
    cfg.check_exposure()
    assert cfg.write_token() == "s3cret"
