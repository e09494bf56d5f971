"""Secrets by value: find credentials in a spec's string values, whatever the field is called.

The detector is Yelp's detect-secrets (its regex plugins: AWS, Azure storage keys, GitHub,
GitLab, JWT, private keys, URL basic auth, Slack, Stripe, OpenAI, PyPI, ...), plus three small
regexes for what its 1.5.0 release lacks (:data:`EXTRA`), plus its Shannon-entropy test for
values under credential-looking names (``SSECustomerKey``, ``AZURE_STORAGE_ACCOUNT_KEY``).

Start-up time: importing detect-secrets costs about 150 ms (it imports requests and loads a
gibberish model), more than half of a whole ``ftcluster render``. So every spec is screened
with the plugins' own regexes, copied into :mod:`ftcluster.spec.secret_patterns` by
``python -m ftcluster.spec.secrets`` (a test keeps the copy equal to the installed plugins); only a
value that the screen flags, or a long token under a credential name, imports detect-secrets
for the verdict (the JWT plugin, for one, checks that the parts decode). Where detect-secrets
is not installed (a training image), the screen's answer stands.

Values are never echoed: callers get a kind ("GitHub Token"), not the match.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from functools import cache, lru_cache
from typing import Any, cast

# Not in detect-secrets 1.5.0 (checked: no Hugging Face plugin, and BasicAuthDetector only
# finds user:password@ in URLs, not HTTP Authorization headers).
EXTRA: tuple[tuple[str, str, str, int], ...] = (
    ("hf", "Hugging Face token", r"\bhf_[A-Za-z0-9]{30,}", 0),  # user access tokens: hf_ + 34 letters
    ("bearer", "Bearer token", r"\bBearer\s+[A-Za-z0-9\-._~+/]{12,}=*", re.I),  # RFC 6750 token68
    ("basic", "Basic auth header", r"\bBasic\s+[A-Za-z0-9+/]{12,}={0,2}", re.I),  # RFC 7617 base64(user:pass)
)
# Allowed: content digests (container images pinned by digest, checksums) are public, not secrets.
DIGEST = re.compile(r"\b(?:sha1|sha256|sha384|sha512):[0-9a-fA-F]{40,128}\b")
# Names under which a long random value is a credential (the entropy test applies to them only:
# hashes and ids elsewhere are high-entropy too).
CREDENTIAL_NAME = re.compile(
    r"SECRET|PASSW(OR)?D|TOKEN|CREDENTIAL|KEY|AUTH|SIGNATURE|SAS|CONNECTION_?STRING|COOKIE|SESSION", re.I)
# Fields that hold references to secrets (names), never values.
REFERENCE_FIELDS = {("kubernetes", "secret_env"), ("kubernetes", "env_from_secrets"),
                    ("kubernetes", "image_pull_secrets"), ("slurm", "env_passthrough"),
                    # vocabulary, not credentials: "token" in their names is a word of the text
                    ("tokenizer", "add_tokens"), ("tokenizer", "add_special_tokens")}
_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-]{16,}")
BASE64_LIMIT, HEX_LIMIT = 4.5, 3.0  # detect-secrets' defaults for Base64/HexHighEntropyString


# Several plugins match an assignment "<name><key|pwd|pass|token...> = <value>"; their regexes take
# most of the screen's compile time (IBM's alone ~15 ms), so they are compiled only for a line
# that has one of those words at all (which each of them requires).
_ASSIGNMENT_WORD = re.compile(r"key|pwd|pw|pass|token", re.I)


def _needs_word(rx: str) -> bool:
    return "(?:key|pwd" in rx


@cache
def _compiled(rx: str, flags: int) -> re.Pattern[str]:
    return re.compile(rx, flags)


def _screen(line: str) -> Iterator[tuple[str, str, re.Pattern[str]]]:
    """The screen's (plugin, kind, regex) that can apply to ``line``."""
    from .secret_patterns import PATTERNS

    word = _ASSIGNMENT_WORD.search(line) is not None
    for plugin, kind, rx, flags in (*PATTERNS, *EXTRA):
        if word or not _needs_word(rx):
            yield plugin, kind, _compiled(rx, flags)


@lru_cache(maxsize=1)
def _plugins() -> dict[str, Any] | None:
    """detect-secrets' plugin classes by class name; None where it is not installed."""
    try:
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    except ImportError:
        return None
    return {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}


