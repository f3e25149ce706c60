"""containerd hosts.toml rendering, directory naming and the atomic writer."""

from __future__ import annotations

import io
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mirror.cli import main
from mirror.cli.containerd import (
    fallback_origins,
    go_duration,
    hosts_dir_candidates,
    hosts_dir_name,
    render_hosts_toml,
    run_containerd_config,
    write_hosts_dirs,
)
from mirror.config import DEFAULT_REGISTRIES, RegistryConfig

ORIGINS = {"docker.io": "https://registry-1.docker.io", "ghcr.io": "https://ghcr.io"}


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ("docker.io", "docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("registry.k8s.io", "registry.k8s.io"),
        ("127.0.0.1:5000", "127.0.0.1_5000_"),
        ("myregistry.io:5000", "myregistry.io_5000_"),
        ("localhost", "localhost"),
        ("[::1]:5000", "[::1]_5000_"),
        ("[::1]", "[::1]"),
        ("_default", "_default"),
    ],
)
def test_hosts_dir_name(registry: str, expected: str) -> None:
    assert hosts_dir_name(registry) == expected


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ("docker.io", ("docker.io", "_default")),
        ("127.0.0.1:5000", ("127.0.0.1_5000_", "127.0.0.1:5000", "_default")),
        ("_default", ("_default",)),
    ],
)
def test_hosts_dir_candidates_follow_containerd_lookup_order(
    registry: str, expected: tuple[str, ...]
) -> None:
    assert hosts_dir_candidates(registry) == expected


@pytest.mark.parametrize(
    "registry",
    ["", "..", ".", "a/b", "../etc", "docker.io/library", "-bad.io", "a..b", "host:port",
     "host:123456", "_other", "docker.io ", "::1"],
)  # fmt: skip
def test_registry_names_that_could_escape_or_mislead_are_refused(registry: str) -> None:
    with pytest.raises(ValueError):
        hosts_dir_name(registry)
    with pytest.raises(ValueError):
        render_hosts_toml(registry, "http://mirror:5000", None)


def _parse(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


@pytest.mark.parametrize(
    ("registry", "mirror", "origin", "options", "server", "host", "extra"),
    [
        ("docker.io", "http://mirror:5000", "https://registry-1.docker.io", {},
         "https://registry-1.docker.io", "http://mirror:5000", {}),
        ("ghcr.io", "http://mirror:5000/", "https://ghcr.io", {},
         "https://ghcr.io", "http://mirror:5000", {}),
        ("127.0.0.1:5000", "http://10.0.0.1:5000", "http://127.0.0.1:5000", {},
         "http://127.0.0.1:5000", "http://10.0.0.1:5000", {}),
        ("quay.io", "https://mirror.internal", "https://quay.io", {"skip_verify": True},
         "https://quay.io", "https://mirror.internal", {"skip_verify": True}),
        # plain http has no certificate: skip_verify would be noise
        ("quay.io", "http://mirror.internal", "https://quay.io", {"skip_verify": True},
         "https://quay.io", "http://mirror.internal", {}),
        ("ghcr.io", "http://mirror:5000", "https://ghcr.io", {"override_path": True},
         "https://ghcr.io", "http://mirror:5000/v2/ghcr.io", {"override_path": True}),
        ("_default", "http://mirror:5000", None, {}, None, "http://mirror:5000", {}),
        ("docker.io", "http://mirror:5000", None, {}, None, "http://mirror:5000", {}),
    ],
)  # fmt: skip
def test_render_hosts_toml(
    registry: str,
    mirror: str,
    origin: str | None,
    options: dict[str, bool],
    server: str | None,
    host: str,
    extra: dict[str, bool],
) -> None:
    doc = _parse(render_hosts_toml(registry, mirror, origin, **options))
    assert doc.get("server") == server
    assert list(doc["host"]) == [host]
    assert doc["host"][host] == {"capabilities": ["pull", "resolve"], **extra}
    assert set(doc) <= {"server", "host"}


def test_render_matches_the_documented_shape() -> None:
    text = render_hosts_toml("docker.io", "http://mirror:5000", "https://registry-1.docker.io")
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body == [
        'server = "https://registry-1.docker.io"',
        '[host."http://mirror:5000"]',
        '  capabilities = ["pull", "resolve"]',
    ]


@pytest.mark.parametrize(
    "url",
    ["mirror:5000", "ftp://mirror", "http://", "http://mirror:5000?x=1", "http://mirror#f",
     'http://mi"rror', "http://mirror\n[host]", "http://mi rror", "http://mi\\rror"],
)  # fmt: skip
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        render_hosts_toml("docker.io", url, None)
    with pytest.raises(ValueError):
        render_hosts_toml("docker.io", "http://mirror:5000", url)


def test_override_path_needs_a_named_registry() -> None:
    with pytest.raises(ValueError):
        render_hosts_toml("_default", "http://mirror:5000", None, override_path=True)


def test_write_hosts_dirs(tmp_path: Path) -> None:
    origins = {**ORIGINS, "127.0.0.1:5000": "http://127.0.0.1:5000"}
    written = write_hosts_dirs(tmp_path, "http://mirror:5000", origins)
    assert all(backup is None for _, backup in written)  # nothing was there before
    paths = [path for path, _ in written]
    assert paths == [
        tmp_path / "docker.io" / "hosts.toml",
        tmp_path / "ghcr.io" / "hosts.toml",
        tmp_path / "127.0.0.1_5000_" / "hosts.toml",
    ]
    for path, origin in zip(paths, origins.values(), strict=True):
        assert _parse(path.read_text())["server"] == origin
        assert path.stat().st_mode & 0o777 == 0o644
    # nothing but the three hosts.toml files: no temporary files left behind
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "127.0.0.1_5000_", "127.0.0.1_5000_/hosts.toml", "docker.io", "docker.io/hosts.toml",
        "ghcr.io", "ghcr.io/hosts.toml",
    ]  # fmt: skip


