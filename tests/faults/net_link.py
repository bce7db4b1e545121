"""A store behind a WAN router, in network namespaces, with real link faults (root only).

    with StoreNetwork() as net:          # namespaces, veth pairs, routes; torn down at exit
        net.launcher                     # ["ip", "netns", "exec", net.store_ns]: runs the agent inside
        net.broker_ip                    # the host's WAN address: the broker listens there
        net.lan_ip                       # the store's LAN address: the agent's API (the POS side)
        net.partition(); net.heal()      # a silent partition: blackhole routes on the router
        net.lossy(20); net.clear()       # nftables random drop of 20 % of the WAN's packets
        net.slow("256kbit"); net.clear() # tbf on both directions of the WAN
        net.connect_attempts(port)       # distinct TCP connections the store opened to `port`

The shape, as a store is wired:

    host (broker, hub)  --wan veth--  router ns  --veth--  store ns (agent + sync)
          10.R.0.1                10.R.0.2  10.R.1.1         10.R.1.2
    host (test = POS)   ----------------lan veth---------  store ns
          10.R.2.1                                          10.R.2.2

The agent's API is reached over the LAN, which no fault touches: the shop floor keeps
selling while the WAN is down. The faults are all on the router, so both ends keep their
own routes and sockets: a partition is a router that silently forwards nothing (a
blackhole route answers no ICMP and no RST; the store's SYNs and the broker's segments
just vanish), the way a WAN link fails in the field. There is no netem on this kernel
(`tc qdisc add ... netem` is refused), hence nftables for loss and tbf for rate.
Needs root, iproute2, nftables and tc; `require_network()` fails (skips outside CI) without.
"""

from __future__ import annotations

import os
import random
import subprocess

from tests.conftest import require_binary, unavailable

_PORT_SET = "attempts"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def require_network() -> None:
    """Fail (skip outside CI) unless this process can build namespaces with nftables and tbf."""
    for binary in ("ip", "tc", "nft"):
        require_binary(binary)
    if os.geteuid() != 0:
        unavailable("the network fault tests need root (network namespaces, nftables, tc)")


def _free_octet() -> int:
    used = _run("ip", "-o", "-4", "addr").stdout
    for _ in range(200):
        octet = random.randint(16, 250)
        if f"10.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.X.0.0/16 block for the test network")


