"""Config loading: defaults < TOML file < MIRROR_* env < CLI overrides, every bad key at once."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mirror.config import (
    DEFAULT_REGISTRIES,
    CacheConfig,
    ClusterConfig,
    Config,
    ConfigError,
    RegistryConfig,
    S3Config,
    ServerConfig,
    UpstreamConfig,
    WarmConfig,
    describe,
    env_id,
    load_config,
)
from mirror.config.values import (
    parse_duration,
    parse_hosts_or_networks,
    parse_listen,
    parse_size,
)

PROJECT = Path(__file__).resolve().parents[2]


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return path


def _problems(environ: dict[str, str], path: Path | None = None,
              overrides: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(environ, path, overrides)
    return info.value.problems


# ---------------------------------------------------------------- scalar parsers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1048576, 1048576),
        ("0", 0),
        ("100", 100),
        ("100b", 100),
        ("512MiB", 512 * 1024**2),
        ("512mib", 512 * 1024**2),
        ("100GB", 100 * 1000**3),
        ("100G", 100 * 1000**3),
        ("1.5KiB", 1536),
        (" 10 kb ", 10_000),
        ("2TiB", 2 * 1024**4),
        ("1tb", 1000**4),
        ("64k", 64_000),
    ],
)
def test_parse_size(value: Any, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value", [-1, True, "", "-5MB", "MiB", "5 PB", "5 MiBs", "five", "1e6", "0x10", None]
)
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
        ("7D", 604800.0),
        (" 2 h ", 7200.0),
    ],
)
def test_parse_duration(value: Any, expected: float) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value", [-1, -0.5, float("nan"), True, "", "m", "5 minutes", "5w", "-5m", "1h30m", None]
)
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:5000", ("0.0.0.0", 5000)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        (":5000", ("0.0.0.0", 5000)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::]:443", ("::", 443)),
        ("mirror.internal:65535", ("mirror.internal", 65535)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    "value", ["5000", "host", "host:", "host:http", "host:65536", "host:-1", "[::1]", ""]
)
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


_net = ipaddress.ip_network


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], ()),
        ("", ()),
        (["cdn.Example.com."], ("cdn.example.com",)),
        ("10.0.0.0/8, fd00::/8", (_net("10.0.0.0/8"), _net("fd00::/8"))),
        (["[::1]", "10.1.2.3/8"], (_net("::1/128"), _net("10.0.0.0/8"))),
        (["localhost"], ("localhost",)),
    ],
)  # fmt: skip
def test_parse_hosts_or_networks(value: Any, expected: tuple[Any, ...]) -> None:
    assert parse_hosts_or_networks(value) == expected


@pytest.mark.parametrize(
    "value", ["http://cdn", "cdn:443", "a_b.example", "-cdn", "127.1", "2130706433", "10.0.0.0/33"]
)
def test_parse_hosts_or_networks_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hosts_or_networks(value)


def test_parse_listen_rejects_bare_ipv6() -> None:
    with pytest.raises(ValueError):
        parse_listen("::1")


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ("docker.io", "DOCKER_IO"),
        ("registry.k8s.io", "REGISTRY_K8S_IO"),
        ("public.ecr.aws", "PUBLIC_ECR_AWS"),
        ("127.0.0.1:5000", "127_0_0_1_5000"),
        ("my-registry.example.com", "MY_REGISTRY_EXAMPLE_COM"),
    ],
)
def test_env_id(registry: str, expected: str) -> None:
    assert env_id(registry) == expected


# ---------------------------------------------------------------- sources and precedence


def test_defaults() -> None:
    config = load_config({})
    assert config == Config()
    assert config.server == ServerConfig()
    assert (config.server.host, config.server.port) == ("0.0.0.0", 5000)
    assert config.default_registry == "docker.io"
    assert dict(config.registries) == {
        n: RegistryConfig(n, u) for n, u in DEFAULT_REGISTRIES.items()
    }


def test_unrelated_environment_is_ignored() -> None:
    assert load_config({"HOME": "/root", "MIRRORS": "x", "PATH": "/bin"}) == Config()


def test_toml_file(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
default_registry = "ghcr.io"

[server]
listen = "127.0.0.1:6000"
admin_token = "t0k"
access_log = false

[cache]
dir = "/srv/cache"
max_size = "100GB"
high_watermark = 0.95
low_watermark = 0.5
tag_ttl = "5m"
max_stale = "7d"
revalidate_timeout = 1.5

[upstream]
connect_timeout = 2
retries = 0
ranged_threshold = "64MiB"
ranged_streams = 4
chunk_size = "8MiB"
breaker_failures = 2
breaker_cooldown = "1m"

[warm]
platforms = ["linux/amd64", "linux/arm64/v8"]
concurrency = 2
""",
    )
    config = load_config({}, path)
    assert config.server == ServerConfig("127.0.0.1", 6000, "t0k", False)
    assert config.cache == CacheConfig(
        directory=Path("/srv/cache"), max_size=100 * 1000**3, high_watermark=0.95,
        low_watermark=0.5, tag_ttl=300.0, max_stale=604800.0, revalidate_timeout=1.5,
    )  # fmt: skip
    assert config.upstream == UpstreamConfig(
        connect_timeout=2.0, retries=0, ranged_threshold=64 * 1024**2, ranged_streams=4,
        chunk_size=8 * 1024**2, breaker_failures=2, breaker_cooldown=60.0,
    )  # fmt: skip
    assert config.warm == WarmConfig(("linux/amd64", "linux/arm64/v8"), 2)
    assert config.default_registry == "ghcr.io"
    assert set(config.registries) == set(DEFAULT_REGISTRIES)  # no [registries]: defaults


