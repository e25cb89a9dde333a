"""The lab VM (vagrant/), checked as far as a machine without a hypervisor can: the Vagrantfile
validates for one and two VMs and refuses bad settings; the CA it makes on the host for two VMs
is one our agents load and issue from; and the provisioning script runs to completion, twice
(idempotent), in a fresh Debian 12 container made from the same base as the box, with the
kernel checked, bpffs mounted, the project set up and the capture programs compiled and
loaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests import podman
from ztunnel.ca import CertificateAuthority
from ztunnel.identity import SpiffeId

ROOT = Path(__file__).resolve().parents[2]
# What the Vagrantfile's rsync leaves out, left out of the copies here too.
EXCLUDE = shutil.ignore_patterns(
    ".venv", ".git", "build", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
    ".hypothesis", "results", ".vagrant", ".lab-ca", "*.egg-info",
)  # fmt: skip
PROVISION_TIMEOUT = 1500.0


def repo_copy(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=EXCLUDE, symlinks=True)
    return dest


def vagrant(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant is not installed (scripts/setup.sh installs it)")
    return subprocess.run(
        ["vagrant", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", **env},
    )


@pytest.fixture(scope="module")
def vagrant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vagrant/ in a copy of the repository (`vagrant` writes .vagrant/ and .lab-ca/ there)."""
    return repo_copy(tmp_path_factory.mktemp("vagrant") / "repo") / "vagrant"


@pytest.mark.unit
@pytest.mark.parametrize(("nodes", "names"), [("1", ["ztunnel-lab"]), ("2", ["node1", "node2"])])
def test_vagrantfile_validates(vagrant_dir: Path, nodes: str, names: list[str]) -> None:
    done = vagrant(["validate", "--ignore-provider"], vagrant_dir, ZTUNNEL_VM_NODES=nodes)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout
    for name in names:
        assert f"==> {name}:" in done.stdout


@pytest.mark.unit
def test_bad_vm_setting_is_refused_by_name(vagrant_dir: Path) -> None:
    done = vagrant(["validate", "--ignore-provider"], vagrant_dir, ZTUNNEL_VM_MEMORY="512")
    assert done.returncode != 0
    assert "ZTUNNEL_VM_MEMORY must be an integer in 2048..262144" in done.stdout + done.stderr


@pytest.mark.unit
def test_the_two_vm_ca_made_on_the_host_works_for_our_agents(vagrant_dir: Path) -> None:
    ca_dir = vagrant_dir / ".lab-ca"
    if not ca_dir.exists():  # made by `vagrant validate` with two VMs (test above)
        vagrant(["validate", "--ignore-provider"], vagrant_dir, ZTUNNEL_VM_NODES="2")
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o077 == 0, "the CA key is readable by others"
    ca = CertificateAuthority.load(ca_dir)
    issued = ca.issue(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/echo"))
    leaf = x509.load_pem_x509_certificate(issued.chain_pem[0])
    root = x509.load_pem_x509_certificate(issued.roots_pem[0])
    leaf.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


@pytest.mark.image
@pytest.mark.timeout(PROVISION_TIMEOUT + 60)
def test_provisioning_completes_in_a_fresh_debian_container(tmp_path: Path) -> None:
    base = podman.base_image()  # the mmdebstrap Debian 12 base of the image build
    repo = repo_copy(tmp_path / "ztunnel")
    argv = [
        "run", "--rm", "--privileged", "--network", "host",
        "--volume", f"{repo}:/ztunnel",
    ]  # fmt: skip
    # apt may take what this machine has downloaded already; the host's copy stays untouched.
    if Path("/var/cache/apt/archives").is_dir():
        argv += ["--volume", "/var/cache/apt/archives:/var/cache/apt/archives:O"]
    # This machine's own TLS trust settings (a proxy's CA, say) carry over, as --network does.
    trust = [v for v in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE") if os.environ.get(v)]
    bundle = Path(os.environ[trust[0]]) if trust else None
    if bundle is not None and bundle.is_file():
        argv += ["--volume", f"{bundle}:/run/host-ca.pem:ro"]
        argv += [a for v in trust for a in ("--env", f"{v}=/run/host-ca.pem")]
    script = (
        "/ztunnel/vagrant/provision.sh all && echo '@@ again' && /ztunnel/vagrant/provision.sh all"
    )
    t0 = time.monotonic()
    done = podman.podman(
        [*argv, base, "bash", "-c", script], timeout=PROVISION_TIMEOUT, check=False
    )
    podman.TIMINGS["provisioning in a container"] = time.monotonic() - t0
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    first, _, second = done.stdout.partition("@@ again")
    for step in ("kernel", "bpffs", "setup", "check"):
        assert f"provision[{step}]:" in first and f"provision[{step}]:" in second, step
    assert "nothing to do" in first  # this kernel has 6.x and BTF: no reboot dance
    assert "capture programs compiled and loaded" in first
    assert "installing system packages" in first
    assert "installing system packages" not in second  # idempotent
    assert (repo / ".venv" / "bin" / "ztunnel").exists()
    print(f"\nprovisioning in a container: {podman.TIMINGS['provisioning in a container']:.0f}s")
