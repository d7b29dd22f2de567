"""Configuration: precedence, parsing, and an error naming the key for every mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway import config
from gateway.config import ConfigError, load, parse_invocation
from tests.support.processes import REPO


def build(argv=(), env=None, file_text=None, tmp_path=None):
    env = dict(env or {})
    argv = list(argv)
    if file_text is not None:
        path = tmp_path / "gateway.yaml"
        path.write_text(file_text)
        argv += ["--config", str(path)]
    return load(parse_invocation(argv, env), env)


def test_defaults_need_only_an_upstream():
    cfg = build(["--upstream", "tcp://faktory"])
    assert str(cfg.listen) == "127.0.0.1:7419"
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.tls) == ("faktory", 7419, False)
    assert cfg.mode == "strict" and cfg.unknown_batch == "verify" and cfg.on_store_error == "reject"
    assert str(cfg.http.listen) == "0.0.0.0:9419"


def test_precedence_flags_over_environment_over_file(tmp_path):
    text = "upstream: tcp://from-file:1\nmode: shadow\nlimits:\n  max_connections: 5\nlog:\n  level: debug\n"
    env = {"FAKTORY_GATEWAY_MODE": "member-reopen", "FAKTORY_GATEWAY_LIMITS_MAX_CONNECTIONS": "7"}
    cfg = build(["--mode", "strict"], env, text, tmp_path)
    assert cfg.mode == "strict"  # flag
    assert cfg.limits.max_connections == 7  # environment over file
    assert cfg.log.level == "debug"  # file over default
    assert cfg.upstream.host == "from-file"


def test_human_units():
    cfg = build(["--upstream", "tcp://f"], {
        "FAKTORY_GATEWAY_LIMITS_MAX_LINE_BYTES": "64KiB",
        "FAKTORY_GATEWAY_SHUTDOWN_MAX_DELAY": "2m",
        "FAKTORY_GATEWAY_COMMIT_FENCE_TIMEOUT": "250ms",
        "FAKTORY_GATEWAY_BATCH_RETENTION": "7d",
    })  # fmt: skip
    assert cfg.limits.max_line_bytes == 65536
    assert cfg.shutdown.max_delay == 120
    assert cfg.commit_fence_timeout == 0.25
    assert cfg.batch_retention == 7 * 86400


def test_tls_upstream_and_password_is_redacted_everywhere():
    cfg = build(["--upstream", "tcp+tls://:hunter2@faktory:7000", "--redis", "redis://:pw9@r:6379/0"])
    assert cfg.upstream.tls and cfg.upstream.port == 7000
    described = str(cfg.describe())
    assert "hunter2" not in described and "pw9" not in described
    assert "tcp+tls://:***@faktory:7000" in described


def test_kubernetes_service_variables_are_not_mistaken_for_settings():
    env = {"FAKTORY_GATEWAY_PORT": "tcp://10.0.0.1:7419", "FAKTORY_GATEWAY_SERVICE_HOST": "10.0.0.1"}
    assert build(["--upstream", "tcp://f"], env).listen.port == 7419


@pytest.mark.parametrize(
    "argv, env, file_text, message",
    [
        ([], {}, None, "upstream: required"),
        (
            ["--upstream", "http://f"],
            {},
            None,
            "upstream: 'http://f' is not valid (from --upstream): scheme must be",
        ),
        (
            ["--upstream", "tcp://f", "--mode", "lenient"],
            {},
            None,
            "mode: 'lenient' is not valid (from --mode): allowed: strict, member-reopen, shadow",
        ),
        (
            ["--upstream", "tcp://f"],
            {"FAKTORY_GATEWAY_LIMITS_MAX_CONNECTIONS": "many"},
            None,
            "limits.max_connections: 'many' is not valid (from FAKTORY_GATEWAY_LIMITS_MAX_CONNECTIONS): expected a whole number",
        ),
        (
            ["--upstream", "tcp://f"],
            {"FAKTORY_GATEWAY_LIMITS_MAX_PIPELINE": "0"},
            None,
            "must be greater than zero",
        ),
        (
            ["--upstream", "tcp://f", "--listen", "7419"],
            {},
            None,
            "listen: '7419' is not valid (from --listen): expected HOST:PORT",
        ),
        (
            ["--upstream", "tcp://f"],
            {"FAKTORY_GATEWAY_SHUTDOWN_MAX_DELAY": "soon"},
            None,
            "shutdown.max_delay: 'soon' is not valid",
        ),
        (
            ["--upstream", "tcp://f"],
            {"FAKTORY_GATEWAY_HTTP_QUITQUITQUIT": "maybe"},
            None,
            "expected true or false",
        ),
        (
            ["--upstream", "tcp://f"],
            {"FAKTORY_GATEWAY_REDIS": "http://r"},
            None,
            "redis: 'http://r' is not valid",
        ),
        (
            ["--upstream", "tcp://f"],
            {},
            "limits:\n  max_conections: 5\n",
            "unknown key limits.max_conections (did you mean limits.max_connections?)",
        ),
        (["--upstream", "tcp://f"], {}, "mode: [strict\n", "not valid YAML at line"),
        (["--upstream", "tcp://f"], {}, "- a\n- b\n", "expected a mapping"),
        (
            ["--upstream", "tcp://f"],
            {},
            "tls:\n  cert_file: /x.pem\n",
            "tls: cert_file and key_file must be given together",
        ),
        (
            ["--upstream", "tcp://f"],
            {},
            "shutdown:\n  min_delay: 1m\n  max_delay: 10s\n",
            "shutdown.min_delay: must not be longer",
        ),
    ],
)
def test_every_mistake_names_the_key_and_the_problem(tmp_path, argv, env, file_text, message):
    with pytest.raises(ConfigError) as error:
        build(argv, env, file_text, tmp_path)
    assert message in str(error.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml: No such file"):
        build(["--config", str(tmp_path / "nope.yaml")])


def test_secrets_are_redacted_in_errors():
    with pytest.raises(ConfigError) as error:
        build(["--upstream", "tcp://f", "--redis", "http://:topsecret@r"])
    assert "topsecret" not in str(error.value)


def test_reload_changes_only_policy_keys(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("upstream: tcp://a:1\nmode: strict\nlisten: 127.0.0.1:1000\n")
    invocation = parse_invocation(["--config", str(path)], {})
    running = load(invocation, {})
    path.write_text("upstream: tcp://b:2\nmode: shadow\nlisten: 127.0.0.1:2000\nlimits:\n  max_pipeline: 3\n")
    reloaded = config.reload_policy(running, invocation, {})
    assert reloaded.mode == "shadow" and reloaded.limits.max_pipeline == 3
    assert reloaded.upstream == running.upstream and reloaded.listen == running.listen


def test_command_line_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: tcp://f\nmode: loose\n")
    for argv in (["--config", str(bad)], ["--config", str(bad), "--check-config"]):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *argv], capture_output=True, text=True, cwd=REPO
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"faktory-gateway: configuration error: mode: 'loose' is not valid (from {bad}): "
            "allowed: strict, member-reopen, shadow"
        ]
        assert "Traceback" not in result.stderr
    good = subprocess.run(
        [sys.executable, "-m", "gateway", "--upstream", "tcp://f", "--check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert good.returncode == 0 and "configuration OK" in good.stdout


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")))
def test_example_configs_are_valid(path):
    assert build(["--config", str(path)]).upstream is not None