def _confirmed(plugin: str, line: str) -> bool:
    """detect-secrets' own verdict for a screen hit (the screen's where it is not installed)."""
    plugins = _plugins()
    cls = plugins.get(plugin) if plugins else None
    if cls is None:
        return True
    return any(True for _ in cls().analyze_string(line))


def _entropy(s: str, charset: str) -> float:
    try:
        from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin
    except ImportError:
        counts = [s.count(c) for c in set(s) if c in charset]
        return -sum(n / len(s) * math.log2(n / len(s)) for n in counts) if s else 0.0
    return HighEntropyStringsPlugin.calculate_shannon_entropy(
        type("_P", (), {"charset": charset})(), s)  # pyright: ignore[reportArgumentType]  # needs .charset only


def _high_entropy(value: str) -> bool:
    import string

    for token in _TOKEN.findall(value):
        if all(c in string.hexdigits for c in token):
            if _entropy(token, string.hexdigits) > HEX_LIMIT:
                return True
        elif _entropy(token, string.ascii_letters + string.digits + "+/=_-") > BASE64_LIMIT:
            return True
    return False


def secret_kind(name: str, value: str) -> str | None:
    """What kind of secret ``value`` (held under the key ``name``) looks like, or None."""
    if not isinstance(value, str) or len(value) < 8:
        return None
    text = DIGEST.sub("sha256:digest", value)
    line = f'{name}="{text}"'  # the form detect-secrets scans: some plugins look at the name too
    for plugin, kind, rx in _screen(line):
        if rx.search(line) and (plugin in ("hf", "bearer", "basic") or _confirmed(plugin, line)):
            return kind
    if CREDENTIAL_NAME.search(name) and _TOKEN.search(text) and _high_entropy(text):
        return f"high-entropy value under a credential name ({name})"
    return None