@pytest.mark.parametrize(
    ("environ", "section", "attr", "expected"),
    [
        ({"MIRROR_SERVER_LISTEN": "127.0.0.1:7000"}, "server", "port", 7000),
        ({"MIRROR_SERVER_LISTEN": "127.0.0.1:7000"}, "server", "host", "127.0.0.1"),
        ({"MIRROR_SERVER_ADMIN_TOKEN": "abc"}, "server", "admin_token", "abc"),
        ({"MIRROR_SERVER_ADMIN_LISTEN": "[::1]:6060"}, "server", "admin_host", "::1"),
        ({"MIRROR_SERVER_ADMIN_LISTEN": "[::1]:6060"}, "server", "admin_port", 6060),
        ({"MIRROR_SERVER_HEADER_TIMEOUT": "2.5s"}, "server", "header_timeout", 2.5),
        ({"MIRROR_SERVER_MAX_CONNECTIONS": "500"}, "server", "max_connections", 500),
        ({"MIRROR_SERVER_ACCESS_LOG": "off"}, "server", "access_log", False),
        ({"MIRROR_SERVER_ACCESS_LOG": "YES"}, "server", "access_log", True),
        ({"MIRROR_SERVER_SENDFILE_THREADS": "8"}, "server", "sendfile_threads", 8),
        ({"MIRROR_CACHE_DIR": "/data"}, "cache", "directory", Path("/data")),
        ({"MIRROR_CACHE_MAX_SIZE": "512MiB"}, "cache", "max_size", 512 * 1024**2),
        ({"MIRROR_CACHE_MAX_SIZE": "100GB"}, "cache", "max_size", 100 * 1000**3),
        ({"MIRROR_CACHE_TAG_TTL": "5m"}, "cache", "tag_ttl", 300.0),
        ({"MIRROR_CACHE_MAX_STALE": "7d"}, "cache", "max_stale", 604800.0),
        ({"MIRROR_CACHE_LOW_WATERMARK": "0.1"}, "cache", "low_watermark", 0.1),
        ({"MIRROR_UPSTREAM_RETRIES": "0"}, "upstream", "retries", 0),
        ({"MIRROR_UPSTREAM_READ_TIMEOUT": "500ms"}, "upstream", "read_timeout", 0.5),
        ({"MIRROR_UPSTREAM_BREAKER_FAILURES": "9"}, "upstream", "breaker_failures", 9),
        ({"MIRROR_UPSTREAM_REDIRECT_ALLOW": "S3.local, 127.0.0.1"}, "upstream",
         "redirect_allow", ("s3.local", ipaddress.ip_network("127.0.0.1/32"))),
        ({"MIRROR_WARM_PLATFORMS": "linux/amd64, linux/arm/v7,"}, "warm", "platforms",
         ("linux/amd64", "linux/arm/v7")),
        ({"MIRROR_WARM_CONCURRENCY": "16"}, "warm", "concurrency", 16),
        ({"MIRROR_CONFIG": "/ignored/here.toml"}, "warm", "concurrency", 4),
    ],
)  # fmt: skip
def test_env_overrides(environ: dict[str, str], section: str, attr: str, expected: Any) -> None:
    assert getattr(getattr(load_config(environ), section), attr) == expected


def test_env_default_registry() -> None:
    assert load_config({"MIRROR_DEFAULT_REGISTRY": "quay.io"}).default_registry == "quay.io"


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[server]
listen = "0.0.0.0:1111"
[cache]
dir = "/from/file"
max_size = "1GB"
tag_ttl = "1m"
""",
    )
    environ = {"MIRROR_SERVER_LISTEN": "0.0.0.0:2222", "MIRROR_CACHE_DIR": "/from/env"}
    overrides = {"server.listen": "0.0.0.0:3333", "cache.dir": None}  # None: flag not given
    config = load_config(environ, path, overrides)
    assert config.server.port == 3333  # flag > env > file
    assert config.cache.directory == Path("/from/env")  # env > file
    assert config.cache.max_size == 1000**3  # file > default
    assert config.cache.tag_ttl == 60.0
    assert config.cache.low_watermark == CacheConfig().low_watermark  # default


def test_registries_table_replaces_the_defaults(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
default_registry = "registry.internal:5000"
[registries."registry.internal:5000"]
url = "http://registry.internal:5000/"
[registries."docker.io"]
url = "https://eu-mirror.example.com"
mirror = true
username = "bot"
password = "from-file"
""",
    )
    config = load_config({}, path)
    assert dict(config.registries) == {
        "registry.internal:5000": RegistryConfig(
            "registry.internal:5000", "http://registry.internal:5000"
        ),
        "docker.io": RegistryConfig(
            "docker.io", "https://eu-mirror.example.com", "bot", "from-file", is_mirror=True
        ),
    }
    assert config.default_registry == "registry.internal:5000"


def test_registry_credentials_from_env() -> None:
    config = load_config({
        "MIRROR_REGISTRY_DOCKER_IO_USERNAME": "hubuser",
        "MIRROR_REGISTRY_DOCKER_IO_PASSWORD": "hub-secret",
        "MIRROR_REGISTRY_GHCR_IO_PASSWORD": "ghp_token",
        "MIRROR_REGISTRY_QUAY_IO_URL": "https://quay.example.com",
    })  # fmt: skip
    hub = config.registries["docker.io"]
    assert (hub.username, hub.password, hub.url) == (
        "hubuser", "hub-secret", DEFAULT_REGISTRIES["docker.io"]
    )  # fmt: skip
    assert config.registries["ghcr.io"].password == "ghp_token"
    assert config.registries["quay.io"].url == "https://quay.example.com"
    assert config.registries["registry.k8s.io"].username is None


