"""Tokens files and the one token grammar (SPEC "Access"): a token that a
tokens file accepts is one a request can carry, and the reverse."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accman.server._wire import Parser
from accman.server.auth import CHARGE, MINT, READ, TOKEN_CHARS, Tokens, TokensError

GOOD = "abcdefghijklmnop"


def wire_token(token: str):
    [req] = Parser().feed(b"GET /tot?cred=a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          + token.encode("latin-1") + b"\r\n\r\n")
    return req.token


def file_accepts(token: str) -> bool:
    try:
        Tokens.parse(f"read {token}")
    except TokensError:
        return False
    return True


@pytest.mark.parametrize("token,ok", [
    (GOOD, True), (GOOD + "==", True), ("A-._~+/9" * 2, True),
    ("abc=defghijklmnop", False),       # "=" only at the end (RFC 6750 b64token)
    ("=" + GOOD, False), (GOOD + ",", False), (GOOD[:15], False), ("a" * 257, False)])
def test_file_and_wire_agree(token, ok):
    assert file_accepts(token) is ok
    if 16 <= len(token) <= 256:
        assert (wire_token(token) == token.encode()) is ok


@settings(max_examples=300)
@given(st.text(alphabet=TOKEN_CHARS + "=,; \t\"\\é", min_size=16, max_size=40))
def test_one_grammar(token):
    """Within the length bounds, the tokens file and the request parser
    accept exactly the same tokens."""
    if token != token.strip() or " " in token or "\t" in token:
        return          # split into fields by the file format, by the header's OWS
    assert file_accepts(token) == (wire_token(token) == token.encode("latin-1"))


def test_roles_and_errors_name_the_line_not_the_token():
    tokens = Tokens.parse(f"# comment\n\nread,charge {GOOD}\nmint {GOOD}X\n")
    assert tokens.roles(GOOD.encode()) == READ | CHARGE
    assert tokens.roles((GOOD + "X").encode()) == MINT
    assert tokens.roles(b"nope" * 4) == 0 and tokens.roles(None) == 0
    for text, message in [(f"read {GOOD} extra", "line 1: expected"),
                          (f"admin {GOOD}", "line 1: unknown role 'admin'"),
                          (f"read {GOOD}\nread {GOOD}", "line 2: a token appears twice"),
                          ("read abc=defghijklmnop", "may end in one or more =")]:
        with pytest.raises(TokensError, match=message) as e:
            Tokens.parse(text)
        assert "abc=def" not in str(e.value) and GOOD not in str(e.value)
