"""Who may talk to whom inside the cluster: the cluster token, TLS files and roles.

Every gRPC link is authenticated unless `security.insecure` is set:

- **Cluster token.** A random secret in a file (`security.token_file`, by
  default `<cache>/cluster.token`, created with mode 0600 by the first process
  that needs it). Every call carries it as `authorization: Bearer <token>`;
  servers compare it in constant time. Holding the token makes a process a
  member of the cluster, every role at once; `security.admin_token_file`, when
  set, is a second secret that alone opens the admin calls (Scale, ApplyConfig).
- **Mutual TLS.** With `security.tls_dir` set, every gRPC server and client
  uses TLS with certificates from the cluster's CA (`mss certs` makes them),
  and the certificate's common name is the caller's role: the controller
  accepts registrations only from `scheduler` certificates and admin calls
  only from `admin` ones; replicas accept Generate only from `gateway` ones.
  Servers present certificates naming `controller.mss.internal` or
  `replica.mss.internal`, and clients check for that name rather than the
  address they dialled, so one replica certificate serves every node.

Both can be on at once; each check then applies. This module reads and checks
the files (no gRPC here: the scheduler imports it before gRPC may load); the
gRPC side is `mss.rpc_auth`.
"""

from __future__ import annotations

import argparse
import datetime
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from mss.config import SecuritySettings, cache_dir, with_overrides

log = logging.getLogger(__name__)

ROLES = ("controller", "scheduler", "replica", "gateway", "admin")
"""Certificate common names; each process presents the one of its role."""
SERVER_NAMES = {"controller": "controller.mss.internal", "replica": "replica.mss.internal"}
"""The name a server's certificate carries and its clients check."""
TOKEN_BYTES = 32
MIN_TOKEN_CHARS = 32


class SecurityError(ValueError):
    """Credentials that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TlsFiles:
    """One role's certificate and key, and the CA it and its peers chain to (PEM bytes)."""

    ca: bytes
    cert: bytes
    key: bytes
    directory: str


@dataclass(frozen=True)
class Credentials:
    """What one process proves and checks on its gRPC links."""

    role: str
    token: str | None = None
    """The cluster token; None when authentication is off."""
    admin_token: str | None = None
    tls: TlsFiles | None = None
    token_file: str | None = None
    admin_token_file: str | None = None

    @property
    def insecure(self) -> bool:
        return self.token is None and self.tls is None

    def metadata(self, admin: bool = False) -> tuple[tuple[str, str], ...]:
        """Call metadata: the admin token for admin calls when there is one, else the cluster's."""
        token = (self.admin_token or self.token) if admin else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def token_matches(self, presented: str | None, admin: bool = False) -> bool:
        """Whether `presented` is the expected token, compared in constant time."""
        expected = self.admin_token if admin and self.admin_token else self.token
        if expected is None:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode(), expected.encode())

    def child_arguments(self) -> list[str]:
        """Flags that give a child process (a replica) the same credentials."""
        if self.insecure:
            return ["--insecure"]
        args: list[str] = []
        if self.token_file:
            args += ["--token-file", self.token_file]
        if self.tls is not None:
            args += ["--tls-dir", self.tls.directory]
        return args


def default_token_file() -> Path:
    return cache_dir() / "cluster.token"


def read_or_create_token(path: Path) -> str:
    """The token in `path`; a new random one written there (mode 0600) when it does not exist.

    The new file appears whole or not at all (written aside, then linked into
    place), so processes starting together agree on one token and none reads
    a half-written file.
    """
    if path.exists():
        return read_token(path)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    aside = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        os.link(aside, path)
    except FileExistsError:
        return read_token(path)  # another process made it first
    except OSError as exc:
        raise SecurityError(f"cannot create the cluster token {path}: {exc.strerror}") from exc
    finally:
        aside.unlink(missing_ok=True)
    log.info("created a cluster token in %s; copy it to every machine of this cluster", path)
    return token