def test_registry_env_overrides_file_credentials(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[registries."127.0.0.1:5000"]
url = "http://127.0.0.1:5000"
username = "file-user"
password = "file-pass"
""",
    )
    config = load_config(
        {"MIRROR_REGISTRY_127_0_0_1_5000_PASSWORD": "env-pass", "MIRROR_DEFAULT_REGISTRY":
         "127.0.0.1:5000"}, path,
    )  # fmt: skip
    registry = config.registries["127.0.0.1:5000"]
    assert (registry.username, registry.password) == ("file-user", "env-pass")


def test_passwords_stay_out_of_repr() -> None:
    config = load_config({
        "MIRROR_REGISTRY_DOCKER_IO_PASSWORD": "hub-secret-123",
        "MIRROR_SERVER_ADMIN_TOKEN": "admin-token-456",
    })  # fmt: skip
    text = repr(config)
    assert "hub-secret-123" not in text
    assert "admin-token-456" not in text


# ---------------------------------------------------------------- every bad key, at once


@pytest.mark.parametrize(
    ("environ", "origin"),
    [
        ({"MIRROR_CACHE_MAX_SIZE": "lots"}, "$MIRROR_CACHE_MAX_SIZE"),
        ({"MIRROR_CACHE_TAG_TTL": "5 minutes"}, "$MIRROR_CACHE_TAG_TTL"),
        ({"MIRROR_CACHE_HIGH_WATERMARK": "1.5"}, "$MIRROR_CACHE_HIGH_WATERMARK"),
        ({"MIRROR_CACHE_LOW_WATERMARK": "0"}, "$MIRROR_CACHE_LOW_WATERMARK"),
        ({"MIRROR_CACHE_HIGH_WATERMARK": "abc"}, "$MIRROR_CACHE_HIGH_WATERMARK"),
        ({"MIRROR_CACHE_LOW_WATERMARK": "0.95"}, "cache.low_watermark"),  # above high
        ({"MIRROR_SERVER_LISTEN": "nope"}, "$MIRROR_SERVER_LISTEN"),
        ({"MIRROR_SERVER_ACCESS_LOG": "maybe"}, "$MIRROR_SERVER_ACCESS_LOG"),
        ({"MIRROR_SERVER_PORT": "80"}, "$MIRROR_SERVER_PORT"),  # not a setting: listen is
        ({"MIRROR_UPSTREAM_RETRIES": "-1"}, "$MIRROR_UPSTREAM_RETRIES"),
        ({"MIRROR_UPSTREAM_RANGED_STREAMS": "0"}, "$MIRROR_UPSTREAM_RANGED_STREAMS"),
        ({"MIRROR_UPSTREAM_BREAKER_FAILURES": "1.5"}, "$MIRROR_UPSTREAM_BREAKER_FAILURES"),
        ({"MIRROR_UPSTREAM_CHUNK_SIZE": "1KiB"}, "upstream.chunk_size"),  # below 64KiB
        ({"MIRROR_UPSTREAM_REDIRECT_ALLOW": "http://cdn"}, "$MIRROR_UPSTREAM_REDIRECT_ALLOW"),
        ({"MIRROR_WARM_PLATFORMS": "amd64"}, "$MIRROR_WARM_PLATFORMS"),
        ({"MIRROR_WARM_PLATFORMS": " , "}, "$MIRROR_WARM_PLATFORMS"),
        ({"MIRROR_WARM_CONCURRENCY": "0"}, "$MIRROR_WARM_CONCURRENCY"),
        ({"MIRROR_TYPO": "1"}, "$MIRROR_TYPO"),
        ({"MIRROR_CACHE_SIZE": "1GB"}, "$MIRROR_CACHE_SIZE"),
        ({"MIRROR_DEFAULT_REGISTRY": "evil.example.com"}, "default_registry"),
        ({"MIRROR_REGISTRY_NOPE_IO_PASSWORD": "x"}, "$MIRROR_REGISTRY_NOPE_IO_PASSWORD"),
        ({"MIRROR_REGISTRY_DOCKER_IO_TOKEN": "x"}, "$MIRROR_REGISTRY_DOCKER_IO_TOKEN"),
        ({"MIRROR_SERVER_ADMIN_TOKEN": ""}, "$MIRROR_SERVER_ADMIN_TOKEN"),  # is not "no token"
        ({"MIRROR_SERVER_ADMIN_TOKEN": "  "}, "$MIRROR_SERVER_ADMIN_TOKEN"),
        ({"MIRROR_SERVER_ADMIN_LISTEN": "0.0.0.0:5050"}, "server.admin_listen"),  # no token
        ({"MIRROR_SERVER_ADMIN_LISTEN": "[::]:5050"}, "server.admin_listen"),
        ({"MIRROR_SERVER_ADMIN_LISTEN": "10.0.0.7:5050"}, "server.admin_listen"),
        ({"MIRROR_SERVER_ADMIN_LISTEN": "mirror.local:5050"}, "server.admin_listen"),
        ({"MIRROR_SERVER_ADMIN_LISTEN": "127.0.0.1:5000"}, "server.admin_listen"),  # listen's
        ({"MIRROR_SERVER_ADMIN_LISTEN": "5050"}, "$MIRROR_SERVER_ADMIN_LISTEN"),
        ({"MIRROR_SERVER_HEADER_TIMEOUT": "0"}, "$MIRROR_SERVER_HEADER_TIMEOUT"),
        ({"MIRROR_SERVER_MAX_CONNECTIONS": "0"}, "$MIRROR_SERVER_MAX_CONNECTIONS"),
    ],
)
def test_bad_env_value_is_named(environ: dict[str, str], origin: str) -> None:
    problems = _problems(environ)
    assert len(problems) == 1
    assert problems[0].startswith(origin)


@pytest.mark.parametrize(
    "environ",
    [
        {},  # the default: 127.0.0.1:5050, no token
        {"MIRROR_SERVER_ADMIN_LISTEN": "[::1]:5050"},
        {"MIRROR_SERVER_ADMIN_LISTEN": "127.0.0.2:5050"},
        {"MIRROR_SERVER_ADMIN_LISTEN": "localhost:5050"},
        {"MIRROR_SERVER_ADMIN_LISTEN": "0.0.0.0:5050", "MIRROR_SERVER_ADMIN_TOKEN": "s3cret"},
        {"MIRROR_SERVER_LISTEN": "10.0.0.7:5000", "MIRROR_SERVER_ADMIN_LISTEN": "127.0.0.1:5000"},
    ],
)
def test_the_admin_listener_is_loopback_or_behind_a_token(environ: dict[str, str]) -> None:
    server = load_config(environ).server
    assert server.admin_token or server.admin_host in ("127.0.0.1", "::1", "127.0.0.2", "localhost")


def test_the_admin_listener_defaults_to_loopback_on_its_own_port() -> None:
    server = load_config({}).server
    assert (server.admin_host, server.admin_port) == ("127.0.0.1", 5050)
    assert (server.host, server.port) == ("0.0.0.0", 5000)
    assert server.admin_token is None


def test_every_bad_key_is_reported_together(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
colour = "blue"
default_registry = "nowhere.example"

[server]
listen = "no-port"
access_log = "sometimes"
admin_tokn = "typo"
sendfile_threads = 0

[cache]
max_size = "a lot"
tag_ttl = "-5m"

[upstream]
retries = "many"

[warm]
platforms = ["linux"]

[registries."ghcr.io"]
url = "ftp://ghcr.io"
[registries."quay.io"]
url = "https://quay.io"
mirror = "perhaps"
token = "x"
[registries."bad.example"]
oops = 1
[registries."GHCR.io"]
url = "https://ghcr.io"
""",
    )
    environ = {"MIRROR_WARM_CONCURRENCY": "none", "MIRROR_REGISTRY_GITLAB_COM_PASSWORD": "x"}
    overrides = {"server.listen": "still-no-port"}
    problems = _problems(environ, path, overrides)
    text = "\n".join(problems)
    for fragment in [
        "unknown key 'colour'",
        "--listen",  # the flag won over the file's listen, and is named as the origin
        "server.access_log",
        "server.admin_tokn: unknown setting",
        "server.sendfile_threads",
        "cache.max_size",
        "cache.tag_ttl",
        "upstream.retries",
        "warm.platforms",
        "$MIRROR_WARM_CONCURRENCY",
        "registries.'ghcr.io'.url",
        "registries.'quay.io': unknown keys ['token']",
        "registries.'quay.io'.mirror",
        "registries.'bad.example'.url",
        "registries.'GHCR.io': a registry is named by its lowercase host[:port]",
        "$MIRROR_REGISTRY_GITLAB_COM_PASSWORD",
        "default_registry: 'nowhere.example'",
    ]:
        assert fragment in text, fragment
    assert len(problems) == 18
    assert str(ConfigError(problems)).count("\n") == len(problems)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server\nlisten = 1", "not valid TOML"),
        ('server = "0.0.0.0:5000"', "server must be a table"),
        ('registries = "docker.io"', "registries must be a table"),
        ('[registries]\n"docker.io" = "https://x"', "must be a table with at least url"),
        ("[registries]", "default_registry: 'docker.io' is not among"),  # empty set
    ],
)
def test_bad_file_shapes(tmp_path: Path, text: str, message: str) -> None:
    problems = _problems({}, _toml(tmp_path, text))
    assert any(message in p for p in problems), problems


