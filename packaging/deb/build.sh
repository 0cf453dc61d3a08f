#!/bin/sh
# Build dist/imds-agent_<version>_all.deb from this checkout.   usage: packaging/deb/build.sh PYROUTE2_DIR [OUTDIR]
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
pyroute2=$1 out=${2:-$here/dist}
version=${IMDS_AGENT_VERSION:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/agent/imds_agent/__init__.py")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
"$here/packaging/common/stage.sh" "$root" "$pyroute2" /lib/systemd/system
install -d -m 0755 "$root/DEBIAN"
for f in postinst prerm postrm; do install -m 0755 "$here/packaging/deb/$f" "$root/DEBIAN/$f"; done
install -m 0644 "$here/packaging/deb/conffiles.in" "$root/DEBIAN/conffiles"
(cd "$root" && find etc/imds-agent/policy.d -type f | sort | sed 's|^|/|') >> "$root/DEBIAN/conffiles"
install -m 0644 "$here/packaging/deb/copyright" "$root/usr/share/doc/imds-agent/copyright"
printf 'imds-agent (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- imds-agent maintainers <imds-agent@example.org>  %s\n' \
    "$version" "$version" "$(date -R -d @"${SOURCE_DATE_EPOCH:-0}")" | gzip -9n > "$root/usr/share/doc/imds-agent/changelog.gz"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" "$here/packaging/deb/control.in" > "$root/DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/md5sums"
mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out/imds-agent_${version}_all.deb" >/dev/null
echo "$out/imds-agent_${version}_all.deb"
