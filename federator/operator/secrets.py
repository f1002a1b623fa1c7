"""The credentials of a Federation: a CA, the server's certificate, and one token per client identity.

Generated once by the operator and kept: `desired_credentials` keeps every value that already exists and
only adds what is missing (or drops the token of a silo that is gone), so a reconcile never rotates a
certificate or a token by accident. The randomness is injected, so the merge logic is a pure function.
"""

from __future__ import annotations

import datetime
import secrets as _random
from collections.abc import Callable, Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federator import tokens

CA_CERT = "ca.crt"
TLS_CERT = "tls.crt"
TLS_KEY = "tls.key"
WORKER_TOKEN = "worker-token"
TOKENS = "tokens"  # every accepted token, in federator/tokens.py's format: what the server reads
SILO_TOKEN_PREFIX = "token-"
TLS_KEYS = (CA_CERT, TLS_CERT, TLS_KEY)
CERT_DAYS = 3650

TlsFactory = Callable[[list[str]], dict[str, str]]
TokenFactory = Callable[[], str]


def silo_token_key(silo: str) -> str:
    return f"{SILO_TOKEN_PREFIX}{silo}"


def new_token() -> str:
    return _random.token_urlsafe(32)


def server_dns_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def generate_tls(dns_names: list[str], *, now: datetime.datetime | None = None) -> dict[str, str]:
    """A fresh CA and a server certificate signed by it (ECDSA P-256), as PEM text.

    The CA's private key is not returned: nothing needs to sign a second certificate, so nothing keeps it.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"federator-ca {dns_names[0]}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        CA_CERT: ca_cert.public_bytes(pem).decode(),
        TLS_CERT: cert.public_bytes(pem).decode(),
        TLS_KEY: key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    }


def tokens_file(data: Mapping[str, str]) -> str:
    """The server's tokens file (federator/tokens.py): the worker token and each silo's token by name.

    Binding a silo's token to its name means one silo's token cannot be used to join as another.
    """
    workers = (data[WORKER_TOKEN],) if data.get(WORKER_TOKEN) else ()
    silos = {k.removeprefix(SILO_TOKEN_PREFIX): v for k, v in data.items() if k.startswith(SILO_TOKEN_PREFIX)}
    return tokens.dumps(tokens.Tokens(workers, silos))


def desired_credentials(
    existing: Mapping[str, str],
    silos: Iterable[str],
    *,
    dns_names: list[str],
    prune: bool = True,
    tls: TlsFactory = generate_tls,
    token: TokenFactory = new_token,
) -> dict[str, str]:
    """The Secret's content: what exists is kept, what is missing is generated.

    `silos` are the FederatedClients bound to the Federation; with `prune`, the tokens of silos that are
    no longer listed are dropped (revoked). Without it (a FederatedClient adding itself), none is dropped.
    """
    out = dict(existing)
    if not all(out.get(k) for k in TLS_KEYS):
        out.update(tls(dns_names))
    if not out.get(WORKER_TOKEN):
        out[WORKER_TOKEN] = token()
    wanted = {silo_token_key(s) for s in silos}
    for key in sorted(wanted):
        if not out.get(key):
            out[key] = token()
    if prune:
        for key in [k for k in out if k.startswith(SILO_TOKEN_PREFIX) and k not in wanted]:
            del out[key]
    out[TOKENS] = tokens_file(out)
    return out


def without_silo(existing: Mapping[str, str], silo: str) -> dict[str, str]:
    """The Secret's content with one silo's token revoked."""
    out = {k: v for k, v in existing.items() if k != silo_token_key(silo)}
    out[TOKENS] = tokens_file(out)
    return out
