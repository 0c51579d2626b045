import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedlegend.engine.flower.certs import write_certs
from fedlegend.cli import main


def test_server_cert_signed_by_ca_with_hosts(tmp_path):
    files = write_certs(tmp_path, ["localhost", "127.0.0.1", "link.example"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    srv = x509.load_pem_x509_certificate(files["server.pem"].read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (files["ca.key"].stat().st_mode & 0o777) == 0o600 and (files["server.key"].stat().st_mode & 0o777) == 0o600
    assert isinstance(srv.public_key(), ec.EllipticCurvePublicKey)


def test_certs_command_refuses_to_overwrite(tmp_path, capsys):
    assert main(["certs", str(tmp_path / "c")]) == 0
    assert main(["certs", str(tmp_path / "c")]) == 2
    assert "ca.key exists" in capsys.readouterr().err


def test_supernode_keys_load_as_flower_loads_them(tmp_path, capsys):
    """EC (NIST P-384) key pairs in OpenSSH format, as flower-supernode and `flwr supernode register` read them."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from fedlegend.engine.flower.flwr_compat import try_load_public_key

    files = write_certs(tmp_path, supernodes=2)
    assert {"supernode-0.key", "supernode-0.pub", "supernode-1.key", "supernode-1.pub"} <= set(files)
    for i in range(2):
        private = load_ssh_private_key(files[f"supernode-{i}.key"].read_bytes(), password=None)
        public = load_ssh_public_key(files[f"supernode-{i}.pub"].read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (files[f"supernode-{i}.key"].stat().st_mode & 0o777) == 0o600
        assert try_load_public_key(files[f"supernode-{i}.pub"])
    assert main(["certs", str(tmp_path), "--supernodes", "1", "--keys-only", "--first", "2"]) == 0
    assert (tmp_path / "supernode-2.pub").exists()
    assert main(["certs", str(tmp_path), "--supernodes", "1", "--keys-only", "--first", "2"]) == 2
    assert "supernode-2.key exists" in capsys.readouterr().err
