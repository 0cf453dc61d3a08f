"""Real IMDS clients nobody on this project wrote, installed from the registries into a cache, and how to run them.

Each client fetches what it normally fetches from 169.254.169.254 with its own defaults (no endpoint override),
and prints one recognisable value: an access key id, the role name, or the instance id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("IMDS_TEST_CACHE", "/var/cache/imds-agent-test")) / "e2e"
CLIENT_VENV = CACHE / "clients"
MINISTACK_VENV = CACHE / "ministack"
NODE_DIR = CACHE / "node"
PIP_CLIENTS = ("requests", "boto3", "awscli", "ec2-metadata")
NPM_CLIENTS = ("@aws-sdk/credential-providers", "@aws-sdk/ec2-metadata-service", "node-ec2-metadata")
APT_CLIENTS = ("cloud-init", "libvm-ec2-security-credentialcache-perl", "curl")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}

ACCESS_KEY = r"\bASIA[A-Z0-9]{12,}\b"
INSTANCE_ID = r"\bi-[0-9a-f]{8,17}\b"
ROLE = r"^[\w+=,.@-]+-role$"

PY = str(CLIENT_VENV / "bin" / "python")
CREDS_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
NODE_CATCH = ".catch(e => { console.error(String(e)); process.exit(1); })"


@dataclass(frozen=True)
class Client:
    """One client: how to run it and what its success looks like."""

    name: str
    argv: tuple[str, ...]
    expect: str  # a regex its output matches when it got what it asked for
    speaks: str  # what the client sends: v1, v2, v2-then-v1


CLIENTS = (
    Client("curl", ("curl", "-sf", "--max-time", "5", CREDS_URL), ROLE, "v1"),
    Client("python-requests", (PY, "-c",
        "import requests; u = '" + CREDS_URL + "'; r = requests.get(u, timeout=5); r.raise_for_status();"
        " print(requests.get(u + r.text.strip(), timeout=5).json()['AccessKeyId'])"), ACCESS_KEY, "v1"),
    Client("boto3", (PY, "-c",
        "import boto3; c = boto3.Session(region_name='eu-west-1').get_credentials();"
        " print(c.get_frozen_credentials().access_key)"), ACCESS_KEY, "v2-then-v1"),
    Client("awscli-v1", (str(CLIENT_VENV / "bin" / "aws"), "configure", "list"), r"iam-role", "v2-then-v1"),
    Client("ec2-metadata", (PY, "-c",
        "from ec2_metadata import ec2_metadata; print(ec2_metadata.instance_id, ec2_metadata.region)"),
        INSTANCE_ID, "v2"),
    Client("cloud-init", ("/usr/bin/python3", "-c",
        "from cloudinit.sources.helpers import ec2\n"
        "md = ec2.get_instance_metadata('2021-03-23', 'http://169.254.169.254', timeout=3, retries=0)\n"
        "print(md['instance-id'])"), INSTANCE_ID, "v1"),
    Client("node-credential-providers", ("node", "-e",
        "require('@aws-sdk/credential-providers').fromInstanceMetadata({timeout: 3000, maxRetries: 0})()"
        ".then(c => console.log(c.accessKeyId))" + NODE_CATCH), ACCESS_KEY, "v2-then-v1"),
    Client("node-ec2-metadata-service-v1", ("node", "-e",
        "const {MetadataService} = require('@aws-sdk/ec2-metadata-service');"
        "new MetadataService({disableFetchToken: true}).request('/latest/meta-data/instance-id', {})"
        ".then(console.log)" + NODE_CATCH), INSTANCE_ID, "v1"),
    Client("node-ec2-metadata-service", ("node", "-e",
        "const {MetadataService} = require('@aws-sdk/ec2-metadata-service');"
        "new MetadataService({}).request('/latest/meta-data/instance-id', {}).then(console.log)" + NODE_CATCH),
        INSTANCE_ID, "v2"),
    Client("node-ec2-metadata", ("node", "-e",
        "require('node-ec2-metadata').getMetadataForInstance('instance-id').then(console.log)" + NODE_CATCH),
        INSTANCE_ID, "v1"),
    # VM::EC2::Security::CredentialCache (its own Debian package, on top of libvm-ec2-perl): v1 GETs of
    # iam/security-credentials (no trailing slash), then of the role, and it parses the Expiration.
    Client("perl-vm-ec2", ("perl", "-MVM::EC2::Security::CredentialCache", "-e",
        "print VM::EC2::Security::CredentialCache->get->accessKeyId, qq(\\n)"), ACCESS_KEY, "v1"),
)  # fmt: skip


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 900) -> None:
    proc = subprocess.run(argv, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")


def install() -> None:
    """Install every client (and ministack in its own virtual environment) once; later calls return at once."""
    # Distribution packages are checked every time (dpkg -s is cheap); the registries' installs are redone only
    # when the list of clients changes, which the marker records.
    missing = [p for p in APT_CLIENTS if subprocess.run(["dpkg", "-s", p], env=ENV, capture_output=True).returncode]
    if shutil.which("npm", path=ENV["PATH"]) is None:
        missing += ["nodejs", "npm"]  # Debian's, where the host has no Node.js of its own
    if missing:
        _run(["apt-get", "update", "-q"])
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing])
    marker = CACHE / ".complete"
    wanted = repr((PIP_CLIENTS, NPM_CLIENTS, "ministack"))
    if marker.exists() and marker.read_text() == wanted:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    for venv, packages in ((CLIENT_VENV, PIP_CLIENTS), (MINISTACK_VENV, ("ministack",))):
        if not (venv / "bin" / "python").exists():
            _run(["/usr/bin/python3", "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "pip"), "install", "-q", *packages])
    NODE_DIR.mkdir(exist_ok=True)
    if not (NODE_DIR / "package.json").exists():
        _run(["npm", "init", "-y"], cwd=NODE_DIR)
    _run(["npm", "install", "--silent", "--no-audit", "--no-fund", *NPM_CLIENTS], cwd=NODE_DIR)
    for path in (CACHE, CLIENT_VENV, NODE_DIR):
        os.chmod(path, 0o755)
    marker.write_text(wanted)
