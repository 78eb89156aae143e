"""Keys and certificates for a deployment: formats Flower reads, 0600 private keys, no silent overwrite."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from fedtune.cli import main
from fedtune.common.operations import keys as pki


def _names_host(out, host: str) -> bool:
    """Whether ``server.crt`` in ``out`` names ``host`` and is signed by ``ca.crt`` there."""
    import ipaddress

    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    try:
        return ipaddress.ip_address(host) in sans.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host in sans.get_values_for_type(x509.DNSName)


def test_init_makes_a_ca_a_server_cert_with_sans_and_node_keys(tmp_path, capsys):
    assert main(["keys", "init", "--out", str(tmp_path), "--host", "127.0.0.1", "--host", "fl.example.org",
                 "--node", "org-a"]) == 0
    for f in ("ca.key", "server.key", "nodes/org-a.key"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o600, f
    assert _names_host(tmp_path, "127.0.0.1") and _names_host(tmp_path, "fl.example.org")
    assert not _names_host(tmp_path, "10.9.9.9")
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # SuperNode keys: what flower-supernode (load_ssh_private_key) and `flwr supernode register` read
    priv = load_ssh_private_key((tmp_path / "nodes" / "org-a.key").read_bytes(), password=None)
    pub = load_ssh_public_key((tmp_path / "nodes" / "org-a.pub").read_bytes().rsplit(b" ", 1)[0])
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()


def test_existing_keys_are_never_overwritten_without_force(tmp_path, capsys):
    assert main(["keys", "node", "--out", str(tmp_path), "--node", "org-a"]) == 0
    before = (tmp_path / "nodes" / "org-a.key").read_bytes()
    code = main(["keys", "node", "--out", str(tmp_path), "--node", "org-a"])
    err = capsys.readouterr().err
    assert code == 1 and "refusing to overwrite" in err and "--force" in err
    assert (tmp_path / "nodes" / "org-a.key").read_bytes() == before
    assert main(["keys", "node", "--out", str(tmp_path), "--node", "org-a", "--force"]) == 0
    assert (tmp_path / "nodes" / "org-a.key").read_bytes() != before


def test_server_cert_needs_the_ca(tmp_path):
    with pytest.raises(pki.KeyFileError, match="fedtune keys init"):
        pki.make_server_cert(tmp_path, hosts=["127.0.0.1"])


def test_keys_fingerprint_prints_what_ssh_keygen_prints(tmp_path, capsys):
    """What two organizations read to each other to check a key they exchanged (OpenSSH's SHA256 fingerprint)."""
    import base64
    import hashlib

    from fedtune.cli import main

    assert main(["keys", "node", "--out", str(tmp_path), "--node", "clinic-b", "--node", "lab-c"]) == 0
    capsys.readouterr()
    assert main(["keys", "fingerprint", str(tmp_path / "nodes")]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    for name in ("clinic-b", "lab-c"):
        blob = base64.b64decode((tmp_path / "nodes" / f"{name}.pub").read_text().split()[1])
        assert printed[name] == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert main(["keys", "fingerprint"]) == 1
