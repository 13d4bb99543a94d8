"""A private libvirtd that a test can kill, freeze and start again.

libvirt's test driver (a node XML file) is served by a real libvirtd on a
private socket and reached through the remote driver:
test+unix:///abs/node.xml?socket=/private/dir/libvirt-sock. The daemon runs
as root in its own mount namespace with tmpfs over /run/libvirt (and the
other state directories), so several can run at once and none touches the
host's; its configuration sets unix_sock_dir and auth_unix_rw = "none".
Every client connection gets its own copy of the node, read from the file
when it connects: rewriting the file while the daemon is down changes what
a reconnecting client finds.

Debian's libvirtd refuses to initialise its QEMU driver without the group
kvm and the user and group libvirt-qemu: ensure_accounts() creates them
when missing (idempotent).
"""
import grp
import os
import pwd
import signal
import subprocess

from harness.procs import wait_for

LIBVIRTD = "/usr/sbin/libvirtd"
STATE_DIRS = ["/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt"]


def available():
    """None when a private libvirtd can run here, else why not."""
    if not os.path.exists(LIBVIRTD):
        return "%s missing (Debian package libvirt-daemon)" % LIBVIRTD
    if os.geteuid() != 0:
        return "a private libvirtd needs root (mount namespace)"
    return None


def ensure_accounts():
    try:
        grp.getgrnam("kvm")
    except KeyError:
        subprocess.run(["groupadd", "--system", "kvm"], check=True)
    try:
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True)
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        subprocess.run(["useradd", "--system", "--gid", "libvirt-qemu", "--groups", "kvm",
                        "--home-dir", "/var/lib/libvirt", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", "libvirt-qemu"], check=True)


class Libvirtd:
    def __init__(self, workdir, node_xml):
        self.workdir = str(workdir)
        self.node_xml = os.path.abspath(str(node_xml))
        self.sock_dir = os.path.join(self.workdir, "run")
        self.conf = os.path.join(self.workdir, "libvirtd.conf")
        self.log_path = os.path.join(self.workdir, "libvirtd.log")
        self.proc = None
        self.log = None
        os.makedirs(self.sock_dir, exist_ok=True)
        with open(self.conf, "w") as f:
            f.write('unix_sock_dir = "%s"\n' % self.sock_dir)
            f.write('auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
            f.write('unix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n')

    @property
    def socket(self):
        return os.path.join(self.sock_dir, "libvirt-sock")

    @property
    def uri(self):
        return "test+unix://%s?socket=%s" % (self.node_xml, self.socket)

    def virsh(self, *args, timeout=30):
        return subprocess.run(["virsh", "-q", "-c", self.uri] + list(args), capture_output=True,
                              text=True, timeout=timeout)

    def start(self, timeout=30):
        ensure_accounts()
        for d in STATE_DIRS:
            os.makedirs(d, exist_ok=True)
        mounts = " && ".join("mount -t tmpfs tmpfs %s" % d for d in STATE_DIRS)
        self.log = open(self.log_path, "ab")
        # unshare and sh exec: the Popen pid is libvirtd's own.
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "%s && exec %s -f %s -p %s" % (mounts, LIBVIRTD, self.conf,
                                            os.path.join(self.workdir, "libvirtd.pid"))],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def answers():
            if self.proc.poll() is not None:
                raise AssertionError("libvirtd exited with %s:\n%s"
                                     % (self.proc.returncode, self.log_tail()))
            return self.virsh("list", "--name", timeout=10).returncode == 0
        wait_for(answers, timeout, "the private libvirtd to answer on %s" % self.socket, 0.1)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL: gone without a goodbye, as in a crash."""
        if self.running():
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close_log()

    def freeze(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        if self.running():
            self.thaw()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._close_log()

    def _close_log(self):
        if self.log:
            self.log.close()
            self.log = None

    def log_tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# The test node: domains with a NIC on a network whose DHCP range is on
# loopback, so that the lease the test driver makes up for a domain is an
# address a simulated guest can bind to.
DOMAIN = """  <domain type="test">
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <memory>131072</memory>
    <vcpu>1</vcpu>
    <os><type>hvm</type></os>
    <devices>
      <vsock model="virtio"><cid auto="no" address="{cid}"/></vsock>
      <interface type="network">
        <mac address="{mac}"/>
        <source network="default"/>
      </interface>
    </devices>
  </domain>
"""

NETWORK = """  <network>
    <name>default</name>
    <bridge name="virbr0"/>
    <forward/>
    <ip address="{net}.0.1" netmask="255.255.0.0">
      <dhcp><range start="{net}.0.10" end="{net}.250.250"/></dhcp>
    </ip>
  </network>
"""


def write_node(path, domains, net="127.77"):
    """Write a test-driver node with DOMAINS ({name, uuid, cid, mac}) on a
    network of NET.0.0/16."""
    with open(path, "w") as f:
        f.write("<node>\n")
        for d in domains:
            f.write(DOMAIN.format(**d))
        f.write(NETWORK.format(net=net))
        f.write("</node>\n")


def lease_of(lv, name):
    """The address the test driver leases to domain NAME."""
    r = lv.virsh("domifaddr", name, "--source", "lease")
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "ipv4":
            return parts[3].split("/")[0]
    raise AssertionError("no lease for %s: %r" % (name, r.stdout))
