#!/bin/sh
# Example firmware hook for a two-slot (A/B) layout, for the agent's [jobs.firmware]:
#
#   install_cmd  = ["/usr/lib/pymigrate/ab-slot.sh", "install"]   # the agent appends the image path
#   health_cmd   = ["/usr/lib/pymigrate/ab-slot.sh", "health"]
#   rollback_cmd = ["/usr/lib/pymigrate/ab-slot.sh", "rollback"]
#
# Layout under $FW_ROOT (default /var/lib/pymigrate-firmware):
#   slot-a/ slot-b/   the two slots, each holding `image` and `VERSION`
#   current           symlink to the active slot (what the launcher or bootloader starts)
#   previous          name of the slot that was active before the last install
#
# install <image>: copy the verified image into the inactive slot, then switch `current`
#   atomically (rename of a new symlink) and remember the old slot. With FW_RESTART_CMD set
#   (e.g. "systemctl restart my-app" or "systemctl reboot") it runs it last: the agent's
#   job comes again after the restart and runs the health check then.
# health: the active slot must carry the version the job asked for
#   ($PYMIGRATE_FIRMWARE_VERSION), then FW_HEALTH_CMD (if set) must succeed.
# rollback: switch `current` back to the previous slot (and restart with FW_RESTART_CMD).
#
# On a real bootloader A/B device replace the symlink switch with its tool, e.g.
# `fw_setenv boot_slot b` (U-Boot) or `rauc install`/`rauc status mark-bad` (RAUC).
set -eu
root="${FW_ROOT:-/var/lib/pymigrate-firmware}"
mkdir -p "$root/slot-a" "$root/slot-b"
[ -L "$root/current" ] || ln -s slot-a "$root/current"
active="$(readlink "$root/current")"
if [ "$active" = "slot-a" ]; then inactive="slot-b"; else inactive="slot-a"; fi

switch_to() {  # atomic: a new symlink renamed over the old one (GNU mv -T)
    ln -sfn "$1" "$root/current.new"
    if ! mv -T "$root/current.new" "$root/current" 2>/dev/null; then
        rm -f "$root/current.new"; ln -sfn "$1" "$root/current"  # no mv -T: near-atomic
    fi
}

restart() {
    if [ -n "${FW_RESTART_CMD:-}" ]; then sh -c "$FW_RESTART_CMD"; fi
}

case "${1:-}" in
install)
    image="${2:?install needs the image path}"
    cp "$image" "$root/$inactive/image.tmp"
    sync "$root/$inactive/image.tmp" 2>/dev/null || sync
    mv "$root/$inactive/image.tmp" "$root/$inactive/image"
    printf '%s\n' "${PYMIGRATE_FIRMWARE_VERSION:-unknown}" > "$root/$inactive/VERSION"
    printf '%s\n' "$active" > "$root/previous"
    switch_to "$inactive"
    echo "installed ${PYMIGRATE_FIRMWARE_VERSION:-?} into $inactive (was $active)"
    restart
    ;;
health)
    want="${PYMIGRATE_FIRMWARE_VERSION:-}"
    have="$(cat "$root/current/VERSION" 2>/dev/null || true)"
    if [ -n "$want" ] && [ "$have" != "$want" ]; then
        echo "active slot $active runs '$have', expected '$want'"; exit 2
    fi
    if [ -n "${FW_HEALTH_CMD:-}" ]; then sh -c "$FW_HEALTH_CMD"; fi
    echo "healthy: $active runs $have"
    ;;
rollback)
    prev="$(cat "$root/previous" 2>/dev/null || echo "$inactive")"
    switch_to "$prev"
    echo "rolled back to $prev"
    restart
    ;;
*)
    echo "usage: $0 install <image> | health | rollback" >&2; exit 64
    ;;
esac
