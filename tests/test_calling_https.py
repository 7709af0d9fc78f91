"""The calling side over https: both clients, the command line and the
middleware against a real AccMan behind a TLS-terminating proxy (a
deployment that crosses machines), with a private certificate made by
openssl and trusted the ways docs/CALLING.md tells users to: a client's
own `ssl_context`, or SSL_CERT_FILE for the whole process.

A certificate that is not trusted, or that names another host, fails the
handshake before any request is written: `Unreachable`, nothing sent,
never an unknown outcome, and the error says which check failed."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import ssl

import pytest

from accman.asgi import AccManMiddleware
from accman.calling.policy import may_have_landed
from accman.client import AccManClient, AccManSyncClient, Unreachable
from asgi_harness import call, make_app
from conftest import PYTHON, ROOT, run_accman, spawn_server
from test_webhooks import self_signed
from threaded_proxy import Proxy

TOKEN = "https-test-token-0123456789abcdef"

pytestmark = pytest.mark.any_one_store("TLS lies between the caller and the server")


class TLSFront(Proxy):
    """A TLS-terminating proxy: each connection's bytes pass both ways to
    AccMan on a connection of its own.  `served` counts the connections
    whose handshake succeeded; `names` are the SNI names the clients sent."""

    def __init__(self, upstream_port: int, cert, key):
        self.served = 0
        self.names: list = []
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        tls.sni_callback = lambda sock, name, ctx: self.names.append(name)
        super().__init__(upstream_port, tls)

    async def _serve(self, reader, writer) -> None:
        self.served += 1
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """`ok`: a certificate for 127.0.0.1, `other`: one for another name,
    `dotted`: one for accman.test, all in `bundle` (the private CA a user
    trusts); `stranger`: one for 127.0.0.1 that nobody trusts."""
    d = tmp_path_factory.mktemp("https")
    made = {}
    for name, cn, alt in (("ok", "127.0.0.1", "IP:127.0.0.1"),
                          ("other", "other.test", "DNS:other.test"),
                          ("stranger", "127.0.0.1", "IP:127.0.0.1"),
                          ("dotted", "accman.test", "DNS:accman.test")):
        (d / name).mkdir()
        made[name] = self_signed(d / name, cn, alt)
    bundle = d / "bundle.pem"
    bundle.write_text(made["ok"][0].read_text() + made["other"][0].read_text()
                      + made["dotted"][0].read_text())
    made["bundle"] = bundle
    return made


@pytest.fixture(scope="module")
def accman(tmp_path_factory, server_store):
    """An AccMan with a token, as one reached across machines has."""
    base = tmp_path_factory.mktemp(f"https-{server_store.name}")
    srv = spawn_server(base / "data", base / "log", store=server_store,
                       tokens=f"read,charge,mint {TOKEN}")
    yield srv
    srv.kill()


@pytest.fixture
def front(accman, certs, request):
    """A TLS front before `accman` with the certificate the test's
    parameter names (`ok` when it has none)."""
    f = TLSFront(accman.port, *certs[getattr(request, "param", "ok")])
    yield f
    f.close()


@pytest.fixture
def cred():
    """A fresh credential of hex digits only: the errors hide any word that
    shares 8 characters with it, and the test's name (the shared `cred`
    fixture's) holds the very words these tests look for."""
    return secrets.token_hex(16)


@pytest.fixture
def trusted(certs, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["bundle"]))


def through(kind: str, url: str, cred: str) -> list:
    """A funding mod, a keyless charge, a tot and a past through `url` with
    the client `kind`: what each returned."""
    if kind == "sync":
        with AccManSyncClient(url, TOKEN, retries=0) as acc:
            return [acc.mod(cred, 10), acc.mod(cred, -3), acc.tot(cred),
                    [e.by for e in acc.past(cred).entries]]

    async def go():
        async with AccManClient(url, TOKEN, retries=0) as acc:
            return [await acc.mod(cred, 10), await acc.mod(cred, -3), await acc.tot(cred),
                    [e.by for e in (await acc.past(cred)).entries]]
    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_calls_through_https_with_a_private_ca(accman, front, trusted, cred, kind):
    assert through(kind, front.url, cred) == [(10, 1), (7, 2), 7, [-3, 10]]
    assert front.served == 1


