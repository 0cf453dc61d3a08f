#!/bin/sh
# SSM Distributor in-place update: upgrade to the package in this directory. The package restarts the agent on the
# new version, keeping an edited agent.yaml, the policy and the inventory (no uninstall, no window without it).
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
cd "$(dirname "$0")"
if ls ./*.deb >/dev/null 2>&1; then
    pkg=$(ls ./*.deb)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" 2>/dev/null || dpkg -i "$pkg"
else
    pkg=$(ls ./*.rpm)
    dnf upgrade -y -q "$pkg" 2>/dev/null || yum upgrade -y -q "$pkg" 2>/dev/null || rpm -U --replacepkgs "$pkg"
fi
imds-agent version
if [ -d /run/systemd/system ]; then systemctl is-active imds-agent.service; fi