def test_unreadable_file(tmp_path: Path) -> None:
    problems = _problems({}, tmp_path / "missing.toml")
    assert problems == [f"{tmp_path / 'missing.toml'}: cannot read (No such file or directory)"]


def test_unknown_override_is_named() -> None:
    assert _problems({}, None, {"cache.size": "1GB"}) == ["cache.size: unknown setting"]


def test_log_level_env_is_not_a_config_error() -> None:
    assert load_config({"MIRROR_LOG_LEVEL": "debug"}) == Config()


@pytest.mark.parametrize("url", ["not-a-url", "ftp://x", ""])
def test_registry_url_from_env_is_validated(url: str) -> None:
    problems = _problems({"MIRROR_REGISTRY_DOCKER_IO_URL": url})
    assert problems[0].startswith("$MIRROR_REGISTRY_DOCKER_IO_URL")


@pytest.mark.parametrize(
    "url", ["https://user:hunter2@x.io", "https://user:hunter2@x.io/v2", "http://:hunter2@x.io"]
)
def test_a_refused_env_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"MIRROR_REGISTRY_DOCKER_IO_URL": url})
    message = str(caught.value)
    assert "$MIRROR_REGISTRY_DOCKER_IO_URL: expected http(s)://host[:port]" in message
    assert "hunter2" not in message and "<a url with user info>" in message


# ---------------------------------------------------------------- Amazon ECR registries

ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
ECR_ID = env_id(ECR)


def _ecr_file(tmp_path: Path, extra: str = "") -> Path:
    return _toml(
        tmp_path,
        f"""
default_registry = "{ECR}"
[registries."{ECR}"]
url = "https://{ECR}"
{extra}
""",
    )


@pytest.mark.parametrize(
    ("extra", "environ", "region", "endpoint"),
    [
        ('aws_region = "eu-west-1"', {}, "eu-west-1", None),
        ('aws_region = "us-gov-west-1"', {}, "us-gov-west-1", None),
        ('aws_region = "cn-north-1"', {}, "cn-north-1", None),
        (
            'aws_region = "eu-west-1"\naws_endpoint_url = "https://vpce-1.ecr.eu-west-1.vpce.'
            'amazonaws.com/"',
            {},
            "eu-west-1",
            "https://vpce-1.ecr.eu-west-1.vpce.amazonaws.com",
        ),
        ("", {f"MIRROR_REGISTRY_{ECR_ID}_AWS_REGION": "eu-west-1"}, "eu-west-1", None),
        (
            'aws_region = "eu-west-1"',
            {f"MIRROR_REGISTRY_{ECR_ID}_AWS_ENDPOINT_URL": "http://127.0.0.1:5123"},
            "eu-west-1",
            "http://127.0.0.1:5123",
        ),
        (  # the environment wins over the file, as for every registry key
            'aws_region = "eu-west-1"',
            {f"MIRROR_REGISTRY_{ECR_ID}_AWS_REGION": "eu-central-1"},
            "eu-central-1",
            None,
        ),
        ("", {}, None, None),  # no region: an ordinary registry, no AWS at all
    ],
)
def test_ecr_keys(
    tmp_path: Path, extra: str, environ: dict[str, str], region: str | None, endpoint: str | None
) -> None:
    registry = load_config(environ, _ecr_file(tmp_path, extra)).registries[ECR]
    assert (registry.aws_region, registry.aws_endpoint_url) == (region, endpoint)
    assert registry.uses_ecr is (region is not None)
    assert registry.url == f"https://{ECR}"  # _AWS_ENDPOINT_URL is not taken for _URL


@pytest.mark.parametrize(
    ("extra", "environ", "fragments"),
    [
        ('aws_region = "eu-west"', {}, [f"registries.'{ECR}'.aws_region"]),
        ('aws_region = "EU-WEST-1"', {}, [f"registries.'{ECR}'.aws_region"]),
        ("aws_region = 1", {}, [f"registries.'{ECR}'.aws_region"]),
        (
            'aws_region = "eu-west-1"\naws_endpoint_url = "vpce.example"',
            {},
            [f"registries.'{ECR}'.aws_endpoint_url"],
        ),
        (  # user info in the endpoint is refused, and not repeated in the message
            'aws_region = "eu-west-1"\naws_endpoint_url = "https://AKIA:secret@vpce.example"',
            {},
            [f"registries.'{ECR}'.aws_endpoint_url: expected http(s)://host[:port], got <a url"],
        ),
        (  # every bad key of one entry, together
            'url = "nope"\naws_region = "mars-1"\naws_endpoint_url = 5\nmirror = "maybe"\n'
            "aws_profile = 'x'",
            {},
            [
                f"registries.'{ECR}': unknown keys ['aws_profile']",
                f"registries.'{ECR}'.url",
                f"registries.'{ECR}'.aws_region",
                f"registries.'{ECR}'.aws_endpoint_url",
                f"registries.'{ECR}'.mirror",
            ],
        ),
        (
            'aws_region = "eu-west-1"',
            {f"MIRROR_REGISTRY_{ECR_ID}_AWS_REGION": "nowhere"},
            [f"$MIRROR_REGISTRY_{ECR_ID}_AWS_REGION: expected an AWS region"],
        ),
        (
            'aws_region = "eu-west-1"',
            {f"MIRROR_REGISTRY_{ECR_ID}_AWS_ENDPOINT_URL": "localhost:4566"},
            [f"$MIRROR_REGISTRY_{ECR_ID}_AWS_ENDPOINT_URL: expected http(s)://"],
        ),
        (  # an endpoint alone would be silently ignored: say so instead
            'aws_endpoint_url = "http://127.0.0.1:5123"',
            {},
            [f"registries.'{ECR}'.aws_endpoint_url: needs aws_region"],
        ),
    ],
)
def test_bad_ecr_keys_are_named(
    tmp_path: Path, extra: str, environ: dict[str, str], fragments: list[str]
) -> None:
    text = extra if extra.startswith("url") else f'url = "https://{ECR}"\n{extra}'
    hub = '[registries."docker.io"]\nurl = "https://registry-1.docker.io"\n'
    path = _toml(tmp_path, f'default_registry = "docker.io"\n[registries."{ECR}"]\n{text}\n{hub}')
    problems = _problems(environ, path)
    assert len(problems) == len(fragments), problems
    for fragment in fragments:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert "secret" not in "\n".join(problems)


