#!/bin/sh
# Stage the files every package installs into $1 (a root directory), from this checkout.
#   usage: packaging/common/stage.sh ROOT PYROUTE2_DIR UNITDIR
# PYROUTE2_DIR is an unpacked pyroute2 wheel (bundled: distributions ship versions without the nf_tables
# message classes the agent uses, or none at all). UNITDIR is /lib/systemd/system or /usr/lib/systemd/system.
set -eu
root=$1 pyroute2=$2 unitdir=$3
here=$(cd "$(dirname "$0")/../.." && pwd)
install -d -m 0755 "$root/usr/bin" "$root/usr/share/imds-agent/vendor" "$root/etc/imds-agent/policy.d" \
    "$root$unitdir" "$root/usr/lib/sysusers.d" "$root/usr/share/doc/imds-agent/examples"
(cd "$here/agent" && find imds_agent -name '*.py' -o -name py.typed) | while read -r f; do
    install -D -m 0644 "$here/agent/$f" "$root/usr/share/imds-agent/$f"
done
if [ -n "${IMDS_AGENT_VERSION:-}" ]; then
    # A package built as another version (a release build, an upgrade test) must also say so when asked.
    sed -i "s/^__version__ = .*/__version__ = \"$IMDS_AGENT_VERSION\"/" "$root/usr/share/imds-agent/imds_agent/__init__.py"
fi
(cd "$pyroute2" && find pyroute2 -name '*.py') | while read -r f; do
    install -D -m 0644 "$pyroute2/$f" "$root/usr/share/imds-agent/vendor/$f"
    sed -i '1{/^#!/d}' "$root/usr/share/imds-agent/vendor/$f"  # library modules, not scripts
done
install -d -m 0755 "$root/usr/share/man/man8"
gzip -9n < "$here/packaging/common/imds-agent.8" > "$root/usr/share/man/man8/imds-agent.8.gz"
install -m 0755 "$here/packaging/common/imds-agent.wrapper" "$root/usr/bin/imds-agent"
install -m 0644 "$here/packaging/etc/agent.yaml" "$root/etc/imds-agent/agent.yaml"
for f in "$here"/rules/*.yaml; do
    case "$(basename "$f")" in
        90-examples.yaml) install -m 0644 "$f" "$root/usr/share/doc/imds-agent/examples/" ;;
        *) install -m 0644 "$f" "$root/etc/imds-agent/policy.d/" ;;
    esac
done
install -m 0644 "$here/packaging/systemd/imds-agent.service" "$root$unitdir/imds-agent.service"
install -m 0644 "$here/packaging/systemd/imds-agent-inventory.service" "$root$unitdir/imds-agent-inventory.service"
install -m 0644 "$here/packaging/systemd/imds-agent-inventory.timer" "$root$unitdir/imds-agent-inventory.timer"
install -m 0644 "$here/packaging/systemd/imds-agent.sysusers" "$root/usr/lib/sysusers.d/imds-agent.conf"
install -m 0644 "$here/README.md" "$root/usr/share/doc/imds-agent/README.md"
