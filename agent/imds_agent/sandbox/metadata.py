"""The emulated instance's metadata: a tree shaped like the EC2 metadata service's, with obviously fake values.

Directories are dicts (listed one entry per line, subdirectories with a trailing slash, as the real service does);
leaves are strings. Credentials are generated per emulator so that tests can tell them apart, and are fake.
"""

from __future__ import annotations

import datetime
import json
import secrets
import string
from typing import Optional, Union

Node = Union[str, dict[str, "Node"]]

# Versions the real service lists at "/" (a subset, oldest and newest included); each serves the same tree.
VERSIONS = (
    "1.0",
    "2007-01-19",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2012-01-12",
    "2014-11-05",
    "2016-09-02",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
    "latest",
)
INSTANCE_ID = "i-0e1a2b3c4d5e6f708"
REGION = "eu-west-1"
ACCOUNT = "123456789012"


def _fake(prefix: str, length: int, alphabet: str = string.ascii_uppercase + string.digits) -> str:
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length - len(prefix)))


def credentials(now: Optional[datetime.datetime] = None) -> dict[str, str]:
    """A fake, realistically shaped set of role credentials valid for six hours."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    return {
        "Code": "Success",
        "LastUpdated": now.strftime(iso),
        "Type": "AWS-HMAC",
        "AccessKeyId": _fake("ASIAEMULATOR", 20),
        "SecretAccessKey": _fake("", 40, string.ascii_letters + string.digits + "/+"),
        "Token": _fake("IQoJemulator", 400, string.ascii_letters + string.digits + "/+="),
        "Expiration": (now + datetime.timedelta(hours=6)).strftime(iso),
    }


def build_tree(role: str, user_data: Optional[str]) -> dict[str, Node]:
    """The tree under one version prefix: meta-data/, dynamic/ and (when set) user-data."""
    document = {
        "accountId": ACCOUNT,
        "architecture": "x86_64",
        "availabilityZone": REGION + "a",
        "imageId": "ami-0abcdef1234567890",
        "instanceId": INSTANCE_ID,
        "instanceType": "t3.micro",
        "pendingTime": "2026-01-01T00:00:00Z",
        "privateIp": "10.0.0.10",
        "region": REGION,
        "version": "2017-09-30",
    }
    iam_info = {
        "Code": "Success",
        "LastUpdated": "2026-01-01T00:00:00Z",
        "InstanceProfileArn": f"arn:aws:iam::{ACCOUNT}:instance-profile/{role}",
        "InstanceProfileId": "AIPAEMULATOREXAMPLE01",
    }
    meta: dict[str, Node] = {
        "ami-id": "ami-0abcdef1234567890",
        "ami-launch-index": "0",
        "hostname": "ip-10-0-0-10.eu-west-1.compute.internal",
        "instance-id": INSTANCE_ID,
        "instance-type": "t3.micro",
        "local-hostname": "ip-10-0-0-10.eu-west-1.compute.internal",
        "local-ipv4": "10.0.0.10",
        "mac": "0a:1b:2c:3d:4e:5f",
        "placement": {"availability-zone": REGION + "a", "region": REGION},
        "iam": {
            "info": json.dumps(iam_info, indent=2),
            "security-credentials": {role: json.dumps(credentials(), indent=2)},
        },
        "identity-credentials": {
            "ec2": {
                "info": json.dumps({"Code": "Success", "AccountId": ACCOUNT}, indent=2),
                "security-credentials": {"ec2-instance": json.dumps(credentials(), indent=2)},
            }
        },
        "public-keys": {"0": {"openssh-key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEMULATOR demo"}},
        "services": {"domain": "amazonaws.com", "partition": "aws"},
    }
    tree: dict[str, Node] = {
        "meta-data": meta,
        "dynamic": {"instance-identity": {"document": json.dumps(document, indent=2)}},
    }
    if user_data is not None:
        tree["user-data"] = user_data
    return tree


def listing(node: dict[str, Node]) -> str:
    """A directory listing: one name per line, subdirectories with a trailing slash."""
    return "\n".join(name + "/" if isinstance(node[name], dict) else name for name in node)


def lookup(tree: dict[str, Node], path: str) -> Optional[str]:
    """The body for ``path`` (below a version prefix, e.g. 'meta-data/iam/'), or None for 404.

    A directory is listed with or without its trailing slash; a leaf asked for with a trailing slash is 404.
    The public-keys directory lists '0=demo' as the real service does.
    """
    parts = [p for p in path.split("/") if p]
    node: Node = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        if not parts:
            return "\n".join(node)  # the version root lists its entries without slashes
        if parts[-1] == "public-keys":
            return "0=demo"
        return listing(node)
    if path.endswith("/"):
        return None
    return node