@pytest.mark.parametrize(
    ("extra", "environ"),
    [
        ('aws_region = "eu-west-1"\nusername = "AWS"\npassword = "x"', {}),
        ('aws_region = "eu-west-1"\npassword = "x"', {}),
        ('aws_region = "eu-west-1"', {f"MIRROR_REGISTRY_{ECR_ID}_USERNAME": "AWS"}),
        ('username = "AWS"', {f"MIRROR_REGISTRY_{ECR_ID}_AWS_REGION": "eu-west-1"}),
    ],
)
def test_static_credentials_and_ecr_exclude_each_other(
    tmp_path: Path, extra: str, environ: dict[str, str]
) -> None:
    problems = _problems(environ, _ecr_file(tmp_path, extra))
    assert problems == [
        f"registries.'{ECR}': username/password and aws_region exclude each other "
        "(with aws_region, ECR issues the credentials)"
    ]


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://vpce-1.api.ecr.eu-west-1.vpce.amazonaws.com",
        "http://127.0.0.1:5123",  # moto on this machine: nothing crosses a network
        "http://127.3.2.1",
        "http://[::1]:4566",
        "http://localhost:4566",
    ],
)
def test_an_ecr_endpoint_is_https_unless_on_loopback(tmp_path: Path, endpoint: str) -> None:
    extra = f'aws_region = "eu-west-1"\naws_endpoint_url = "{endpoint}"'
    assert load_config({}, _ecr_file(tmp_path, extra)).registries[ECR].aws_endpoint_url == endpoint


@pytest.mark.parametrize(
    "endpoint",
    ["http://vpce-1.api.ecr.eu-west-1.vpce.amazonaws.com", "http://10.0.0.5:4566",
     "http://127.0.0.1.nip.io", "http://localhost.example"],
)  # fmt: skip
def test_a_cleartext_ecr_endpoint_is_refused_by_key(tmp_path: Path, endpoint: str) -> None:
    """The reply to GetAuthorizationToken is the registry password."""
    extra = f'aws_region = "eu-west-1"\naws_endpoint_url = "{endpoint}"'
    # The default is another registry: the refused entry's absence is not a second problem.
    hub = 'default_registry = "docker.io"\n[registries."docker.io"]\nurl = "https://hub"\n'
    entry = f'[registries."{ECR}"]\nurl = "https://{ECR}"\n{extra}\n'
    assert _problems({}, _toml(tmp_path, hub + entry)) == [
        f"{tmp_path / 'mirror.toml'}: registries.'{ECR}'.aws_endpoint_url: must be https:// "
        f"(the reply carries the registry password), got {endpoint!r}; http:// only to a "
        "loopback host (127.0.0.0/8, ::1, localhost)"
    ]
    variable = f"MIRROR_REGISTRY_{ECR_ID}_AWS_ENDPOINT_URL"
    problems = _problems({variable: endpoint}, _ecr_file(tmp_path, 'aws_region = "eu-west-1"'))
    assert len(problems) == 1 and problems[0].startswith(f"${variable}: must be https://")


def test_describe_names_ecr_without_credentials(tmp_path: Path) -> None:
    extra = 'aws_region = "eu-west-1"\naws_endpoint_url = "http://127.0.0.1:5123"'
    view = describe(load_config({}, _ecr_file(tmp_path, extra)))
    assert view["registries"][ECR] == {
        "url": f"https://{ECR}", "auth": "ecr", "mirror": False, "aws_region": "eu-west-1",
        "aws_endpoint_url": "http://127.0.0.1:5123",
    }  # fmt: skip


# ---------------------------------------------------------------- describe()

SECRETS = ("hub-secret-123", "admin-token-456", "file-pass-789")


def _secret_config(tmp_path: Path) -> Config:
    path = _toml(
        tmp_path,
        """
[server]
admin_token = "admin-token-456"
[registries."docker.io"]
url = "https://registry-1.docker.io"
username = "u"
password = "file-pass-789"
[registries."ghcr.io"]
url = "https://ghcr.io"
""",
    )
    return load_config({"MIRROR_REGISTRY_GHCR_IO_PASSWORD": "hub-secret-123",
                        "MIRROR_REGISTRY_GHCR_IO_USERNAME": "g"}, path)  # fmt: skip


def test_describe_never_contains_secrets(tmp_path: Path) -> None:
    config = _secret_config(tmp_path)
    assert config.server.admin_token == "admin-token-456"  # loaded, so hiding it means something
    assert config.registries["docker.io"].password == "file-pass-789"
    view = describe(config)
    text = json.dumps(view)
    for secret in SECRETS:
        assert secret not in text
    assert "admin_token" not in view["server"]
    assert view["registries"]["docker.io"] == {
        "url": "https://registry-1.docker.io", "auth": True, "mirror": False,
    }  # fmt: skip
    assert view["registries"]["ghcr.io"]["auth"] is True
    assert view["default_registry"] == "docker.io"
    assert view["cache"]["max_size"] == "0"


def test_describe_of_defaults_is_json_ready() -> None:
    view = describe(load_config({}))
    assert set(view) == {
        "server", "cache", "upstream", "warm", "s3", "cluster", "registries", "default_registry"
    }  # fmt: skip
    assert set(view["registries"]) == set(DEFAULT_REGISTRIES)
    assert json.loads(json.dumps(view)) == view


