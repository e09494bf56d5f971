"""Run Slurm client commands on a login node over OpenSSH.

``slurm.login`` names the login node: an alias from your ssh config (recommended: it carries
User, Port, IdentityFile, ProxyJump), ``user@host``, or ``user@host:port``. A private ssh config
can be given with ``FTCLUSTER_SSH_CONFIG=/path/to/config`` (passed as ``ssh -F``).

Every call is non-interactive (``BatchMode=yes``: a password or host-key prompt fails at once
instead of hanging), bounded (``ConnectTimeout``) and multiplexed over one master connection
(``ControlMaster=auto``, ``ControlPersist``), so ``status``/``logs -f`` do not reconnect each
time. The remote command runs in ``bash -l`` so the login profile's PATH (module loads) finds
``sbatch``; a marker line separates whatever that profile prints from the command's output.
Environment variables for the job (``slurm.env_passthrough``, usually secrets) travel on
stdin ahead of the script, never in argv, so they do not show in ``ps`` on the login node.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from ...errors import BackendError

CONFIG_ENV = "FTCLUSTER_SSH_CONFIG"
CONTROL_ENV = "FTCLUSTER_SSH_CONTROL"  # "0" turns connection sharing off
CONNECT_TIMEOUT_S = 10
CONTROL_PERSIST_S = 120
BEGIN = "--ftcluster-ssh-begin--"
END_ENV = "--ftcluster-ssh-env-end--"
_HOST_PORT = re.compile(r"^(?P<dest>[^:\[\]]+|[^@]*@?\[[^\]]+\]):(?P<port>\d{1,5})$")
SSH_FIX = ("check that `{probe}` works without any prompt: the host is reachable, your key is in "
           "ssh-agent or ~/.ssh (BatchMode allows no password), and the host key is in known_hosts; "
           "a private ssh config goes in FTCLUSTER_SSH_CONFIG")


def split_login(login: str) -> tuple[str, int | None]:
    """``user@host:port`` -> (``user@host``, port); an alias or ``user@host`` has no port."""
    if login.startswith("ssh://"):
        raise BackendError(f"slurm.login: write {login!r} as user@host:port or an ssh config alias")
    m = _HOST_PORT.match(login)
    if m:
        port = int(m.group("port"))
        if not 0 < port < 65536:
            raise BackendError(f"slurm.login: port {port} out of range in {login!r}")
        return m.group("dest").replace("[", "").replace("]", ""), port
    if ":" in login and "[" not in login:
        raise BackendError(f"slurm.login: {login!r} is not user@host, user@host:port or an ssh config alias")
    return login, None


def control_dir() -> Path | None:
    """Folder for multiplexing sockets.

    Unix socket paths hold at most ~104 bytes, and ssh adds ``/<40-hex %C>.<16 random>`` while
    it sets the master up, so a folder longer than 45 characters falls back to /tmp.
    """
    if os.environ.get(CONTROL_ENV, "1") == "0":
        return None
    from ..base import ftcluster_home

    d = ftcluster_home() / "ssh"
    if len(str(d)) > 45:
        d = Path(f"/tmp/ftcluster-ssh-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    return d


def ssh_argv(login: str, remote_command: str) -> list[str]:
    """The full ssh command line that runs ``remote_command`` on ``login``."""
    dest, port = split_login(login)
    argv = ["ssh"]
    config = os.environ.get(CONFIG_ENV)
    if config:
        if not Path(config).expanduser().is_file():
            raise BackendError(f"{CONFIG_ENV}={config}: no such file; point it at an ssh config or unset it")
        argv += ["-F", str(Path(config).expanduser())]
    argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
             "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]
    cdir = control_dir()
    if cdir is not None:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={cdir}/%C",
                 "-o", f"ControlPersist={CONTROL_PERSIST_S}s"]
    if port is not None:
        argv += ["-p", str(port)]
    return argv + ["--", dest, remote_command]


def remote_command(argv: list[str], env_names: list[str] | None = None) -> str:
    """``argv`` wrapped for the remote login shell: ``bash -lc '<marker>; [read env]; exec argv'``."""
    script = f"printf '%s\\n' {BEGIN}; "
    if env_names:
        script += f'while IFS= read -r l && [ "$l" != {END_ENV} ]; do export "$l"; done; '
    script += "exec " + shlex.join(argv)
    return "bash -lc " + shlex.quote(script)


def env_preamble(env: dict[str, str]) -> str:
    """``NAME=value`` lines and the end marker, sent on stdin ahead of the script."""
    for name, value in env.items():
        if "\n" in value:
            raise BackendError(f"environment variable {name} holds a newline; it cannot be passed over ssh")
    return "".join(f"{k}={v}\n" for k, v in env.items()) + END_ENV + "\n"


def strip_preamble(stdout: str) -> str:
    """Drop what the remote login profile printed before the marker line."""
    head, sep, rest = stdout.partition(BEGIN + "\n")
    return rest if sep else stdout


def ssh_error(login: str, stderr: str) -> BackendError:
    """The one-line error for ssh's own failures (exit 255)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    why = lines[-1] if lines else "no message"
    dest, port = split_login(login)
    probe = shlex.join(["ssh", *(["-F", os.environ[CONFIG_ENV]] if os.environ.get(CONFIG_ENV) else []),
                        *(["-p", str(port)] if port else []), dest, "true"])
    return BackendError(f"ssh to {login} failed ({why}); {SSH_FIX.format(probe=probe)}")
