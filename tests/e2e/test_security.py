"""Who gets in (bearer token, TLS, mutual TLS) and where the server may fetch from."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

import clipserve
from clipserve_server.utils.config import ServerConfig
from clipserve_server.utils.errors import ErrorKind, ItemError
from clipserve_server.images.fetch import FetchSettings, ImageFetcher
from clipserve_server.images.fetch_events import FetchTally
from clipserve_server.images.netguard import ForbiddenAddressError, GuardedResolver

from ..conftest import ServerProcess
from ..helpers import ImageHost, make_image


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture()
def pem_files(tmp_path, ca):
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example.com")
    paths = {}
    for name, blob in (
        ("ca", ca.cert_pem),
        ("server_chain", trustme.Blob(b"".join(b.bytes() for b in server_cert.cert_chain_pems))),
        ("server_key", server_cert.private_key_pem),
        ("client_chain", trustme.Blob(b"".join(b.bytes() for b in client_cert.cert_chain_pems))),
        ("client_key", client_cert.private_key_pem),
    ):
        path = tmp_path / f"{name}.pem"
        blob.write_to_path(str(path))
        paths[name] = str(path)
    return paths


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_a_bearer_token_is_required_but_health_stays_open(make_fake_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = make_fake_server(auth_token_file=str(token_file))
    image = make_image(seed=1)
    path = tmp_path / "x.png"
    path.write_bytes(image)
    for token in (None, "wrong", "s3cret-token-but-longer"):
        with clipserve.CLIP(server.address, auth_token=token) as clip:
            with pytest.raises(clipserve.ClipServeError) as info:
                clip.score("q", str(path))
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(clipserve.ClipServeError) as refused:  # the call as a whole is refused
                clip.score_batch([("q", str(path))])
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert [r.error_code for r in refused.value.results] == ["UNAUTHENTICATED"]
    with clipserve.CLIP(server.address, auth_token="s3cret-token") as clip:
        assert isinstance(clip.score("q", str(path)), float)
        assert clip.score_batch([("q", str(path))])[0].error is None
    with grpc.insecure_channel(server.address) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_tls_serves_clients_that_trust_its_ca(make_fake_server, pem_files, tmp_path):
    server = make_fake_server(tls_cert=pem_files["server_chain"], tls_key=pem_files["server_key"])
    path = tmp_path / "x.png"
    path.write_bytes(make_image(seed=2))
    with clipserve.CLIP(server.address, root_certificates=pem_files["ca"]) as clip:
        assert isinstance(clip.score("q", str(path)), float)
    with clipserve.CLIP(server.address, timeout=3, retry=clipserve.RetryPolicy(max_attempts=1)) as plaintext:
        with pytest.raises(clipserve.ClipServeError) as info:
            plaintext.score("q", str(path))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(make_fake_server, pem_files, tmp_path):
    server = make_fake_server(
        tls_cert=pem_files["server_chain"], tls_key=pem_files["server_key"], tls_client_ca=pem_files["ca"]
    )
    path = tmp_path / "x.png"
    path.write_bytes(make_image(seed=3))
    with clipserve.CLIP(
        server.address, root_certificates=pem_files["ca"], timeout=3, retry=clipserve.RetryPolicy(max_attempts=1)
    ) as anonymous:
        with pytest.raises(clipserve.ClipServeError) as info:
            anonymous.score("q", str(path))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with clipserve.CLIP(
        server.address,
        root_certificates=pem_files["ca"],
        certificate_chain=pem_files["client_chain"],
        private_key=pem_files["client_key"],
    ) as clip:
        assert isinstance(clip.score("q", str(path)), float)


def test_the_client_commands_take_tls_and_token_flags_or_the_token_from_the_environment(
    make_fake_server, pem_files, tmp_path
):
    """README: the client commands take --tls, --tls-ca, --tls-cert, --tls-key and
    --auth-token-file; the token may come from CLIPSERVE_AUTH_TOKEN instead."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = make_fake_server(
        tls_cert=pem_files["server_chain"],
        tls_key=pem_files["server_key"],
        tls_client_ca=pem_files["ca"],
        auth_token_file=str(token_file),
    )
    path = tmp_path / "x.png"
    path.write_bytes(make_image(seed=4))
    client_cert = ["--tls-cert", pem_files["client_chain"], "--tls-key", pem_files["client_key"]]
    # --tls alone trusts the system roots: gRPC reads them from this variable, here our CA.
    system_roots = {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": pem_files["ca"]}

    def score(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if k != "CLIPSERVE_AUTH_TOKEN"}
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "clipserve.cli",
                "score",
                "q",
                str(path),
                "--address",
                server.address,
                "--timeout",
                "20",
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**environment, **(env or {})},
        )

    for done in (
        score("--tls-ca", pem_files["ca"], *client_cert, "--auth-token-file", str(token_file)),
        score("--tls", *client_cert, "--auth-token-file", str(token_file), env=system_roots),
        score("--tls-ca", pem_files["ca"], *client_cert, env={"CLIPSERVE_AUTH_TOKEN": "s3cret-token"}),
    ):
        assert done.returncode == 0, done.stderr
        float(done.stdout.strip())
    refused = score("--tls-ca", pem_files["ca"], *client_cert)  # no token at all
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    wrong = score("--tls-ca", pem_files["ca"], *client_cert, env={"CLIPSERVE_AUTH_TOKEN": "wrong"})
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr, wrong.stderr


# -- the private-network guard, beyond literal addresses -------------------------------------------