def test_write_hosts_dirs_replaces_existing_files(tmp_path: Path) -> None:
    write_hosts_dirs(tmp_path, "http://old:5000", ORIGINS)
    write_hosts_dirs(tmp_path, "http://new:5000", ORIGINS)
    doc = _parse((tmp_path / "docker.io" / "hosts.toml").read_text())
    assert list(doc["host"]) == ["http://new:5000"]
    assert sorted(os.listdir(tmp_path / "docker.io")) == ["hosts.toml"]


def test_write_hosts_dirs_writes_nothing_when_any_entry_is_bad(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_hosts_dirs(tmp_path, "http://mirror:5000", {"docker.io": "https://x", "../x": ""})
    assert list(tmp_path.iterdir()) == []


def test_run_containerd_config_writes_every_configured_registry(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = run_containerd_config(
        "http://mirror:5000", None, tmp_path, ORIGINS, stdout=out, stderr=err
    )
    assert status == 0
    assert err.getvalue() == ""
    assert out.getvalue().splitlines() == [
        f"wrote {tmp_path / 'docker.io' / 'hosts.toml'}",
        f"wrote {tmp_path / 'ghcr.io' / 'hosts.toml'}",
    ]


def test_run_containerd_config_selected_and_default(tmp_path: Path) -> None:
    out = io.StringIO()
    status = run_containerd_config(
        "http://mirror:5000", ["ghcr.io", "_default"], tmp_path, ORIGINS, stdout=out
    )
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_default", "ghcr.io"]
    assert "server" not in _parse((tmp_path / "_default" / "hosts.toml").read_text())


@pytest.mark.parametrize(
    ("mirror", "registries", "status", "message"),
    [
        ("http://mirror:5000", ["quay.io"], 2, "not configured registries: quay.io"),
        ("mirror:5000", None, 2, "mirror URL must be"),
    ],
)
def test_run_containerd_config_refuses_bad_input(
    tmp_path: Path, mirror: str, registries: list[str] | None, status: int, message: str
) -> None:
    err = io.StringIO()
    assert run_containerd_config(mirror, registries, tmp_path, ORIGINS, stderr=err) == status
    assert message in err.getvalue()
    assert list(tmp_path.iterdir()) == []


def test_run_containerd_config_reports_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = io.StringIO()
    status = run_containerd_config("http://mirror:5000", None, blocker, ORIGINS, stderr=err)
    assert status == 1
    assert "cannot write" in err.getvalue()


REGIONAL = "http://mirror.mirror.svc.cluster.local:5000"


@pytest.mark.parametrize(
    ("name", "url", "is_mirror", "origin"),
    [
        # a mirror = true url is the regional tier: the fallback is the real origin
        ("docker.io", REGIONAL, True, "https://registry-1.docker.io"),
        ("ghcr.io", REGIONAL, True, "https://ghcr.io"),
        # not a well-known registry: no server line, containerd uses https://<host>
        ("registry.internal:5000", REGIONAL, True, ""),
        ("registry.internal:5000", "http://registry.internal:5000", False,
         "http://registry.internal:5000"),
        ("docker.io", "https://registry-1.docker.io", False, "https://registry-1.docker.io"),
    ],
)  # fmt: skip
def test_fallback_origins_never_name_the_regional_tier(
    name: str, url: str, is_mirror: bool, origin: str
) -> None:
    registries = {name: RegistryConfig(name, url, is_mirror=is_mirror)}
    assert fallback_origins(registries) == {name: origin}


def test_containerd_config_for_a_node_tier_falls_back_to_the_origins(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[registries."docker.io"]\nurl = "{REGIONAL}"\nmirror = true\n'
        f'[registries."registry.internal:5000"]\nurl = "{REGIONAL}"\nmirror = true\n'
    )
    out = tmp_path / "certs.d"

    status = main(
        ["containerd-config", "--mirror", "http://127.0.0.1:5001", "--out", str(out),
         "--config", str(config)]
    )  # fmt: skip

    assert status == 0
    hub = (out / "docker.io" / "hosts.toml").read_text()
    internal = (out / "registry.internal_5000_" / "hosts.toml").read_text()
    assert _parse(hub)["server"] == DEFAULT_REGISTRIES["docker.io"]
    assert "server" not in _parse(internal)
    assert REGIONAL not in hub + internal
    assert "falls back to registry.internal:5000 itself (containerd's default)" in internal


@pytest.mark.parametrize(
    "url", ["http://mirror:5000/docker.io", "http://mirror:5000/v2", "https://mirror/prefix/"]
)
def test_a_mirror_url_with_a_path_is_refused(tmp_path: Path, url: str) -> None:
    err = io.StringIO()

    status = run_containerd_config(url, None, tmp_path, ORIGINS, stderr=err)

    assert status == 2
    assert "without a path" in err.getvalue() and "/v2/..." in err.getvalue()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("registry", "origin", "says"),
    [
        ("docker.io", "https://registry-1.docker.io", "falls back to the server below."),
        ("_default", None, "falls back to the registry named in the image reference."),
        ("ghcr.io", None, "falls back to ghcr.io itself (containerd's default)."),
    ],
)
def test_the_comment_names_the_real_fallback(registry: str, origin: str | None, says: str) -> None:
    text = render_hosts_toml(registry, "http://mirror:5000", origin)
    assert says in text.splitlines()[1]
    assert ("server" in _parse(text)) is (origin is not None)


# ---------------------------------------------------------------- dial_timeout


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(1.0, "1s"), (2, "2s"), (0.5, "500ms"), (0.25, "250ms"), (1.5, "1500ms"), (0.001, "1ms"),
     (30.0, "30s")],
)  # fmt: skip
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.0, 0.0004, -1.0, float("inf"), float("nan")])
def test_go_duration_refuses_what_containerd_cannot_use(seconds: float) -> None:
    with pytest.raises(ValueError):
        go_duration(seconds)


