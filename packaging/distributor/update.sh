#!/bin/sh
# SSM Distributor in-place update: the same as install.sh, whose package managers upgrade an installed older
# version in place from the package in this directory. The package restarts the agent on the new version, keeping
# an edited agent.yaml, the policy and the inventory (no uninstall, no window without it).
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec /bin/sh "$(dirname "$0")/install.sh"