class FixedResolver:
    """Resolves every name to one address, as a hostile DNS server might."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host, port=0, family=0):
        return [{"hostname": host, "host": self.address, "port": port, "family": 2, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


def fetch_with(resolver: GuardedResolver, url: str) -> bytes:
    async def main() -> bytes:
        settings = FetchSettings.of(
            ServerConfig(fetch_timeout_s=5, max_image_bytes=1 << 20, max_redirects=3, fetch_concurrency=4)
        )
        fetcher = ImageFetcher(settings, events=FetchTally(), resolver=resolver)
        await fetcher.start()
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.close()

    return asyncio.run(main())


# In these tests 127.0.0.1 (where the image host listens) stands for "public", 127.0.0.2 for private.
def _only_127_0_0_2(address: str) -> bool:
    return address == "127.0.0.2"


def test_a_name_resolving_to_a_private_address_is_refused(image_host):
    port = image_host.base.rsplit(":", 1)[1]
    with pytest.raises(ItemError) as info:
        fetch_with(GuardedResolver(FixedResolver("127.0.0.2"), forbidden=_only_127_0_0_2), f"http://rebind.test:{port}/img/photo0.png")
    # Refused, naming the name: where an internal name points stays in the server's log.
    assert (
        info.value.kind is ErrorKind.FORBIDDEN and "rebind.test resolves to a non-public address" in info.value.message
    )
    assert "127.0.0.2" not in info.value.message


def test_the_connection_goes_to_the_checked_address(image_host):
    """The checked answer is the one connected to: no second lookup can rebind the name."""
    port = image_host.base.rsplit(":", 1)[1]
    body = fetch_with(GuardedResolver(FixedResolver("127.0.0.1"), forbidden=_only_127_0_0_2), f"http://rebind.test:{port}/img/photo0.png")
    assert body == image_host.images["photo0.png"]


class RebindingResolver(FixedResolver):
    """A hostile DNS server: the first answer is public, every later one private."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1")
        self.calls = 0

    async def resolve(self, host, port=0, family=0):
        self.calls += 1
        self.address = "127.0.0.1" if self.calls == 1 else "127.0.0.2"
        return await super().resolve(host, port, family)


def test_dns_rebinding_does_not_get_around_the_guard(image_host):
    """README: the address guard is checked on the address actually connected to, so DNS
    rebinding does not get around it: the name is looked up once, and that checked answer is
    the one connected to (a second lookup would get the private address, where nothing listens)."""
    port = image_host.base.rsplit(":", 1)[1]
    resolver = RebindingResolver()
    body = fetch_with(GuardedResolver(resolver, forbidden=_only_127_0_0_2), f"http://rebind.test:{port}/img/photo0.png")
    assert body == image_host.images["photo0.png"]
    assert resolver.calls == 1


def test_the_real_guard_refuses_a_name_that_resolves_to_cloud_metadata(caplog):
    """The guard as the server runs it (the real is_forbidden): a public-looking name that
    resolves to the link-local metadata address is refused before any connection. The caller
    is told the name was refused; the address it pointed to is in the server's log only."""
    with caplog.at_level("INFO"), pytest.raises(ItemError) as info:
        fetch_with(GuardedResolver(FixedResolver("169.254.169.254")), "http://metadata.test/latest/meta-data/")
    assert (
        info.value.kind is ErrorKind.FORBIDDEN
        and "metadata.test resolves to a non-public address" in info.value.message
    )
    assert "169.254.169.254" not in info.value.message
    assert [r.address for r in caplog.records if hasattr(r, "address")] == ["169.254.169.254"]


def test_the_server_ignores_proxies_from_its_environment():
    """README/fetch.py: the server's fetcher ignores HTTP_PROXY and the like, which would
    otherwise route downloads around the private-network guard (the proxy, not the server,
    would resolve and connect)."""
    proxy = ImageHost()  # answers (404) and counts whatever a proxy would be asked
    variables = {
        name: proxy.base
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    }
    server = ServerProcess(["--model", "fake"], env={**variables, "NO_PROXY": "", "no_proxy": ""})
    try:
        with clipserve.CLIP(server.address, timeout=60) as clip:
            [result] = clip.score_batch([("a dog", "http://images.example.test/img/dog.png")])
        assert result.score is None  # the name does not resolve here: the server tried itself
        assert proxy.hits == {}, proxy.hits
    finally:
        server.terminate()
        proxy.close()


def test_every_redirect_hop_is_checked(image_host):
    port = image_host.base.rsplit(":", 1)[1]
    image_host.redirects["/to-private"] = f"http://127.0.0.2:{port}/img/photo0.png"
    image_host.redirects["/to-private-name"] = f"http://internal.test:{port}/img/photo0.png"
    with pytest.raises(ItemError) as info:
        fetch_with(GuardedResolver(forbidden=_only_127_0_0_2), image_host.url("to-private"))
    assert info.value.kind is ErrorKind.FORBIDDEN and "redirected to" in info.value.message

    class SplitResolver(FixedResolver):
        async def resolve(self, host, port=0, family=0):
            self.address = "127.0.0.2" if host == "internal.test" else "127.0.0.1"
            return await super().resolve(host, port, family)

    with pytest.raises(ItemError) as info:
        fetch_with(GuardedResolver(SplitResolver(""), forbidden=_only_127_0_0_2), f"http://public.test:{port}/to-private-name")
    assert info.value.kind is ErrorKind.FORBIDDEN


def test_the_guard_raises_its_own_error_type():
    async def main():
        return await GuardedResolver(FixedResolver("10.0.0.1")).resolve("x.test", 80)

    with pytest.raises(ForbiddenAddressError):
        asyncio.run(main())
