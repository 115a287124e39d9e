"""A throwaway CA and a broker certificate for 127.0.0.1/localhost, in PEM files Kafka reads."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CA_SUBJECT = "lattice-embed test CA"
BROKER_SUBJECT = "localhost"
VALID_DAYS = 2


@dataclass(frozen=True)
class TlsFiles:
    """`ca` is the CA certificate (the clients' and the broker's truststore); `keystore` holds
    the broker's unencrypted PKCS#8 key, its certificate and the CA certificate, in that order."""

    ca: Path
    keystore: Path

    def broker_properties(self, listener: str = "sasl_ssl") -> list[str]:
        """server.properties lines that give `listener` this key and trust this CA."""
        prefix = f"listener.name.{listener}."
        return [
            f"{prefix}ssl.keystore.type=PEM",
            f"{prefix}ssl.keystore.location={self.keystore}",
            f"{prefix}ssl.truststore.type=PEM",
            f"{prefix}ssl.truststore.location={self.ca}",
        ]


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate the CA and the broker's key and certificate in `directory`: with the openssl
    command line where there is one, else with the `cryptography` package."""
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("openssl"):
        return _with_openssl(directory)
    return _with_cryptography(directory)


def _with_openssl(d: Path) -> TlsFiles:
    def openssl(*args: str | Path | int) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, cwd=d)

    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "ca.key")
    openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", VALID_DAYS,
        "-subj", f"/CN={CA_SUBJECT}", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl(
        "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "broker.key"
    )
    openssl("req", "-new", "-key", "broker.key", "-subj", f"/CN={BROKER_SUBJECT}", "-out", "b.csr")
    (d / "broker.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    openssl(
        "x509", "-req", "-in", "b.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "2",
        "-sha256", "-days", VALID_DAYS, "-extfile", "broker.ext", "-out", "broker.pem",
    )  # fmt: skip
    # genpkey writes unencrypted PKCS#8 ("BEGIN PRIVATE KEY"), which Kafka's PEM store reads
    # when ssl.key.password is not set.
    keystore = d / "broker-keystore.pem"
    keystore.write_text(
        (d / "broker.key").read_text() + (d / "broker.pem").read_text() + (d / "ca.pem").read_text()
    )
    return TlsFiles(ca=d / "ca.pem", keystore=keystore)


def _with_cryptography(d: Path) -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_SUBJECT)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BROKER_SUBJECT)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    (d / "ca.pem").write_bytes(ca_pem)
    keystore = d / "broker-keystore.pem"
    keystore.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(pem)
        + ca_pem
    )
    return TlsFiles(ca=d / "ca.pem", keystore=keystore)


def _key_usage(**allowed: bool) -> Any:
    from cryptography import x509

    flags = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{flag: allowed.get(flag, False) for flag in flags})
