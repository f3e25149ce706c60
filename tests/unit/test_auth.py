"""WWW-Authenticate challenges as real registries send them."""

from __future__ import annotations

import pytest

from mirror.upstream.auth import Challenge, parse_challenges, pull_scope


def _as_tuples(header: str) -> list[tuple[str, dict[str, str]]]:
    return [(c.scheme, dict(c.params)) for c in parse_challenges(header)]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (  # Docker Hub
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/nginx:pull"',
            [("bearer", {"realm": "https://auth.docker.io/token",
                         "service": "registry.docker.io",
                         "scope": "repository:library/nginx:pull"})],
        ),
        (  # ghcr.io
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",'
            'scope="repository:user/image:pull"',
            [("bearer", {"realm": "https://ghcr.io/token", "service": "ghcr.io",
                         "scope": "repository:user/image:pull"})],
        ),
        (  # quay.io: no scope on /v2/
            'Bearer realm="https://quay.io/v2/auth",service="quay.io"',
            [("bearer", {"realm": "https://quay.io/v2/auth", "service": "quay.io"})],
        ),
        (  # distribution's htpasswd
            'Basic realm="Registry Realm"',
            [("basic", {"realm": "Registry Realm"})],
        ),
        (  # several challenges in one header
            'Basic realm="x", Bearer realm="https://auth.example/token",service="reg"',
            [("basic", {"realm": "x"}),
             ("bearer", {"realm": "https://auth.example/token", "service": "reg"})],
        ),
        (
            'Bearer realm="a",service="b",Basic realm="c"',
            [("bearer", {"realm": "a", "service": "b"}), ("basic", {"realm": "c"})],
        ),
        (  # escaped quote and backslash inside a quoted value
            r'Basic realm="say \"hi\" \\ bye"',
            [("basic", {"realm": 'say "hi" \\ bye'})],
        ),
        (  # commas inside a quoted value belong to it (push+pull scopes)
            'Bearer realm="https://a/token",scope="repository:a/b:pull,push"',
            [("bearer", {"realm": "https://a/token", "scope": "repository:a/b:pull,push"})],
        ),
        (  # unquoted tokens, blanks around "=", case folded on scheme and keys
            "BEARER Realm = https://a/token , Service=reg",
            [("bearer", {"realm": "https://a/token", "service": "reg"})],
        ),
        ('Bearer realm=""', [("bearer", {"realm": ""})]),
        ("Negotiate", [("negotiate", {})]),
        ("", []),
        ("   ", []),
        ('="nothing"', []),
    ],
)  # fmt: skip
def test_parse_challenges(header: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    assert _as_tuples(header) == expected


def test_parse_challenges_none_is_empty() -> None:
    assert parse_challenges(None) == []  # type: ignore[arg-type]  # headers.get() may be None


def test_unterminated_quote_does_not_hang_or_invent_values() -> None:
    challenges = parse_challenges('Bearer realm="https://a/token')
    assert [c.scheme for c in challenges] == ["bearer"]
    assert challenges[0].realm == ""


@pytest.mark.parametrize(
    ("header", "realm", "service", "scope"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/nginx:pull"',
            "https://auth.docker.io/token", "registry.docker.io", "repository:library/nginx:pull",
        ),
        ('Bearer realm="https://quay.io/v2/auth"', "https://quay.io/v2/auth", "", ""),
        ("Basic", "", "", ""),
    ],
)  # fmt: skip
def test_challenge_accessors(header: str, realm: str, service: str, scope: str) -> None:
    (challenge,) = parse_challenges(header)
    assert (challenge.realm, challenge.service, challenge.scope) == (realm, service, scope)


def test_challenge_params_are_read_only() -> None:
    (challenge,) = parse_challenges('Basic realm="x"')
    with pytest.raises(TypeError):
        challenge.params["realm"] = "y"  # type: ignore[index]  # proving it is immutable
    assert Challenge("basic").params == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("library/nginx", "repository:library/nginx:pull"),
        ("org/team/app", "repository:org/team/app:pull"),
    ],
)
def test_pull_scope(name: str, expected: str) -> None:
    assert pull_scope(name) == expected
