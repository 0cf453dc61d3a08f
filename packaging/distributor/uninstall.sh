#!/bin/sh
# SSM Distributor uninstall: stop the agent, remove its kernel rules, remove the package. Configuration, state and
# logs are kept (the ImdsAgent-Uninstall document with Purge=true removes them too).
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
if [ -d /run/systemd/system ]; then systemctl stop imds-agent.service || true; fi
if command -v imds-agent >/dev/null 2>&1; then imds-agent rules remove; fi
if command -v dpkg >/dev/null 2>&1 && dpkg -s imds-agent >/dev/null 2>&1; then
    dpkg -r imds-agent
elif command -v rpm >/dev/null 2>&1 && rpm -q imds-agent >/dev/null 2>&1; then
    rpm -e imds-agent
fi
echo 'imds-agent removed'
