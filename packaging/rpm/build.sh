#!/bin/sh
# Build dist/imds-agent-<version>-1.noarch.rpm from this checkout.   usage: packaging/rpm/build.sh PYROUTE2_DIR [OUTDIR]
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
pyroute2=$1 out=${2:-$here/dist}
version=${IMDS_AGENT_VERSION:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/agent/imds_agent/__init__.py")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$here/packaging/common/stage.sh" "$work/stage" "$pyroute2" /usr/lib/systemd/system
mkdir -p "$out"
rpmbuild -bb --quiet --define "_topdir $work/top" --define "_rpmdir $out" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "stage $work/stage" --define "pkg_version $version" --define "_binary_payload w9.xzdio" \
    "$here/packaging/rpm/imds-agent.spec" >/dev/null
echo "$out/imds-agent-$version-1.noarch.rpm"
