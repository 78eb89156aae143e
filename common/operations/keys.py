"""What a federation needs on the wire: a CA, the SuperLink's TLS certificate, SuperNode keys.

Everything is made with the ``cryptography`` package: a self-signed CA (ECDSA P-384),
the SuperLink's certificate signed by it with the SuperLink's address(es) as
subject alternative names, and per-organization SuperNode authentication key pairs
in the format Flower 1.41 reads (OpenSSH, ECDSA on NIST P-384). Private keys are
written with mode 0600; an existing file is never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedtune.common.errors import KeyFileError
from fedtune.common.operations.atomic import write_atomic

CURVE = ec.SECP384R1


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> Path:
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key or certificate",
                           "pass --force to replace it (nodes and servers using the old one must be updated), "
                           "or choose another --out directory")
    write_atomic(path, data, mode=0o600 if private else 0o644)  # created 0600: never readable by others meanwhile
    return path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(out: Path, *, days: int = 3650, force: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate authority: ``ca.key`` (0600) and ``ca.crt``."""
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("fedtune CA")).issuer_name(_name("fedtune CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    return (_write(out / "ca.key", _pem_key(key), private=True, force=force),
            _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False, force=force))


def _load_ca(out: Path):
    try:
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    except (OSError, ValueError) as e:
        raise KeyFileError(f"cannot read the CA in {out} ({e.__class__.__name__})",
                           "create it first with `fedtune keys init --out DIR`") from None
    return key, cert


def make_server_cert(out: Path, *, hosts: Sequence[str], days: int = 825, force: bool = False) -> tuple[Path, Path]:
    """``server.key`` (0600) and ``server.crt`` for the SuperLink, valid for ``hosts`` (IPs or DNS names)."""
    if not hosts:
        raise KeyFileError("no address given for the SuperLink's certificate",
                           "pass --host with the address nodes use to reach it (e.g. --host 10.0.0.5 --host fl.example.org)")
    ca_key, ca_cert = _load_ca(out)
    sans: list[x509.GeneralName] = []
    # the SuperLink's own helpers and fedtune's Fleet gateway reach it on 127.0.0.1
    for h in dict.fromkeys([*hosts, "127.0.0.1", "localhost"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return (_write(out / "server.key", _pem_key(key), private=True, force=force),
            _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM), private=False, force=force))


def make_node_keys(out: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: ``<name>.key`` (OpenSSH, 0600) and ``<name>.pub``."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise KeyFileError(f"node name {name!r} is not usable in a file name",
                           "use letters, digits, '-', '_' or '.'")
    key = ec.generate_private_key(CURVE())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (_write(out / f"{name}.key", priv, private=True, force=force),
            _write(out / f"{name}.pub", pub + f" {name}\n".encode(), private=False, force=force))