def test_describe_hides_userinfo_in_urls(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[registries."docker.io"]
url = "https://user:url-pass-000@registry-1.docker.io"
""",
    )
    # Refused outright: credentials belong in username/password, which are never logged.
    with pytest.raises(ConfigError) as caught:
        load_config({}, path)
    assert "url-pass-000" not in str(caught.value)
    assert "registries.'docker.io'.url" in str(caught.value)


# ---------------------------------------------------------------- the command line


def test_serve_with_bad_config_exits_2_naming_every_key(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[server]
listen = "nowhere"
[cache]
max_size = "huge"
tag_ttl = "soon"
[upstream]
retries = -3
[registries."docker.io"]
url = "registry-1.docker.io"
""",
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    result = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--config", str(path)],
        cwd=PROJECT, env=environ, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("mirror: invalid configuration:") == 1
    assert result.stderr.startswith("mirror: invalid configuration:")
    for key in ["server.listen", "cache.max_size", "cache.tag_ttl", "upstream.retries",
                "registries.'docker.io'.url"]:  # fmt: skip
        assert f"{path}: {key}" in result.stderr, key
    # the registry error removed docker.io, which then fails the default_registry check too
    assert "default_registry" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 + 6


# ---------------------------------------------------------------- [s3]

MiB, GiB = 1024**2, 1024**3


def test_s3_from_the_file(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[s3]
bucket = "mirror-cache-eu-west-1"
region = "eu-west-1"
endpoint_url = "https://bucket.vpce-0a1b.s3.eu-west-1.vpce.amazonaws.com/"
prefix = "regional/eu/"
redirect = true
redirect_expiry = "1h"
upload_concurrency = 8
multipart_threshold = "128MiB"
part_size = "16MiB"
upload_queue = 50
""",
    )
    s3 = load_config({}, path).s3
    assert s3 == S3Config(
        bucket="mirror-cache-eu-west-1", region="eu-west-1",
        endpoint_url="https://bucket.vpce-0a1b.s3.eu-west-1.vpce.amazonaws.com",
        prefix="regional/eu/", redirect=True, redirect_expiry=3600.0, upload_concurrency=8,
        multipart_threshold=128 * MiB, part_size=16 * MiB, upload_queue=50,
    )  # fmt: skip
    assert s3.enabled
    assert s3.key("ab" * 32) == f"regional/eu/blobs/sha256/{'ab' * 32}"


def test_no_s3_level_by_default() -> None:
    s3 = load_config({}).s3
    assert s3 == S3Config() and not s3.enabled
    assert (s3.prefix, s3.redirect, s3.redirect_expiry) == ("mirror/", False, 1200.0)
    assert (s3.multipart_threshold, s3.part_size, s3.upload_queue) == (64 * MiB, 32 * MiB, 1000)


@pytest.mark.parametrize(
    ("environ", "attr", "expected"),
    [
        ({"MIRROR_S3_PREFIX": ""}, "prefix", ""),
        ({"MIRROR_S3_REDIRECT": "true"}, "redirect", True),
        ({"MIRROR_S3_REDIRECT_EXPIRY": "7d"}, "redirect_expiry", 604800.0),
        ({"MIRROR_S3_REDIRECT_EXPIRY": "1s"}, "redirect_expiry", 1.0),
        ({"MIRROR_S3_UPLOAD_CONCURRENCY": "16"}, "upload_concurrency", 16),
        ({"MIRROR_S3_MULTIPART_THRESHOLD": "5GiB"}, "multipart_threshold", 5 * GiB),
        ({"MIRROR_S3_PART_SIZE": "5MiB"}, "part_size", 5 * MiB),
        ({"MIRROR_S3_PART_SIZE": "5GiB"}, "part_size", 5 * GiB),
        ({"MIRROR_S3_UPLOAD_QUEUE": "1"}, "upload_queue", 1),
        ({"MIRROR_S3_ENDPOINT_URL": "http://127.0.0.1:4566"}, "endpoint_url",
         "http://127.0.0.1:4566"),
        ({"MIRROR_S3_ENDPOINT_URL": "http://[::1]:4566"}, "endpoint_url", "http://[::1]:4566"),
        ({"MIRROR_S3_BUCKET": ""}, "bucket", None),
    ],
)  # fmt: skip
def test_s3_env_overrides(environ: dict[str, str], attr: str, expected: Any) -> None:
    level = {"MIRROR_S3_BUCKET": "mirror-cache", "MIRROR_S3_REGION": "us-east-1"}
    assert getattr(load_config({**level, **environ}).s3, attr) == expected


def test_s3_env_beats_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[s3]\nbucket = "from-file"\nregion = "eu-west-1"\n')
    s3 = load_config({"MIRROR_S3_BUCKET": "from-env"}, path).s3
    assert (s3.bucket, s3.region) == ("from-env", "eu-west-1")


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"MIRROR_S3_BUCKET": "Mirror"}, "$MIRROR_S3_BUCKET: expected an S3 bucket name"),
        ({"MIRROR_S3_BUCKET": "ab"}, "$MIRROR_S3_BUCKET: expected an S3 bucket name"),
        ({"MIRROR_S3_BUCKET": "a" * 64}, "$MIRROR_S3_BUCKET: expected an S3 bucket name"),
        ({"MIRROR_S3_BUCKET": "my..bucket"}, "$MIRROR_S3_BUCKET: expected an S3 bucket name"),
        ({"MIRROR_S3_BUCKET": "-bucket"}, "$MIRROR_S3_BUCKET: expected an S3 bucket name"),
        ({"MIRROR_S3_BUCKET": "192.168.0.1"}, "$MIRROR_S3_BUCKET: expected an S3 bucket name"),
        ({"MIRROR_S3_BUCKET": "s3://mirror"}, "$MIRROR_S3_BUCKET: expected a bucket name, not"),
        ({"MIRROR_S3_BUCKET": "mirror/x"}, "$MIRROR_S3_BUCKET: expected a bucket name, not"),
        ({"MIRROR_S3_REGION": "eu-west"}, "$MIRROR_S3_REGION: expected an AWS region"),
        ({"MIRROR_S3_ENDPOINT_URL": "s3.example"}, "$MIRROR_S3_ENDPOINT_URL: expected http(s)"),
        ({"MIRROR_S3_ENDPOINT_URL": "http://s3.eu-west-1.amazonaws.com"},
         "$MIRROR_S3_ENDPOINT_URL: must be https:// (uploads, and redirects that hand out "
         "presigned URLs), got 'http://s3.eu-west-1.amazonaws.com'; http:// only to a loopback"),
        ({"MIRROR_S3_ENDPOINT_URL": "http://10.0.0.5:9000"},
         "$MIRROR_S3_ENDPOINT_URL: must be https://"),
        ({"MIRROR_S3_PREFIX": "mirror"}, "$MIRROR_S3_PREFIX: must be empty or end in '/'"),
        ({"MIRROR_S3_PREFIX": "/mirror/"}, "$MIRROR_S3_PREFIX: must not start with '/'"),
        ({"MIRROR_S3_PREFIX": "a//b/"}, "$MIRROR_S3_PREFIX: must not start with '/' or hold"),
        ({"MIRROR_S3_PREFIX": "a b/"}, "$MIRROR_S3_PREFIX: only a-z"),
        ({"MIRROR_S3_PREFIX": "a?b/"}, "$MIRROR_S3_PREFIX: only a-z"),
        ({"MIRROR_S3_PREFIX": "a/../"}, "$MIRROR_S3_PREFIX: must not hold '.' or '..'"),
        ({"MIRROR_S3_PREFIX": "./"}, "$MIRROR_S3_PREFIX: must not hold '.' or '..'"),
        ({"MIRROR_S3_PREFIX": "a" * 947 + "/"}, "$MIRROR_S3_PREFIX: at most 947 characters"),
        ({"MIRROR_S3_REDIRECT": "sometimes"}, "$MIRROR_S3_REDIRECT: expected true or false"),
        ({"MIRROR_S3_REDIRECT_EXPIRY": "8d"}, "$MIRROR_S3_REDIRECT_EXPIRY: must be from 1s"),
        ({"MIRROR_S3_REDIRECT_EXPIRY": "500ms"}, "$MIRROR_S3_REDIRECT_EXPIRY: must be from"),
        ({"MIRROR_S3_UPLOAD_CONCURRENCY": "0"}, "$MIRROR_S3_UPLOAD_CONCURRENCY: must be at"),
        ({"MIRROR_S3_MULTIPART_THRESHOLD": "6GiB"},
         "$MIRROR_S3_MULTIPART_THRESHOLD: must be at most 5GiB"),
        ({"MIRROR_S3_PART_SIZE": "4MiB"}, "$MIRROR_S3_PART_SIZE: must be from 5MiB to 5GiB"),
        ({"MIRROR_S3_PART_SIZE": "6GiB"}, "$MIRROR_S3_PART_SIZE: must be from 5MiB to 5GiB"),
        ({"MIRROR_S3_UPLOAD_QUEUE": "0"}, "$MIRROR_S3_UPLOAD_QUEUE: must be at least 1"),
        ({"MIRROR_S3_BUCKT": "x"}, "$MIRROR_S3_BUCKT: unknown setting"),
    ],
)  # fmt: skip
def test_bad_s3_values_are_named(environ: dict[str, str], says: str) -> None:
    level = {"MIRROR_S3_BUCKET": "mirror-cache", "MIRROR_S3_REGION": "us-east-1"}
    (problem,) = _problems({**level, **environ})
    assert problem.startswith(says), problem


def test_a_longest_prefix_still_makes_a_valid_s3_key() -> None:
    s3 = load_config({"MIRROR_S3_PREFIX": "a" * 946 + "/"}).s3
    assert len(s3.key("0" * 64).encode()) == 1024


@pytest.mark.parametrize(
    ("environ", "problems"),
    [
        ({"MIRROR_S3_BUCKET": "mirror-cache"}, ["s3.region: required when s3.bucket is set"]),
        ({"MIRROR_S3_REDIRECT": "true"},
         ["s3.redirect: needs s3.bucket (there is nothing to redirect to)"]),
        ({"MIRROR_S3_ENDPOINT_URL": "https://s3.example"}, ["s3.endpoint_url: needs s3.bucket"]),
    ],
)  # fmt: skip
def test_s3_keys_that_need_each_other(environ: dict[str, str], problems: list[str]) -> None:
    assert _problems(environ) == problems


def test_a_region_alone_is_harmless() -> None:
    assert not load_config({"MIRROR_S3_REGION": "eu-west-1"}).s3.enabled


# ---------------------------------------------------------------- [cluster]


def test_cluster_from_the_file(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[cluster]
peers = ["http://mirror-0.mirror-peers:5000", "HTTP://Mirror-1.mirror-peers:5000/",
         "https://[fd00::7]:5443"]
self = "http://mirror-1.mirror-peers:5000"
resolve_interval = "30s"
peer_timeout = "250ms"
peer_down_for = "1m"
""",
    )
    cluster = load_config({}, path).cluster
    assert cluster == ClusterConfig(
        peers=("http://mirror-0.mirror-peers:5000", "http://mirror-1.mirror-peers:5000",
               "https://[fd00::7]:5443"),
        self_url="http://mirror-1.mirror-peers:5000",
        resolve_interval=30.0, peer_timeout=0.25, peer_down_for=60.0,
    )  # fmt: skip
    assert cluster.enabled and cluster.member and cluster.dns_target is None


def test_no_cluster_by_default() -> None:
    cluster = load_config({}).cluster
    assert cluster == ClusterConfig() and not cluster.enabled
    assert (cluster.peers, cluster.peers_dns, cluster.self_url, cluster.member) == (
        (), None, None, True
    )  # fmt: skip
    assert (cluster.resolve_interval, cluster.peer_timeout, cluster.peer_down_for) == (
        10.0, 1.0, 30.0
    )  # fmt: skip


def test_cluster_from_the_environment_as_kubernetes_sets_it() -> None:
    """The StatefulSet's variables: a headless Service, and the pod's own IP as self."""
    cluster = load_config({
        "MIRROR_CLUSTER_PEERS_DNS": "mirror-peers.mirror.svc.cluster.local:5000",
        "MIRROR_CLUSTER_SELF": "http://10.1.2.3:5000",
    }).cluster  # fmt: skip
    assert cluster.enabled and cluster.peers == ()
    assert cluster.dns_target == ("mirror-peers.mirror.svc.cluster.local", 5000)
    assert cluster.self_url == "http://10.1.2.3:5000"


def test_a_node_tier_is_a_client_of_the_ring() -> None:
    cluster = load_config({
        "MIRROR_CLUSTER_PEERS_DNS": "mirror-peers.mirror.svc.cluster.local:5000",
        "MIRROR_CLUSTER_MEMBER": "false",
    }).cluster  # fmt: skip
    assert cluster.enabled and not cluster.member


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://a:5000,http://b:5000", ("http://a:5000", "http://b:5000")),
        (" http://a:5000 , http://b:5000/ ,", ("http://a:5000", "http://b:5000")),
        ("http://10.0.0.1:5000", ("http://10.0.0.1:5000",)),
        ("", ()),
    ],
)
def test_peers_from_the_environment_are_comma_separated(
    value: str, expected: tuple[str, ...]
) -> None:
    assert load_config({"MIRROR_CLUSTER_PEERS": value}).cluster.peers == expected