class StoreNetwork:
    """The topology in the module docstring; one instance per test."""

    def __init__(self) -> None:
        require_network()
        self.octet = _free_octet()
        tag = f"{os.getpid() % 10000}{self.octet}"
        self.store_ns, self.router_ns = f"fstore{tag}", f"frouter{tag}"
        self.host_wan, self.host_lan = f"fw{tag}", f"fl{tag}"   # host ends (<= 15 chars)
        base = f"10.{self.octet}"
        self.broker_ip, self.router_wan_ip = f"{base}.0.1", f"{base}.0.2"
        self.router_store_ip, self.store_wan_ip = f"{base}.1.1", f"{base}.1.2"
        self.host_lan_ip, self.lan_ip = f"{base}.2.1", f"{base}.2.2"
        self.store_net = f"{base}.1.0/30"
        self.launcher = ["ip", "netns", "exec", self.store_ns]
        self.partitioned = False
        self._up = False

    # ------------------------------------------------------------------ build

    def up(self) -> "StoreNetwork":
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def _build(self) -> None:
        r, s = self.router_ns, self.store_ns
        _run("ip", "netns", "add", r)
        _run("ip", "netns", "add", s)
        # host <-> router (the WAN as the host sees it)
        _run("ip", "link", "add", self.host_wan, "type", "veth", "peer", "name", "wan0", "netns", r)
        _run("ip", "addr", "add", f"{self.broker_ip}/30", "dev", self.host_wan)
        _run("ip", "link", "set", self.host_wan, "up")
        _run("ip", "-n", r, "addr", "add", f"{self.router_wan_ip}/30", "dev", "wan0")
        _run("ip", "-n", r, "link", "set", "wan0", "up")
        # router <-> store
        _run("ip", "-n", r, "link", "add", "store0", "type", "veth", "peer", "name", "wan0", "netns", s)
        _run("ip", "-n", r, "addr", "add", f"{self.router_store_ip}/30", "dev", "store0")
        _run("ip", "-n", r, "link", "set", "store0", "up")
        _run("ip", "-n", s, "addr", "add", f"{self.store_wan_ip}/30", "dev", "wan0")
        _run("ip", "-n", s, "link", "set", "wan0", "up")
        _run("ip", "-n", s, "link", "set", "lo", "up")
        _run("ip", "-n", s, "route", "add", f"{self.broker_ip}/32", "via", self.router_store_ip)
        _run("ip", "route", "add", self.store_net, "via", self.router_wan_ip)
        _run("ip", "netns", "exec", r, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        # host <-> store LAN (the POS and the test's HTTP requests)
        _run("ip", "link", "add", self.host_lan, "type", "veth", "peer", "name", "lan0", "netns", s)
        _run("ip", "addr", "add", f"{self.host_lan_ip}/30", "dev", self.host_lan)
        _run("ip", "link", "set", self.host_lan, "up")
        _run("ip", "-n", s, "addr", "add", f"{self.lan_ip}/30", "dev", "lan0")
        _run("ip", "-n", s, "link", "set", "lan0", "up")
        # The router's filter table: the store's connection attempts (SYNs by port pair, seen
        # before routing, so a partition's blackholed SYNs count too) and a chain the lossy
        # link adds its drop rule to.
        self._nft(f"add table inet fault; add set inet fault {_PORT_SET} "
                  "{ type inet_service . inet_service; size 65535; flags dynamic; }; "
                  "add chain inet fault seen { type filter hook prerouting priority 0; policy accept; }; "
                  "add chain inet fault forward { type filter hook forward priority 0; policy accept; }; "
                  "add chain inet fault loss; "
                  f"add rule inet fault seen ip saddr {self.store_wan_ip} tcp flags & (syn|ack) == syn "
                  f"add @{_PORT_SET} {{ tcp dport . tcp sport }}; "
                  "add rule inet fault forward jump loss")

    def _nft(self, script: str) -> str:
        return _run("ip", "netns", "exec", self.router_ns, "nft", script).stdout

    def down(self) -> None:
        _run("ip", "route", "del", self.store_net, check=False)
        for link in (self.host_wan, self.host_lan):
            _run("ip", "link", "del", link, check=False)
        for ns in (self.store_ns, self.router_ns):
            _run("ip", "netns", "del", ns, check=False)
        self._up = False

    def __enter__(self) -> "StoreNetwork":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ----------------------------------------------------------------- faults

    def partition(self) -> None:
        """Blackhole both directions on the router: nothing forwarded, nothing answered."""
        _run("ip", "-n", self.router_ns, "route", "add", "blackhole", f"{self.store_wan_ip}/32")
        _run("ip", "-n", self.router_ns, "route", "add", "blackhole", f"{self.broker_ip}/32")
        self.partitioned = True

    def heal(self) -> None:
        _run("ip", "-n", self.router_ns, "route", "del", "blackhole", f"{self.store_wan_ip}/32", check=False)
        _run("ip", "-n", self.router_ns, "route", "del", "blackhole", f"{self.broker_ip}/32", check=False)
        self.partitioned = False

    def lossy(self, percent: int) -> None:
        """Drop `percent` % of the packets the router forwards, each direction, at random."""
        self._nft(f"flush chain inet fault loss; add rule inet fault loss numgen random mod 100 < {percent} "
                  "counter drop")

    def dropped(self) -> int:
        """Packets the lossy rule dropped so far."""
        out = self._nft("list chain inet fault loss")
        for line in out.splitlines():
            if "packets" in line:
                return int(line.split("packets")[1].split()[0])
        return 0

    def slow(self, rate: str = "256kbit") -> None:
        """Shape both directions of the store's WAN to `rate` (tbf, 100 ms of queue)."""
        for dev in ("wan0", "store0"):
            _run("tc", "-n", self.router_ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                 "burst", "4kb", "latency", "100ms")

    def clear(self) -> None:
        """Undo lossy() and slow() (not a partition: heal() does that)."""
        self._nft("flush chain inet fault loss")
        for dev in ("wan0", "store0"):
            _run("tc", "-n", self.router_ns, "qdisc", "del", "dev", dev, "root", check=False)

    def connect_attempts(self, port: int) -> int:
        """Distinct TCP connections the store started towards `port` (SYNs seen by the router)."""
        out = self._nft(f"list set inet fault {_PORT_SET}")
        return sum(1 for item in _elements(out) if item.split(" . ")[0].strip() == str(port))


def _elements(listing: str) -> list[str]:
    text = listing.replace("\n", " ")
    if "elements = {" not in text:
        return []
    body = text.split("elements = {", 1)[1].split("}", 1)[0]
    return [part.strip() for part in body.split(",") if part.strip()]


def in_store(net: StoreNetwork, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command inside the store's namespace."""
    return subprocess.run([*net.launcher, *cmd], capture_output=True, text=True, timeout=timeout)


__all__ = ["StoreNetwork", "in_store", "require_network"]
