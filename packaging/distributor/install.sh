#!/bin/sh
# SSM Distributor install: the imds-agent package in this directory (one .deb or one .rpm, per the zip), started in
# audit mode by the package itself. Dependencies come from the instance's repositories.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
cd "$(dirname "$0")"
if ls ./*.deb >/dev/null 2>&1; then
    pkg=$(ls ./*.deb)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" 2>/dev/null || dpkg -i "$pkg"
else
    pkg=$(ls ./*.rpm)
    dnf install -y -q "$pkg" 2>/dev/null || yum install -y -q "$pkg" 2>/dev/null || rpm -U --replacepkgs "$pkg"
fi
imds-agent version
if [ -d /run/systemd/system ]; then systemctl is-active imds-agent.service; fi