def test_the_command_line_calls_through_https_with_a_private_ca(accman, front, certs, cred):
    env = {"SSL_CERT_FILE": certs["bundle"], "ACCMAN_URL": front.url, "ACCMAN_TOKEN": TOKEN}
    outs = [run_accman(*args, env=env) for args in
            (("mod", cred, "10"), ("tot", cred), ("past", cred))]
    assert [p.returncode for p in outs] == [0, 0, 0], [p.stderr for p in outs]
    assert json.loads(outs[0].stdout) == {"tot": 10, "seq": 1}
    assert json.loads(outs[1].stdout) == {"tot": 10}
    assert [e["by"] for e in json.loads(outs[2].stdout)["past"]] == [10]


def charges_one(accman, front, cred, **options) -> None:
    """A middleware of `options` in front of an app charges `cred` (funded
    with 5) 1 through the https proxy `front`."""
    accman.mod(cred, 5, token=TOKEN)
    m = AccManMiddleware(make_app(), url=front.url, token=TOKEN, retries=0, **options)

    async def go():
        reply = await call(m, cred=cred)
        assert await m.drain(2.0)
        await m.aclose()
        return reply
    reply = asyncio.run(go())
    assert reply.status == 200 and m.stats["charged"] == 1
    assert accman.tot(cred, token=TOKEN) == 4


def test_the_middleware_charges_through_https_with_a_private_ca(accman, front, trusted, cred):
    charges_one(accman, front, cred)


REFUSED = [("stranger", "self-signed certificate"),
           ("other", "IP address mismatch, certificate is not valid for '127.0.0.1'")]