def test_an_empty_peers_variable_clears_the_files_list(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[cluster]\npeers = ["http://a:5000"]\n')
    assert load_config({"MIRROR_CLUSTER_PEERS": ""}, path).cluster.peers == ()


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"MIRROR_CLUSTER_PEERS": "mirror-0:5000"}, "expected a base URL http(s)://host:port"),
        ({"MIRROR_CLUSTER_PEERS": "ftp://a:5000"}, "expected a base URL"),
        ({"MIRROR_CLUSTER_PEERS": "http://a:5000/v2"}, "expected a base URL"),
        ({"MIRROR_CLUSTER_PEERS": "http://a:5000?x=1"}, "expected a base URL"),
        ({"MIRROR_CLUSTER_PEERS": "http://u:p@a:5000"}, "expected a base URL"),
        ({"MIRROR_CLUSTER_PEERS": "http://a"}, "expected host:port with a port from 1"),
        ({"MIRROR_CLUSTER_PEERS": "http://a:0"}, "expected host:port with a port from 1"),
        ({"MIRROR_CLUSTER_PEERS": "http://a:65536"}, "expected host:port with a port from 1"),
        ({"MIRROR_CLUSTER_PEERS": "http://a_b:5000"}, "expected a host name or address"),
        ({"MIRROR_CLUSTER_PEERS": "http://a:5000,http://A:5000/"},
         "each peer once, repeated: http://a:5000"),
        ({"MIRROR_CLUSTER_PEERS_DNS": "http://mirror-peers:5000"}, "expected host:port (a DNS"),
        ({"MIRROR_CLUSTER_PEERS_DNS": "mirror-peers"}, "expected host:port with a port"),
        ({"MIRROR_CLUSTER_PEERS_DNS": "[::1]:5000"}, "expected a DNS name to resolve"),
        ({"MIRROR_CLUSTER_SELF": "10.0.0.1:5000"}, "expected a base URL"),
        ({"MIRROR_CLUSTER_SELF": "http://$(POD_IP):5000"}, "expected a host name or address"),
        ({"MIRROR_CLUSTER_MEMBER": "perhaps"}, "expected true or false"),
        ({"MIRROR_CLUSTER_RESOLVE_INTERVAL": "0"}, "must be more than 0"),
        ({"MIRROR_CLUSTER_PEER_TIMEOUT": "-1s"}, "expected a duration"),
        ({"MIRROR_CLUSTER_PEER_DOWN_FOR": "0s"}, "must be more than 0"),
        ({"MIRROR_CLUSTER_PEER": "http://a:5000"}, "unknown setting"),
    ],
)  # fmt: skip
def test_bad_cluster_values_are_named(environ: dict[str, str], says: str) -> None:
    (variable,) = environ
    (problem,) = _problems(environ)
    assert problem.startswith(f"${variable}: {says}"), problem


