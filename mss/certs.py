"""`mss certs`: a local CA and one certificate per role, for tests and small clusters.

Writes into one folder (the `security.tls_dir` every role reads):

- `ca.crt`, `ca.key`: the cluster's CA. Keep `ca.key` off the serving machines;
  it is needed only to issue certificates.
- `<role>.crt`, `<role>.key` for controller, scheduler, replica, gateway and
  admin: the common name is the role, which is what servers admit callers by.
  The controller's and replica's also name `controller.mss.internal` and
  `replica.mss.internal`, the names their clients check.
- `https.crt`, `https.key`: the gateway's HTTPS certificate for
  `localhost`, `127.0.0.1` and every `--hosts` name.

With the CA already in the folder, the command issues new role certificates
from it (renewal: run it again before `--days` pass, then restart each
process); `--new-ca` replaces the CA too. Keys are ECDSA P-256, files mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mss.config import cache_dir
from mss.security import ROLES, SERVER_NAMES

CA_DAYS = 3650
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates start this long before now, so a peer whose clock is behind accepts them."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="folder to write (default <cache>/tls)")
    parser.add_argument("--days", type=int, default=365, help="validity of role certificates")
    parser.add_argument(
        "--hosts",
        default="",
        help="comma-separated names and addresses for the HTTPS certificate "
        "(and the controller's and replicas', for tools that dial them by address)",
    )
    parser.add_argument("--new-ca", action="store_true", help="replace the CA in the folder")


def run(args: argparse.Namespace) -> int:
    out = Path(os.path.expanduser(args.out)) if args.out else cache_dir() / "tls"
    if args.days < 1:
        sys.stderr.write("mss certs: --days must be at least 1\n")
        return 2
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"
    now = datetime.datetime.now(datetime.UTC)
    if args.new_ca or not (ca_cert_path.exists() and ca_key_path.exists()):
        ca_cert, ca_key = make_ca(now)
        write_pair(out, "ca", ca_cert, ca_key)
        sys.stdout.write(f"new CA in {ca_cert_path}\n")
    else:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            sys.stderr.write(f"mss certs: {ca_key_path} is not an ECDSA key\n")
            return 2
        ca_key = loaded
        sys.stdout.write(f"issuing from the CA in {ca_cert_path}\n")
    for role in ROLES:
        names = [SERVER_NAMES[role], *hosts] if role in SERVER_NAMES else []
        cert, key = issue(ca_cert, ca_key, role, names, now, args.days)
        write_pair(out, role, cert, key)
    cert, key = issue(ca_cert, ca_key, "https", ["localhost", "127.0.0.1", *hosts], now, args.days)
    write_pair(out, "https", cert, key)
    until = now + datetime.timedelta(days=args.days)
    sys.stdout.write(
        f"wrote {', '.join(ROLES)} and https certificates to {out}, valid until "
        f"{until:%Y-%m-%d}\nuse them with `security.tls_dir: {out}` (or --tls-dir {out})\n"
    )
    return 0


def make_ca(
    now: datetime.datetime, days: int = CA_DAYS, name: str = "mss cluster CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    names: list[str],
    now: datetime.datetime,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `common_name`, usable as client and server, naming `names` (DNS or IP).

    `now` and `days` set the validity window (`days` may be negative, to make an
    expired certificate for a test).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    end = now + datetime.timedelta(days=days)
    start = min(now, end) - CLOCK_SKEW - datetime.timedelta(days=1 if days < 0 else 0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_pair(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    """`<stem>.crt` and `<stem>.key` (PEM, unencrypted key, both mode 0600) in `folder`."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path, data in (
        (folder / f"{stem}.key", key_pem),
        (folder / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