@pytest.mark.parametrize("front, why", REFUSED, indirect=["front"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_certificate_not_trusted_for_the_host_is_nothing_sent(accman, front, trusted, cred,
                                                               kind, why):
    """The handshake fails before any request is written: a keyless mod is
    `Unreachable` (not applied, safe to repeat), never an unknown outcome,
    and the error names the check that failed."""
    accman.mod(cred, 10, token=TOKEN)
    with pytest.raises(Unreachable) as e:
        through(kind, front.url, cred)
    assert not may_have_landed(e.value)
    assert "certificate verify failed" in e.value.detail and why in e.value.detail
    assert front.served == 0 and accman.tot(cred, token=TOKEN) == 10


@pytest.mark.parametrize("front, why, hint", [
    ("stranger", "self-signed certificate", True),
    ("other", "IP address mismatch", False)], indirect=["front"])
def test_the_command_line_says_an_untrusted_certificate_sent_nothing(accman, front, certs, cred,
                                                                     why, hint):
    """A certificate whose issuer is not trusted names SSL_CERT_FILE, the
    command line's only way to a private CA; one for another host does
    not (its CA is trusted: the URL's host is what is wrong)."""
    proc = run_accman("mod", cred, "-1", "--url", front.url, "--token", TOKEN,
                      env={"SSL_CERT_FILE": certs["bundle"]})
    assert proc.returncode == 3 and proc.stdout == ""
    assert f"certificate verify failed: {why}" in proc.stderr
    assert proc.stderr.rstrip().endswith("nothing was sent"), proc.stderr
    assert ("a private CA is trusted by naming its PEM file in SSL_CERT_FILE"
            in proc.stderr) is hint, proc.stderr
    assert front.served == 0


def test_the_command_line_says_an_https_url_that_reached_plain_http(accman, cred):
    """`--url https://` to a server that answers plain HTTP said OpenSSL's
    `[SSL: WRONG_VERSION_NUMBER] wrong version number` and no more: the
    line now says what answered does not speak TLS."""
    url = accman.url.replace("http://", "https://")
    proc = run_accman("tot", cred, "--url", url, "--token", TOKEN)
    assert proc.returncode == 3 and proc.stdout == ""
    assert "wrong version number" in proc.stderr, proc.stderr
    assert "(what answered does not speak TLS: is it an http:// URL?)" in proc.stderr
    assert proc.stderr.rstrip().endswith("nothing was sent"), proc.stderr


@pytest.mark.parametrize("front", ["stranger"], indirect=True)
def test_the_middleware_refuses_503_when_the_certificate_is_not_trusted(accman, front, trusted,
                                                                        cred, caplog):
    accman.mod(cred, 5, token=TOKEN)
    m = AccManMiddleware(make_app(), url=front.url, token=TOKEN, retries=0)

    async def go():
        reply = await call(m, cred=cred)
        await m.aclose()
        return reply
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        reply = asyncio.run(go())
    assert reply.status == 503 and m.stats["refused_unavailable"] == 1
    assert "certificate verify failed: self-signed certificate" in caplog.text
    assert front.served == 0 and accman.tot(cred, token=TOKEN) == 5


_DOTTED = """
import asyncio, sys
from accman.client import AccManClient, AccManSyncClient
url, token = sys.argv[1:]
with AccManSyncClient(url, token, retries=0) as acc:
    print(acc.mod("dotted", 1)[0])

async def go():
    async with AccManClient(url, token, retries=0) as acc:
        print((await acc.mod("dotted", 1))[0])
asyncio.run(go())
"""


@pytest.mark.parametrize("front", ["dotted"], indirect=True)
def test_a_host_with_the_root_s_dot_is_named_to_tls_without_it(accman, front, certs, tmp_path):
    """`https://accman.test.:PORT` (a fully qualified name) is given to TLS
    as `accman.test`, as the SNI name (RFC 6066 3: no trailing dot) and as
    the name the certificate is checked for, by both clients.  The name
    resolves in a process whose /etc/hosts is its own (as
    test_webhooks's root's-dot test)."""
    (tmp_path / "hosts").write_text("127.0.0.1 localhost accman.test.\n")
    url = f"https://accman.test.:{front.port}"
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
         str(tmp_path / "hosts"), PYTHON, "-c", _DOTTED, url, TOKEN],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={"SSL_CERT_FILE": str(certs["bundle"]), "PYTHONPATH": str(ROOT),
             "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert out.returncode == 0 and out.stdout == "1\n2\n", out.stderr
    assert front.names == ["accman.test", "accman.test"]


@pytest.fixture
def untrusted(monkeypatch):
    """No process-wide trust of the private CA: only the default bundle."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def mod_and_tot(kind: str, url: str, cred: str, **options) -> list:
    """A funding mod and a tot through `url` with the client `kind`."""
    if kind == "sync":
        with AccManSyncClient(url, TOKEN, retries=0, **options) as acc:
            return [acc.mod(cred, 10), acc.tot(cred)]

    async def go():
        async with AccManClient(url, TOKEN, retries=0, **options) as acc:
            return [await acc.mod(cred, 10), await acc.tot(cred)]
    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_trusts_a_private_ca_through_its_own_ssl_context(accman, front, certs, untrusted,
                                                                  cred, kind):
    """`ssl_context` trusts the private CA for this client alone, with no
    SSL_CERT_FILE: without it the same call is refused as untrusted."""
    with pytest.raises(Unreachable, match="certificate verify failed"):
        mod_and_tot(kind, front.url, cred)
    assert front.served == 0
    ctx = ssl.create_default_context(cafile=str(certs["bundle"]))
    assert mod_and_tot(kind, front.url, cred, ssl_context=ctx) == [(10, 1), 10]
    assert front.served == 1


def test_the_middleware_passes_its_ssl_context_to_its_client(accman, front, certs, untrusted,
                                                             cred):
    ctx = ssl.create_default_context(cafile=str(certs["bundle"]))
    charges_one(accman, front, cred, ssl_context=ctx)


@pytest.mark.parametrize("make", [AccManClient, AccManSyncClient,
                                  lambda url, token, **kw: AccManMiddleware(make_app(), url, token,
                                                                            **kw)])
def test_an_ssl_context_that_is_not_one_or_would_go_unused_is_refused(make, certs):
    with pytest.raises(TypeError, match="ssl_context must be an ssl.SSLContext or None, not str"):
        make("https://127.0.0.1:1", TOKEN, ssl_context=str(certs["bundle"]))
    with pytest.raises(ValueError, match="ssl_context is for an https:// url; "
                                         "http://127.0.0.1:1 is http://"):
        make("http://127.0.0.1:1", TOKEN, ssl_context=ssl.create_default_context())


def test_the_middleware_refuses_an_ssl_context_beside_a_client_of_its_own():
    """It would go unused: the given client's trust is its own."""
    acc = AccManClient("https://127.0.0.1:1", TOKEN)
    with pytest.raises(ValueError, match="ssl_context is the client's: with client given"):
        AccManMiddleware(make_app(), client=acc, ssl_context=ssl.create_default_context())
