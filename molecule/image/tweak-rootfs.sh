#!/bin/sh
# Container tweaks of a host image's root file system, given as $1 (/ inside a Containerfile build).
# Shared by scripts/molecule_setup.sh (debootstrap tree) and molecule/Containerfile, so both images match.
set -eu
root="${1:?usage: tweak-rootfs.sh ROOT}"
# Units with nothing to do in a container are masked, so that `systemctl is-system-running` says
# "running" and not "degraded".
for unit in getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
    systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
    systemd-firstboot.service systemd-modules-load.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done
# A fresh machine id per container, made by systemd at boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
printf 'LANG=C.UTF-8\n' >"$root/etc/default/locale"
# Smaller image, faster import: no package cache, documentation, manual pages or translations.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
