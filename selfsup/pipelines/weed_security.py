"""Keys and certificates of the embedded S3 server (seaweed.py): weed's `security.toml` and the
private CA behind its mutual TLS, made once per install, files 0600."""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client")


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC


def make_tls(directory: Path) -> None:
    """A private CA and one certificate (server and client use) it signs, for weed's mutual TLS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(days=1), not_valid_after=now + datetime.timedelta(days=3650))

    def build(subject, issuer, public_key):
        b = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        b = b.serial_number(x509.random_serial_number())
        return b.not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "selfsup embedded S3 CA")])
    ca = build(ca_name, ca_name, ca_key.public_key()).add_extension(
        x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256())
    cert = (build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "selfsup")]), ca_name, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    write_private(directory / "ca.crt", ca.public_bytes(pem))
    write_private(directory / "tls.crt", cert.public_bytes(pem))
    write_private(directory / "tls.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))


def security_toml(tls: Path) -> str:
    """weed reads ./security.toml: JWT keys for filer and volume HTTP, TLS with client
    certificates for the master's and the volume server's HTTP and every gRPC port."""
    lines = []
    for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
        lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"', ""]
    lines += ["[access]", "ui = false", "", "[grpc]", f'ca = "{tls / "ca.crt"}"', ""]
    for comp in GRPC_COMPONENTS:
        lines += [f"[grpc.{comp}]", f'cert = "{tls / "tls.crt"}"', f'key = "{tls / "tls.key"}"', ""]
    # TLS with client certificates on the master's and the volume server's HTTP (the volume's
    # /status lists buckets, object counts and sizes to anyone), and weed's own clients use them
    for server in ("master", "volume"):
        lines += [f"[https.{server}]", f'cert = "{tls / "tls.crt"}"', f'key = "{tls / "tls.key"}"',
                  f'ca = "{tls / "ca.crt"}"', ""]
    lines += ["[https.client]", "enabled = true", f'cert = "{tls / "tls.crt"}"', f'key = "{tls / "tls.key"}"',
              f'ca = "{tls / "ca.crt"}"', ""]
    return "\n".join(lines)