def find_secrets(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(field path, kind) of every string in ``data`` that looks like a secret."""
    if path[:2] in REFERENCE_FIELDS:
        return
    if isinstance(data, dict):
        for key, value in data.items():
            yield from find_secrets(value, path + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from find_secrets(value, path + (i,))
    elif isinstance(data, str):
        name = next((str(p) for p in reversed(path) if isinstance(p, str)), "")
        kind = secret_kind(name, data)
        if kind:
            yield path, kind


# ---------------------------------------------------------------- credentials in storage_options, by name
#
# fsspec stores take credentials as options; in a spec they would be copied into the sbatch script,
# the manifests and the run folder. Each option that carries one (compared lower-case, at any depth:
# client_kwargs, s3_additional_kwargs, headers), and what the job's environment should hold instead.
# s3fs hands key/secret/token (username/password are its aliases) to botocore, which reads AWS_*;
# adlfs reads AZURE_STORAGE_* itself (adlfs/spec.py, AzureBlobFileSystem.__init__); gcsfs takes
# GOOGLE_APPLICATION_CREDENTIALS through google-auth. An SSE-C key has no variable of its own: fsspec
# reads a whole protocol's options from FSSPEC_<PROTOCOL> (JSON; fsspec/config.py set_conf_env).
_AWS_KEYS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
STORE_CREDENTIALS: dict[str, str] = {
    "key": _AWS_KEYS, "username": _AWS_KEYS, "aws_access_key_id": _AWS_KEYS, "access_key": _AWS_KEYS,
    "secret": "AWS_SECRET_ACCESS_KEY", "password": "AWS_SECRET_ACCESS_KEY",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY", "secret_key": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN", "session_token": "AWS_SESSION_TOKEN", "aws_session_token": "AWS_SESSION_TOKEN",
    "account_key": "AZURE_STORAGE_ACCOUNT_KEY", "sas_token": "AZURE_STORAGE_SAS_TOKEN",
    "connection_string": "AZURE_STORAGE_CONNECTION_STRING", "client_secret": "AZURE_STORAGE_CLIENT_SECRET",
    "credential": "", "credentials": "",
    # S3 server-side encryption with a customer key (boto3 params; the MD5 is derived from the key, and
    # boto3 computes it itself, so it never needs writing either)
    "ssecustomerkey": "FSSPEC_S3", "ssecustomerkeymd5": "FSSPEC_S3", "sse_customer_key": "FSSPEC_S3",
    "copysourcessecustomerkey": "FSSPEC_S3", "copysourcessecustomerkeymd5": "FSSPEC_S3",
    # HTTP headers (fsspec's http filesystem, client_kwargs.headers)
    "authorization": "", "proxy-authorization": "", "cookie": "",
    "x-amz-server-side-encryption-customer-key": "FSSPEC_S3",
}
# Any other option with one of these in its name holds a credential too.
CREDENTIAL_OPTION = re.compile(r"SECRET|PASSW(OR)?D|TOKEN|CREDENTIAL|PRIVATE_?KEY|API_?KEY|ACCESS_?KEY|ACCOUNT_?KEY"
                               r"|CUSTOMER_?KEY|SAS|CONNECTION_?STRING|AUTHORIZATION|COOKIE", re.I)
# gcsfs' token: one of its methods, or the path of a key file (local or gs://), is a reference, not a credential.
GCS_TOKEN_METHODS = frozenset({"google_default", "cache", "anon", "browser", "cloud"})
GCS_PROTOCOLS = frozenset({"gs", "gcs"})
_KEY_FILE = re.compile(r"^\S+\.json$", re.I)


def protocols_of(*uris: str | None) -> frozenset[str]:
    """The fsspec protocols of ``uris`` (``s3`` for s3://...; local paths have none)."""
    return frozenset(u.split("://", 1)[0].lower() for u in uris if isinstance(u, str) and "://" in u)


def _credential_var(name: str, protocols: frozenset[str]) -> str | None:
    low = name.lower()
    var = STORE_CREDENTIALS.get(low)
    if low == "token" and protocols & GCS_PROTOCOLS:
        return "GOOGLE_APPLICATION_CREDENTIALS"
    if low in ("username", "password") and protocols and not protocols & {"s3", "s3a"}:
        return ""  # sftp, ftp, smb, webdav: no standard variable
    if var is None and CREDENTIAL_OPTION.search(name):
        return ""
    return var


def storage_credential(name: str, value: Any, protocols: frozenset[str] = frozenset()) -> str | None:
    """The problem line (without the field) for the storage option ``name``, or None when it holds no
    credential. ``protocols``: those of the URIs the options apply to. Never quotes ``value``.
    An empty option (null, "", true/false) holds none: nothing of it could leak."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    if name.lower() == "token" and protocols & GCS_PROTOCOLS and isinstance(value, str) and (
            value in GCS_TOKEN_METHODS or _KEY_FILE.match(value)):
        return None
    var = _credential_var(name, protocols)
    if var is None:
        return None
    return ("credentials must not be written in the spec (they would be copied into scripts, manifests and run "
            f"folders); {_store_fix(var, name)}")


_PASS = "slurm.env_passthrough: [{v}] (taken from the submitting shell) or kubernetes.secret_env (a Kubernetes Secret)"


def _store_fix(var: str, name: str) -> str:
    if var == "FSSPEC_S3":
        return ("pass the whole s3_additional_kwargs (SSECustomerAlgorithm and SSECustomerKey) by reference in the job's "
                "FSSPEC_S3 variable, JSON that fsspec reads at start-up, e.g. "
                "FSSPEC_S3='{\"s3_additional_kwargs\": {\"SSECustomerAlgorithm\": \"AES256\", \"SSECustomerKey\": ...}}', "
                f"through {_PASS.format(v='FSSPEC_S3')}; see docs/storage.md")
    if var == "GOOGLE_APPLICATION_CREDENTIALS":
        return ("point GOOGLE_APPLICATION_CREDENTIALS at a key file on the nodes (a mounted Kubernetes Secret, a "
                f"shared path) through {_PASS.format(v='GOOGLE_APPLICATION_CREDENTIALS')}, or set token to a path "
                "ending in .json or to google_default/cloud (workload identity, the node's service account)")
    if name.lower() in ("authorization", "proxy-authorization", "cookie"):
        return ("an authorization header cannot be passed by reference; give the store's credentials through the "
                f"job's environment ({_PASS.format(v='...')}) or use a store that reads them from there")
    if var.startswith("AWS_"):
        names = ", ".join(var.split(" and "))
        return (f"set {var} in the job's environment instead: {_PASS.format(v=names)}, or let botocore's own "
                "chain find them (AWS_PROFILE, an instance role, IRSA)")
    if var.startswith("AZURE_STORAGE_"):
        v = var.split(" ", 1)[0]
        return (f"set {var} in the job's environment instead (adlfs reads it): {_PASS.format(v=v)}, or use a "
                "managed identity")
    return ("give it to the job through its environment instead: " + _PASS.format(v="...")
            + ", or the store's own credential chain (an instance role, workload identity)")


def fsspec_env_credential(name: str, value: str) -> str | None:
    """The problem with the environment variable ``name`` when it is fsspec configuration
    (FSSPEC_<PROTOCOL> JSON, FSSPEC_<PROTOCOL>_<OPTION>) that holds a credential option; else None."""
    import json

    parts = name.split("_", 2)
    if len(parts) < 2 or parts[0] != "FSSPEC" or not parts[1] or not isinstance(value, str) or not value:
        return None
    protocols = frozenset({parts[1].lower()})
    if len(parts) == 3:
        found = storage_credential(parts[2], value, protocols) is not None
    else:
        try:
            data = json.loads(value)
        except ValueError:
            return None
        found = any(True for _ in credential_options(data, protocols))
    if not found:
        return None
    return (f"{name}: fsspec configuration that holds a credential; never put its value in the spec. Reference it "
            f"instead: slurm.env_passthrough: [{name}] (taken from the submitting shell) or kubernetes.secret_env "
            "(a Kubernetes Secret)")


def credential_options(opts: Any, protocols: frozenset[str] = frozenset(),
                       where: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(option path, problem) of every credential among nested ``storage_options``."""
    if not isinstance(opts, dict):
        return
    for key, value in opts.items():
        problem = storage_credential(str(key), value, protocols)
        if problem is not None:
            yield where + (str(key),), problem
        elif isinstance(value, dict):
            yield from credential_options(value, protocols, where + (str(key),))


def fix_for(path: tuple[Any, ...]) -> str:
    """How to pass this value by reference instead."""
    names = [p for p in path if isinstance(p, str)]
    if "storage_options" in names:
        options = names[names.index("storage_options") + 1:]
        known = [(var, n) for n in options if (var := _credential_var(n, frozenset()))]
        if known:  # an option whose store has its own variable (or FSSPEC_S3) for it
            return _store_fix(*known[0])
    if any("storage_options" in p for p in names):
        return ("give the job credentials through its environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AZURE_STORAGE_*, GOOGLE_APPLICATION_CREDENTIALS: slurm.env_passthrough, kubernetes.secret_env or "
                "kubernetes.env_from_secrets) or an instance role / workload identity")
    return ("reference it instead: slurm.env_passthrough (taken from the submitting shell), kubernetes.secret_env or "
            "kubernetes.env_from_secrets (a Kubernetes Secret)")


def message(kind: str, path: tuple[Any, ...]) -> str:
    """The problem line for a secret found at ``path`` (never the value)."""
    return (f"the value looks like a secret ({kind}) and would be written into scripts, manifests and run "
            f"folders; {fix_for(path)}")


def redact_override(item: str) -> str:
    """A ``--set KEY=VALUE`` for a command line shown to people: secret-looking values become ``<secret:KEY>``."""
    key, sep, value = item.partition("=")
    name = key.strip().rsplit(".", 1)[-1]
    if sep and value.strip() and (secret_kind(name, value) or CREDENTIAL_NAME.search(name)):
        return f"{key}=<secret:{key.strip()}>"
    return item


def generate() -> str:
    """The text of :mod:`ftcluster.spec.secret_patterns`, from the installed detect-secrets."""
    import importlib.metadata

    from detect_secrets.plugins.base import RegexBasedDetector

    plugins = _plugins() or {}
    lines = ['"""detect-secrets\' regex plugins, copied for the fast screen in ftcluster.spec.secrets.',
             "",
             "Generated by `python -m ftcluster.spec.secrets` -- do not edit. tests/unit/spec/test_secrets.py checks that this",
             'file matches the installed detect-secrets."""',
             "",
             f"DETECT_SECRETS_VERSION = {importlib.metadata.version('detect-secrets')!r}",
             "",
             "# (plugin class, secret type, pattern, flags)",
             "PATTERNS: tuple[tuple[str, str, str, int], ...] = ("]
    for name in sorted(plugins):
        cls = plugins[name]
        if not issubclass(cls, RegexBasedDetector) or name == "IPPublicDetector":  # an IP is no secret
            continue
        # The base declares denylist an abstractproperty; every plugin class sets it to compiled patterns.
        for rx in cast("Iterable[re.Pattern[str]]", cls.denylist):
            flags = int(rx.flags & ~re.UNICODE)
            lines.append(f"    ({name!r}, {cls.secret_type!r}, {rx.pattern!r}, {flags}),")
    lines.append(")")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from pathlib import Path

    Path(__file__).with_name("secret_patterns.py").write_text(generate())