def read_token(path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise SecurityError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise SecurityError(
            f"token file {path}: expected one line of at least {MIN_TOKEN_CHARS} characters "
            "without spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if info.st_mode & stat.S_IRWXO:
        log.warning("token file %s is readable by every user; chmod 600 it", path)
    return text


def load_credentials(settings: SecuritySettings, role: str, create: bool = True) -> Credentials:
    """The credentials of a process of `role`, or SecurityError saying what is wrong.

    `create`: make the cluster token when its file does not exist (the roles
    that run the cluster); the admin commands only read it.
    """
    if settings.insecure:
        return Credentials(role=role)
    token_path = Path(os.path.expanduser(settings.token_file or default_token_file()))
    if create:
        token_path.parent.mkdir(parents=True, exist_ok=True)
        token = read_or_create_token(token_path)
    else:
        token = read_token(token_path)
    admin_token = None
    admin_file = None
    if settings.admin_token_file:
        admin_path = Path(os.path.expanduser(settings.admin_token_file))
        admin_token = read_token(admin_path)
        admin_file = str(admin_path)
        if hmac.compare_digest(admin_token.encode(), token.encode()):
            raise SecurityError(
                f"{admin_path} holds the cluster token; the admin token must differ"
            )
    tls = load_tls(settings.tls_dir, role) if settings.tls_dir else None
    return Credentials(
        role=role,
        token=token,
        admin_token=admin_token,
        tls=tls,
        token_file=str(token_path),
        admin_token_file=admin_file,
    )


def load_tls(directory: str, role: str, now: datetime.datetime | None = None) -> TlsFiles:
    """`ca.crt`, `<role>.crt` and `<role>.key` from `directory`, checked before any peer sees them.

    Refused, with the file and the reason: a certificate outside its validity
    window, not signed by the CA, not naming `role`, or not matching its key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    folder = Path(os.path.expanduser(directory))
    paths = {"ca": folder / "ca.crt", "cert": folder / f"{role}.crt", "key": folder / f"{role}.key"}
    data: dict[str, bytes] = {}
    for name, path in paths.items():
        try:
            data[name] = path.read_bytes()
        except OSError as exc:
            hint = " (make them with `mss certs`)" if name != "ca" or not folder.exists() else ""
            raise SecurityError(f"tls: cannot read {path}: {exc.strerror}{hint}") from exc
    try:
        ca = x509.load_pem_x509_certificate(data["ca"])
        cert = x509.load_pem_x509_certificate(data["cert"])
        key = serialization.load_pem_private_key(data["key"], password=None)
    except ValueError as exc:
        raise SecurityError(f"tls: {folder}: not a PEM certificate or key: {exc}") from exc
    now = now or datetime.datetime.now(datetime.UTC)
    for label, c in (("ca.crt", ca), (f"{role}.crt", cert)):
        start, end = c.not_valid_before_utc, c.not_valid_after_utc
        if now > end:
            raise SecurityError(
                f"tls: {folder / label} expired on {end:%Y-%m-%d %H:%M} UTC; renew it (`mss certs`)"
            )
        if now < start:
            raise SecurityError(
                f"tls: {folder / label} is not valid before {start:%Y-%m-%d %H:%M} UTC"
            )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature is not a ValueError
        raise SecurityError(
            f"tls: {paths['cert']} is not signed by the CA in {paths['ca']}"
        ) from exc
    names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if names != [role]:
        raise SecurityError(
            f"tls: {paths['cert']} has CN={', '.join(map(str, names)) or 'none'}; "
            f"the {role} certificate must have CN={role}"
        )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != expected:
        raise SecurityError(f"tls: {paths['key']} is not the key of {paths['cert']}")
    return TlsFiles(ca=data["ca"], cert=data["cert"], key=data["key"], directory=str(folder))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The credential flags every role takes; each overrides the config's `security` block."""
    group = parser.add_argument_group("cluster credentials (docs/security.md)")
    group.add_argument(
        "--token-file",
        help="cluster token (config: security.token_file; default <cache>/cluster.token)",
    )
    group.add_argument(
        "--admin-token-file",
        help="admin token, when admin calls need their own (security.admin_token_file)",
    )
    group.add_argument(
        "--tls-dir",
        help="folder from `mss certs`: mutual TLS on every gRPC link (security.tls_dir)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="no token and no TLS on gRPC links: only for one machine with every port on loopback",
    )


def settings_from(args: argparse.Namespace, settings: SecuritySettings) -> SecuritySettings:
    """`settings` with the command line's credential flags applied (validated; ConfigError)."""
    return with_overrides(
        settings,
        "command line",
        token_file=args.token_file,
        admin_token_file=args.admin_token_file,
        tls_dir=args.tls_dir,
        insecure=args.insecure,
    )


def credentials_from(
    args: argparse.Namespace, settings: SecuritySettings, role: str, create: bool = True
) -> Credentials:
    """The process's credentials from its flags over `settings`; ConfigError or SecurityError."""
    return load_credentials(settings_from(args, settings), role, create)


def describe_credentials(creds: Credentials) -> str:
    """How a process's links are secured, for its start-up log line (never the secrets)."""
    if creds.insecure:
        return "INSECURE: no token, no TLS"
    parts = []
    if creds.token is not None:
        parts.append(f"token from {creds.token_file}")
    if creds.admin_token is not None:
        parts.append(f"admin token from {creds.admin_token_file}")
    if creds.tls is not None:
        parts.append(f"mutual TLS from {creds.tls.directory}")
    return ", ".join(parts)


def local_metadata() -> tuple[tuple[str, str], ...]:
    """Call metadata with this machine's default cluster token (made when missing): for the
    benchmarks and tests, which talk to processes they started here with the defaults."""
    return load_credentials(SecuritySettings(), "admin").metadata()