def test_dial_timeout_goes_in_the_mirror_host_block() -> None:
    text = render_hosts_toml(
        "docker.io", "http://127.0.0.1:5001", "https://registry-1.docker.io", dial_timeout=1.0
    )
    doc = _parse(text)
    assert doc["host"]["http://127.0.0.1:5001"] == {
        "capabilities": ["pull", "resolve"], "dial_timeout": "1s"
    }  # fmt: skip
    assert "dial_timeout" not in doc  # the origin keeps containerd's default: it may be far


def test_no_dial_timeout_unless_asked() -> None:
    assert "dial_timeout" not in render_hosts_toml("docker.io", "http://mirror:5000", None)


@pytest.mark.parametrize(("flag", "written"), [("1s", "1s"), ("500ms", "500ms"), ("2", "2s")])
def test_dial_timeout_flag(tmp_path: Path, flag: str, written: str) -> None:
    out = tmp_path / "certs.d"
    argv = ["containerd-config", "--mirror", "http://127.0.0.1:5001", "--out", str(out),
            "--registry", "docker.io", "--dial-timeout", flag]  # fmt: skip
    assert main(argv) == 0
    doc = _parse((out / "docker.io" / "hosts.toml").read_text())
    assert doc["host"]["http://127.0.0.1:5001"]["dial_timeout"] == written


