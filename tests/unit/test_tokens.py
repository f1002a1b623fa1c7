"""The tokens file: the operator's writer and the runtime's reader agree, for tokens of any characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from federator import tokens
from federator.operator import secrets
from federator.runtime.server import FederationServer
from tests.helpers.manifests import manifest

AWKWARD = ["a,b", "x=y=z", "# not a comment", " spaced token ", "silo:evil=tok", "ünïcode,\"quoted\""]


def test_what_the_operator_writes_the_server_reads_back_token_for_token() -> None:
    data = {secrets.WORKER_TOKEN: AWKWARD[0], **{secrets.silo_token_key(f"s{i}"): t for i, t in enumerate(AWKWARD)}}
    read = tokens.loads(secrets.tokens_file(data))
    assert read.workers == (AWKWARD[0],)
    assert read.silos == {f"s{i}": t for i, t in enumerate(AWKWARD)}


def test_round_trip_keeps_order_of_workers_and_every_character() -> None:
    original = tokens.Tokens(tuple(AWKWARD), {"b": "1,2", "a": "=,#"})
    assert tokens.loads(tokens.dumps(original)) == original


def test_a_server_accepts_a_token_with_a_comma_and_binds_silo_tokens(tmp_path: Path) -> None:
    from federator.api.models import Federation

    fed = Federation.model_validate(manifest(rounds=1))
    path = tmp_path / "tokens.json"
    path.write_text(tokens.dumps(tokens.Tokens(("w,1",), {"hospital": "h,2"})))
    server = FederationServer(fed, tmp_path / "state", tokens.read_server_tokens(str(path))).start()
    try:
        assert server.check_token("w,1") and not server.check_token("w") and not server.check_token("1")
        assert server.check_token("h,2", silo="hospital") and not server.check_token("h,2")
        assert not server.check_token("w,1", silo="hospital")
    finally:
        server.stop()


@pytest.mark.parametrize(("text", "fix"), [
    ("tok1\ntok2\n", "not JSON"),
    ('["a"]', "only 'workers' and 'silos'"),
    ('{"workers": "a"}', "'workers' must be a list"),
    ('{"workers": ["a"], "silos": {"x": ""}}', "'silos' must map"),
    ('{"workers": ["a"], "extra": 1}', "only 'workers' and 'silos'"),
])
def test_a_malformed_file_is_refused_naming_its_source_and_the_shape(text: str, fix: str) -> None:
    with pytest.raises(tokens.TokensError, match=fix) as err:
        tokens.loads(text, source="/etc/federator/tokens")
    assert str(err.value).startswith("/etc/federator/tokens: ")


def test_the_client_token_is_the_whole_file_without_surrounding_space(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("a,b=c\n")
    assert tokens.read_client_token(str(tmp_path / "token")) == "a,b=c"
    monkeypatch.setenv("FEDERATOR_TOKEN", " x,y ")
    assert tokens.read_client_token(None) == "x,y"


def test_in_memory_entries_bind_silo_tokens() -> None:
    assert tokens.Tokens.from_entries(["w", "silo:a=x=y", ""]) == tokens.Tokens(("w",), {"a": "x=y"})
