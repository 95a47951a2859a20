"""deploy/compose.yaml cannot rot silently: no Docker here to run `docker compose config`,
so this reads it as YAML and checks what links its parts (fast, no servers).

Every `python app.py ...` command in it must parse with app.py's own argparse (a renamed
or removed option fails here, not at a team's first `up`); every --vllm-url names a vLLM
service of the file and every vLLM service is named by every app; the load balancer lists
exactly the app services; vLLM's LoRA rank and context match the app's limits; only the
load balancer publishes a port, on loopback unless told otherwise; and no password or key
is written in the file or the database URL.
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

import app
from assistant.config import ServeConfig
from assistant.limits import MAX_LORA_RANK

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# Compose's interpolation: ${NAME}, ${NAME:-default}, ${NAME:?error}.
VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    def value(m):
        name, kind, rest = m.groups()
        if name in env:
            return env[name]
        if kind == "-":
            return rest
        raise KeyError(f"${{{name}}} has no default and is not set")

    return VARIABLE.sub(value, text)


SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "VLLM_API_KEY": "vllm-secret", "ADMIN_PASSWORD": "admin-secret"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text(), SECRETS))


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def app_commands(compose) -> dict[str, list[str]]:
    return {name: command(s)[2:] for name, s in compose["services"].items()
            if "command" in s and command(s)[:2] == ["python", "app.py"]}


def test_every_secret_is_required_from_the_environment_and_none_is_written_here():
    text = (DEPLOY / "compose.yaml").read_text()
    with pytest.raises(KeyError):  # a missing secret stops compose instead of a default
        interpolate(text, {k: v for k, v in SECRETS.items() if k != "POSTGRES_PASSWORD"})
    for name in SECRETS:
        assert f"${{{name}:?" in text
    assert not re.search(r"postgresql://[^@\s]*:[^@\s]*@", text), "a password in a database URL"
    assert "--vllm-api-key" not in text  # the key travels in the environment, not on a command line
    assert "deploy/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_every_app_command_is_accepted_by_app_py(compose):
    commands = app_commands(compose)
    assert {"app-1", "app-2", "trainer"} <= set(commands)
    for name, argv in commands.items():
        a = app.parser().parse_args(argv)  # SystemExit (exit 2) on an unknown option
        assert a.database == "postgresql://assistant@postgres:5432/assistant", name
        assert str(a.data_dir) == "/data", name
        if a.command == "serve":
            config = app.serve_config(a)
            assert config.host == "0.0.0.0" and config.vllm_urls, name


def test_every_option_is_spelled_in_full(compose):
    """argparse takes a prefix of an option (``--vllm-urls`` for ``--vllm-urls-file``): an
    option renamed later could keep parsing as some other one's abbreviation."""
    import argparse

    top = app.parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, argv in app_commands(compose).items():
        command = top.parse_args(argv).command
        known = set(top._option_string_actions) | set(sub[command]._option_string_actions)
        assert [o for o in argv if o.startswith("--") and o not in known] == [], name


def test_a_renamed_option_would_fail_here():
    with pytest.raises(SystemExit):
        app.parser().parse_args(["serve", "--vllm-server", "http://vllm-1:8000"])


def test_the_services_are_linked_by_the_names_they_use(compose):
    services = compose["services"]
    vllm = {name for name, s in services.items() if "command" in s and "assistant.vllm_launch" in command(s)}
    apps = {name for name, argv in app_commands(compose).items() if app.parser().parse_args(argv).command == "serve"}
    assert len(vllm) >= 2 and len(apps) >= 2
    for name in apps:
        a = app.parser().parse_args(app_commands(compose)[name])
        assert {re.match(r"http://([\w-]+):8000$", u).group(1) for u in app.vllm_urls(a)} == vllm, name
        assert "postgres" in services[name]["depends_on"] and vllm <= set(services[name]["depends_on"])
    upstream = re.findall(r"^\s*server ([\w-]+):7860\b", (DEPLOY / "nginx.conf").read_text(), re.M)
    assert sorted(upstream) == sorted(apps)
    # Adapters are loaded by the path the app gives: vLLM sees the data volume where the apps do.
    for name in vllm | apps | {"trainer"}:
        assert "data:/data" in " ".join(services[name]["volumes"]), name


def test_vllm_is_started_within_the_apps_limits(compose):
    for name, s in compose["services"].items():
        argv = command(s) if "command" in s else []
        if "assistant.vllm_launch" not in argv:
            continue
        option = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
        assert int(option("--max-lora-rank")) == MAX_LORA_RANK, name
        assert int(option("--max-model-len")) >= ServeConfig().context_tokens, name
        assert int(option("--max-loras")) >= ServeConfig().max_loras, name
        assert "--enable-lora" in argv and s["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert s["environment"]["VLLM_API_KEY"] == SECRETS["VLLM_API_KEY"]


def test_only_the_load_balancer_publishes_a_port_and_on_loopback_by_default(compose):
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert list(published) == ["lb"]
    assert published["lb"] == ["127.0.0.1:8080:8080"]


def test_the_image_is_built_from_the_dockerfile_in_deploy(compose):
    build = compose["services"]["app-1"]["build"]
    # The context is relative to the compose file, the Dockerfile to the context.
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    text = (DEPLOY / "Dockerfile").read_text()
    model = compose["services"]["app-1"]["command"]
    assert "/opt/models/SmolLM2-135M-Instruct" in model and "prepare_embedded_model(Path('/opt/models'))" in text