@pytest.mark.parametrize("flag", ["soon", "-1s", "1h30m"])
def test_a_bad_dial_timeout_flag_is_refused(
    tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["containerd-config", "--mirror", "http://m:5001", "--out", str(tmp_path / "o"),
            "--dial-timeout", flag]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "--dial-timeout" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_zero_dial_timeout_writes_nothing(tmp_path: Path) -> None:
    err = io.StringIO()
    status = run_containerd_config(
        "http://m:5001", None, tmp_path, ORIGINS, dial_timeout=0.0, stderr=err
    )
    assert status == 2 and "at least 1ms" in err.getvalue()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- backups of foreign files

FOREIGN = b'server = "https://registry-1.docker.io"\n[host."https://corp-mirror"]\n  ca = "x.pem"\n'


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_hosts_toml_someone_else_wrote_is_kept(tmp_path: Path) -> None:
    hub = tmp_path / "docker.io"
    hub.mkdir()
    (hub / "hosts.toml").write_bytes(FOREIGN)
    (hub / "hosts.toml").chmod(0o600)
    out = io.StringIO()

    assert run_containerd_config("http://m:5001", None, tmp_path, ORIGINS, stdout=out) == 0

    files = _files(tmp_path)
    assert files["docker.io/hosts.toml.orig"] == FOREIGN
    assert (hub / "hosts.toml.orig").stat().st_mode & 0o777 == 0o600  # as private as it was
    assert list(_parse(files["docker.io/hosts.toml"].decode())["host"]) == ["http://m:5001"]
    assert "ghcr.io/hosts.toml.orig" not in files  # nothing was there to keep
    assert f"kept {hub / 'hosts.toml'} as {hub / 'hosts.toml.orig'}" in out.getvalue()


def test_every_start_of_the_init_container_keeps_the_one_original(tmp_path: Path) -> None:
    """Run on every pod start: our own file is replaced without a backup, and the original
    backup is never overwritten by a copy of ours."""
    hub = tmp_path / "docker.io"
    hub.mkdir()
    (hub / "hosts.toml").write_bytes(FOREIGN)
    for mirror in ("http://m:5001", "http://m:5001", "http://other:5001"):
        write_hosts_dirs(tmp_path, mirror, ORIGINS, dial_timeout=1.0)
    files = _files(tmp_path)
    assert sorted(files) == [
        "docker.io/hosts.toml", "docker.io/hosts.toml.orig", "ghcr.io/hosts.toml"
    ]  # fmt: skip
    assert files["docker.io/hosts.toml.orig"] == FOREIGN
    assert list(_parse(files["docker.io/hosts.toml"].decode())["host"]) == ["http://other:5001"]


def test_a_second_foreign_file_gets_the_next_backup_name(tmp_path: Path) -> None:
    hub = tmp_path / "docker.io"
    hub.mkdir()
    (hub / "hosts.toml").write_bytes(FOREIGN)
    write_hosts_dirs(tmp_path, "http://m:5001", ORIGINS)
    (hub / "hosts.toml").write_bytes(b"# the admin's second try\n" + FOREIGN)
    (written,) = write_hosts_dirs(tmp_path, "http://m:5001", {"docker.io": ""})
    assert written.backup == hub / "hosts.toml.orig.1"
    assert (hub / "hosts.toml.orig").read_bytes() == FOREIGN
    assert (hub / "hosts.toml.orig.1").read_bytes() == b"# the admin's second try\n" + FOREIGN


def test_files_an_older_version_wrote_count_as_ours(tmp_path: Path) -> None:
    hub = tmp_path / "docker.io"
    hub.mkdir()
    old = (
        "# Written by `mirror containerd-config`. Pull through the mirror; if it cannot answer,\n"
        '# containerd falls back to the server below.\nserver = "https://registry-1.docker.io"\n'
    )
    (hub / "hosts.toml").write_text(old)
    (written,) = write_hosts_dirs(tmp_path, "http://m:5001", {"docker.io": ""})
    assert written.backup is None
    assert sorted(p.name for p in hub.iterdir()) == ["hosts.toml"]


def test_bad_input_keeps_foreign_files_untouched(tmp_path: Path) -> None:
    hub = tmp_path / "docker.io"
    hub.mkdir()
    (hub / "hosts.toml").write_bytes(FOREIGN)
    with pytest.raises(ValueError):
        write_hosts_dirs(tmp_path, "http://m:5001", {"docker.io": "", "../x": ""})
    assert _files(tmp_path) == {"docker.io/hosts.toml": FOREIGN}
