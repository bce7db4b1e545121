"""A simulated power loss: an ext4 on a loop device, shut down without flushing (root only).

    with PowerDisk(tmp_path / "disk") as disk:   # 64 MiB image, ext4, mounted at disk.mount
        ...                                     # a process writes under disk.mount
        disk.cut()                              # power off: what was not fsynced is gone
        ...                                     # kill the writers (they get EIO meanwhile)
        disk.reboot()                           # unmount, mount again (the journal replays)

`cut()` is the filesystem shutdown ioctl (FS_IOC_SHUTDOWN with NOLOGFLUSH, what xfstests'
`godown` and `_scratch_shutdown` use for crash tests): from that instant ext4 takes no
more writes and neither writes back its dirty pages nor commits its journal, so the device
holds exactly what reached it before: data and metadata that were fsynced (or written
back by the kernel on its own, which takes 30 s of dirty age by default: tests cut within
a second or two of writing). There is no device-mapper in this kernel (no dm-flakey or
dm-log-writes), and a loop device cannot be pulled from under a mounted filesystem;
the shutdown is the kernel's own way of dropping unsynced page-cache writes.

`no_fsync_env()` returns the environment that makes a process's fsync, fdatasync, msync
and sync_file_range no-ops: libeatmydata (Debian `eatmydata`) via LD_PRELOAD, else a
four-function shim compiled with cc.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import struct
import subprocess
from pathlib import Path

from tests.conftest import require_binary, unavailable

FS_IOC_SHUTDOWN = 0x8004587D        # _IOR('X', 125, __u32)
SHUTDOWN_NOLOGFLUSH = 2             # neither data nor journal is flushed: a power cut


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


class PowerDisk:
    def __init__(self, workdir: Path, size_mb: int = 64):
        if os.geteuid() != 0:
            unavailable("the power-loss tests need root (a loop device and mount)")
        for binary in ("losetup", "mkfs.ext4", "mount", "umount"):
            require_binary(binary)
        self.dir = Path(workdir)
        self.image = self.dir / "disk.img"
        self.mount = self.dir / "mnt"
        self.size_mb = size_mb
        self.device = ""
        self.cuts = 0

    def __enter__(self) -> "PowerDisk":
        self.mount.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size_mb * 2**20)
        _run("mkfs.ext4", "-q", "-F", str(self.image))
        self.device = _run("losetup", "--find", "--show", str(self.image))
        try:
            _run("mount", "-t", "ext4", self.device, str(self.mount))
        except BaseException:
            _run("losetup", "-d", self.device)
            raise
        return self

    def cut(self) -> None:
        """The power goes: the filesystem stops, dropping every write not yet on the device."""
        fd = os.open(self.mount, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
        finally:
            os.close(fd)
        self.cuts += 1

    def reboot(self) -> None:
        """Unmount the dead filesystem and mount the device again (ext4 replays its journal)."""
        _run("umount", str(self.mount))
        _run("mount", "-t", "ext4", self.device, str(self.mount))

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", str(self.mount)], capture_output=True)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)


_SHIM = r"""
#include <stddef.h>
int fsync(int fd) { (void)fd; return 0; }
int fdatasync(int fd) { (void)fd; return 0; }
int msync(void *a, size_t n, int f) { (void)a; (void)n; (void)f; return 0; }
int sync_file_range(int fd, long long o, long long n, unsigned f) { (void)fd; (void)o; (void)n; (void)f; return 0; }
"""


def no_fsync_env(workdir: Path) -> dict[str, str]:
    """LD_PRELOAD that turns fsync and friends into no-ops (libeatmydata, else a cc-built shim)."""
    found = sorted(glob.glob("/usr/lib/*/libeatmydata.so*") + glob.glob("/usr/lib/libeatmydata.so*"))
    if found:
        return {"LD_PRELOAD": found[0]}
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        unavailable("neither libeatmydata (apt-get install eatmydata) nor a C compiler is here")
    source, lib = Path(workdir) / "nofsync.c", Path(workdir) / "libnofsync.so"
    source.write_text(_SHIM)
    _run(cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(source))
    return {"LD_PRELOAD": str(lib)}
