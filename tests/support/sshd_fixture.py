"""A real OpenSSH server on 127.0.0.1 for the SSH submission tests.

`start_sshd(folder)` generates a host key and a client key in ``folder``, writes an own
``sshd_config`` (key-only root login, ``AcceptEnv SLURM_CONF`` so the remote shell finds the
test cluster) and a client ``ssh_config`` with a host alias, starts ``sshd -D`` on a free
port and waits until ``ssh <alias> true`` works. Tests pass the client config to ftcluster
through ``FTCLUSTER_SSH_CONFIG``, exactly as a user with a private config file would.

sshd must run as root to switch users, so the fixture skips (with the reason) when not root
or when ``sshd`` is missing (``apt-get install -y openssh-server``); with STRICT=1 (CI) a
skip is an error instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def skip_or_fail(reason: str):
    if os.environ.get("STRICT") == "1":
        pytest.fail(f"STRICT=1: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SshServer:
    """A running sshd and the client configuration that reaches it."""

    alias: str
    port: int
    folder: Path
    config: Path  # client ssh_config: pass as FTCLUSTER_SSH_CONFIG or `ssh -F`
    proc: subprocess.Popen

    def ssh(self, command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", str(self.config), self.alias, command], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        # Session processes outlive the listener (a client's ControlPersist master keeps one open):
        # end them too, which also ends that master.
        for pid in _children(self.proc.pid):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ftcluster-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


def start_sshd(folder: Path, alias: str = "ftc-login", accept_env: tuple[str, ...] = ("SLURM_CONF",),
               set_env: dict[str, str] | None = None) -> SshServer:
    """Start sshd on a free loopback port; the returned config names it ``alias``."""
    if os.geteuid() != 0:
        skip_or_fail("the sshd fixture needs root (sshd switches users); CI runs as root")
    if not Path(SSHD).exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        skip_or_fail("OpenSSH server/client missing: apt-get install -y openssh-server openssh-client")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    host_pub = _keygen(folder / "host_ed25519")
    client_pub = _keygen(folder / "client_ed25519")
    (folder / "authorized_keys").write_text(client_pub + "\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation folder sshd insists on
    port = free_port()
    sshd_config = folder / "sshd_config"
    sshd_config.write_text("\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {folder / 'host_ed25519'}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        *(f"AcceptEnv {name}" for name in accept_env),
        "MaxSessions 64",
        "MaxStartups 64",
        "LogLevel ERROR",
    ]) + "\n")
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    env_lines = [f"  SetEnv {k}={v}" for k, v in (set_env or {}).items()]
    config = folder / "ssh_config"
    config.write_text("\n".join([
        f"Host {alias}",
        "  HostName 127.0.0.1",
        f"  Port {port}",
        "  User root",
        f"  IdentityFile {folder / 'client_ed25519'}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {folder / 'known_hosts'}",
        "  StrictHostKeyChecking yes",
        "  LogLevel ERROR",
        *env_lines,
    ]) + "\n")
    log = (folder / "sshd.log").open("w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(sshd_config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    server = SshServer(alias, port, folder, config, proc)
    deadline = time.time() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {(folder / 'sshd.log').read_text()}")
        res = server.ssh("true", timeout=10)
        if res.returncode == 0:
            return server
        if time.time() > deadline:
            server.stop()
            raise RuntimeError(f"sshd on port {port} never accepted the test key: {res.stderr.strip()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A module-wide sshd whose alias `ftc-login` forwards SLURM_CONF (when set) to the remote shell."""
    set_env = {"SLURM_CONF": os.environ["SLURM_CONF"]} if os.environ.get("SLURM_CONF") else {}
    # ftcluster's ssh ControlPath folder when FTCLUSTER_HOME is too long for a socket path
    # (ftcluster.backends.slurm.ssh.control_dir): the tests' clients make it; remove it with them.
    control = Path(f"/tmp/ftcluster-ssh-{os.getuid()}")
    made_here = not control.exists()
    server = start_sshd(tmp_path_factory.mktemp("sshd"), set_env=set_env)
    yield server
    server.stop()  # ends the ControlPersist masters too
    if made_here:
        shutil.rmtree(control, ignore_errors=True)
