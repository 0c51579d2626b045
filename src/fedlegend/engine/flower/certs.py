"""TLS and SuperNode-authentication material for a Flower federation.

`fedlegend certs DIR` writes ca.crt / ca.key (keep ca.key private) and server.pem /
server.key for flower-superlink; SuperNodes and `flwr run` trust ca.crt.
`--supernodes N` also writes one EC key pair per SuperNode (Flower 1.41 SuperNode
authentication): supernode-I.key (OpenSSH private key, stays on device I's machine, for
`flower-supernode --auth-supernode-private-key`) and supernode-I.pub (OpenSSH public key,
registered on the SuperLink with `flwr supernode register supernode-I.pub LINK`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlegend"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IP entries, anything else as DNS names (gRPC/HTTP clients check either)."""
    entries: list[x509.GeneralName] = []
    for h in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _builder(subject: x509.Name, issuer: x509.Name, key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def make_ca(days: int = 365):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name("fedlegend CA"), _name("fedlegend CA"), key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, hosts: list[str], days: int = 365):
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(hosts[0]), ca_cert.subject, key, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    path.write_bytes(data)
    path.chmod(0o600 if private else 0o644)


def make_supernode_key() -> tuple[bytes, bytes]:
    """(private, public) OpenSSH-encoded keys of one SuperNode: EC P-384, a NIST curve as Flower requires."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def supernode_key_paths(out_dir: str | Path, device: int) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"supernode-{device}.key", out / f"supernode-{device}.pub"


def write_supernode_keys(out_dir: str | Path, devices: Iterable[int]) -> dict[str, Path]:
    """supernode-I.key / supernode-I.pub for each device I; refuses to overwrite an existing key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    devices = list(devices)
    for dev in devices:
        if (path := supernode_key_paths(out, dev)[0]).exists():
            raise FileExistsError(f"{path} exists; delete it to make a new key for SuperNode {dev}")
    files: dict[str, Path] = {}
    for dev in devices:
        private, public = make_supernode_key()
        key_path, pub_path = supernode_key_paths(out, dev)
        _write(key_path, private, True)
        _write(pub_path, public, False)
        files[key_path.name], files[pub_path.name] = key_path, pub_path
    return files


def write_certs(out_dir: str | Path, hosts: list[str] | None = None, days: int = 365,
                supernodes: int = 0) -> dict[str, Path]:
    """ca.crt, ca.key, server.pem, server.key (and `supernodes` SuperNode key pairs) in out_dir;
    refuses to overwrite an existing CA key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.key").exists():
        raise FileExistsError(f"{out / 'ca.key'} exists; pick another folder or delete the old certificates")
    hosts = hosts or ["localhost", "127.0.0.1", "::1"]
    ca_key, ca_cert = make_ca(days)
    key, cert = make_server_cert(ca_key, ca_cert, hosts, days)
    pem = serialization.Encoding.PEM
    files = {"ca.crt": (ca_cert.public_bytes(pem), False), "ca.key": (_key_pem(ca_key), True),
             "server.pem": (cert.public_bytes(pem), False), "server.key": (_key_pem(key), True)}
    for name, (data, private) in files.items():
        _write(out / name, data, private)
    return {**{name: out / name for name in files}, **write_supernode_keys(out, range(supernodes))}