def test_a_peer_list_from_the_file_must_be_a_list(tmp_path: Path) -> None:
    (problem,) = _problems({}, _toml(tmp_path, "[cluster]\npeers = 5\n"))
    assert problem.endswith("cluster.peers: expected a list of base URLs, got 5")


@pytest.mark.parametrize(
    ("environ", "problems"),
    [
        ({"MIRROR_CLUSTER_PEERS": "http://a:5000", "MIRROR_CLUSTER_PEERS_DNS": "peers:5000"},
         ["cluster.peers, cluster.peers_dns: set one of them, not both"]),
        ({"MIRROR_CLUSTER_PEERS": "http://a:5000,http://b:5000",
          "MIRROR_CLUSTER_SELF": "http://c:5000"},
         ["cluster.self: 'http://c:5000' is not among cluster.peers; a member must be one of "
          "the peers, or each replica would rank owners over a different set"]),
    ],
)  # fmt: skip
def test_cluster_keys_that_exclude_each_other(environ: dict[str, str], problems: list[str]) -> None:
    assert _problems(environ) == problems


@pytest.mark.parametrize(
    "environ",
    [
        # one spelling of a peer is as good as another
        {"MIRROR_CLUSTER_PEERS": "http://a:5000,http://b:5000", "MIRROR_CLUSTER_SELF":
         "HTTP://B:5000/"},
        # a client of the ring is none of the peers
        {"MIRROR_CLUSTER_PEERS": "http://a:5000", "MIRROR_CLUSTER_SELF": "http://c:5000",
         "MIRROR_CLUSTER_MEMBER": "false"},
        # with DNS, who the peers are is known only at run time
        {"MIRROR_CLUSTER_PEERS_DNS": "peers:5000", "MIRROR_CLUSTER_SELF": "http://c:5000"},
    ],
)  # fmt: skip
def test_a_self_that_fits_the_peers(environ: dict[str, str]) -> None:
    assert load_config(environ).cluster.enabled


def test_every_bad_s3_and_cluster_key_is_reported_together(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[s3]
bucket = "Bad_Bucket"
redirect_expiry = "30d"
part_size = "1MiB"
colour = "blue"

[cluster]
peers = ["mirror-0:5000"]
peer_timeout = "soon"
""",
    )
    problems = _problems({"MIRROR_S3_REDIRECT": "yes", "MIRROR_CLUSTER_MEMBER": "x"}, path)
    text = "\n".join(problems)
    for fragment in [
        "s3.bucket: expected an S3 bucket name",
        "s3.redirect_expiry: must be from 1s to 7d",
        "s3.part_size: must be from 5MiB",
        "s3.colour: unknown setting",
        "cluster.peers: expected a base URL",
        "cluster.peer_timeout: expected a duration",
        "$MIRROR_CLUSTER_MEMBER: expected true or false",
    ]:
        assert fragment in text, fragment
    # Not "s3.redirect: needs s3.bucket" as well: the bucket was given, only misspelt.
    assert len(problems) == 7, problems


def test_describe_shows_s3_and_cluster(tmp_path: Path) -> None:
    config = load_config({
        "MIRROR_S3_BUCKET": "mirror-cache", "MIRROR_S3_REGION": "eu-west-1",
        "MIRROR_CLUSTER_PEERS": "http://a:5000,http://b:5000",
    })  # fmt: skip
    view = describe(config)
    assert view["s3"]["bucket"] == "mirror-cache" and view["s3"]["region"] == "eu-west-1"
    assert view["s3"]["prefix"] == "mirror/"
    assert view["cluster"]["peers"] == ["http://a:5000", "http://b:5000"]
    assert view["warm"]["platforms"] == ["linux/amd64"]
    assert json.loads(json.dumps(view)) == view
