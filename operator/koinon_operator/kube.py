"""The few direct Kubernetes API calls the operator makes outside kopf (kopf has no delete)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import kopf
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config

from koinon_operator.api.constants import AIJOB_PLURAL, GROUP, VERSION

# The kubernetes client writes a kubeconfig's certificate-authority-data (and client cert/key data)
# to a mkstemp file at each load, and removes at exit only the one file it remembers per content:
# its bookkeeping is not thread-safe, so loads racing in worker threads (the Lease, the reputation
# book, the result recheck) each left a file in $TMPDIR for good. Every load in this process goes
# through this lock, kopf's login included (see login), and happens once per configuration source,
# and again CONFIG_RELOAD_SECONDS after the last (sequential loads of the same content reuse the
# client's one file for it).
_config_lock = threading.Lock()
_loaded_from: tuple[object, ...] | None = None
_loaded_at = float("-inf")  # _monotonic() at that load
_monotonic = time.monotonic
# What a kubeconfig's user reads only at load, and no refresh hook reads again: an exec plugin's
# token without expirationTimestamp (or its client certificate), an auth provider's. Loaded at
# every call until 63fb486, which kept it for good: a token rotated behind the kubeconfig then got
# 401s (the Lease's renewals too, so leadership lapsed). A tokenFile is part of the source itself
# (_config_source): its rotation is picked up at the next load, not up to this long after it.
CONFIG_RELOAD_SECONDS = 60.0
# The client's temp files no longer referenced by the default configuration, and since when (by
# _monotonic(): the load that superseded them). An exec plugin that mints a client certificate at
# each run made every reload write two more files (cert and key: new content, new files), kept
# until exit. They are removed once superseded for SUPERSEDED_TEMP_FILE_SECONDS, not at once nor
# one load later: an API client built from an earlier configuration (in another thread) reads its
# cert_file and key_file again for every new connection urllib3 opens, and one such client may
# live for minutes (the reputation book's read-modify-write: up to 20 tries of two requests with
# 10 s timeouts, each retry after a timeout a new connection) while the Lease reloads every
# CONFIG_RELOAD_SECONDS. kopf reads its login's files once, into its SSL context.
SUPERSEDED_TEMP_FILE_SECONDS = 600.0
_superseded: dict[str, float] = {}


def _token_files(kubeconfig: bytes, base: Path) -> tuple[tuple[str, bytes | None], ...]:
    """The tokenFile of every user of a kubeconfig, with its content (None: unreadable). Resolved
    as the client resolves it, against the kubeconfig's own directory. A file the client cannot
    parse either names none."""
    try:
        parsed = yaml.safe_load(kubeconfig)
    except yaml.YAMLError:
        return ()
    users = parsed.get("users") if isinstance(parsed, dict) else None
    found: list[tuple[str, bytes | None]] = []
    for entry in users if isinstance(users, list) else ():
        user = entry.get("user") if isinstance(entry, dict) else None
        token_file = user.get("tokenFile") if isinstance(user, dict) else None
        if not isinstance(token_file, str) or not token_file:
            continue
        path = os.path.normpath(os.path.join(base, token_file))
        try:
            found.append((path, Path(path).read_bytes()))
        except OSError:
            found.append((path, None))
    return tuple(found)


def _config_source() -> tuple[object, ...]:
    """What a load would read: the in-cluster environment and the kubeconfig files, by content (a
    kubeconfig rewritten in place, or the client's default location pointed elsewhere as the tests
    do, is loaded again), with the token files their users name (a rotated token is loaded again:
    the client reads it at load only)."""
    location = str(kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
    contents: list[object] = []
    for path in location.split(kube_config.ENV_KUBECONFIG_PATH_SEPARATOR):
        file = Path(path).expanduser()
        try:
            content = file.read_bytes()
        except OSError:
            contents.append(None)
            continue
        contents.append((content, _token_files(content, file.absolute().parent)))
    environ = (os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT"))
    return (*environ, location, tuple(contents))


def load_config() -> None:
    """Points the kubernetes client's default configuration at the cluster: in-cluster, else the
    kubeconfig. Thread-safe; loads again when the source changed, and CONFIG_RELOAD_SECONDS after
    the last load (tokens with an expiry are refreshed by the hooks the client sets on the
    configuration; one without is read at load only)."""
    global _loaded_from, _loaded_at
    with _config_lock:
        source = _config_source()
        now = _monotonic()
        if source == _loaded_from and now - _loaded_at < CONFIG_RELOAD_SECONDS:
            return
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        _loaded_from, _loaded_at = source, now
        _drop_superseded_temp_files()


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own login through the kubernetes client (what it uses when no login handler is
    registered), under the lock above: kopf logs in from a thread while the Lease's first step
    loads the configuration in another, and the two raced for the CA file like any two loads."""
    global _loaded_from, _loaded_at
    with _config_lock:
        source = _config_source()
        now = _monotonic()
        info = kopf.login_via_client(**kwargs)
        _loaded_from, _loaded_at = source, now  # the default configuration is now this source's
        _drop_superseded_temp_files()
        return info


def _drop_superseded_temp_files() -> None:
    """Removes the client's temp files that no configuration loaded in the last
    SUPERSEDED_TEMP_FILE_SECONDS references (see _superseded). Called under _config_lock, right
    after a load."""
    now = _monotonic()
    current = client.Configuration.get_default_copy()
    referenced = {current.ssl_ca_cert, current.cert_file, current.key_file}
    files: dict[str, str] = kube_config._temp_files  # by content; rebound by the client at exit
    for key, path in list(files.items()):
        if path in referenced:
            _superseded.pop(path, None)  # the same content loaded again: in use once more
            continue
        since = _superseded.setdefault(path, now)
        if now - since >= SUPERSEDED_TEMP_FILE_SECONDS:
            del files[key]
            del _superseded[path]
            with contextlib.suppress(OSError):  # gone already: nothing left to leak
                os.remove(path)
    kept = set(files.values())
    for path in [p for p in _superseded if p not in kept]:  # the client's own exit cleanup, say
        del _superseded[path]


async def delete_aijob(namespace: str, name: str, uid: str) -> None:
    """Deletes the AIJob ``namespace/name`` if it is still the object ``uid``: one deleted and
    created again under the same name meanwhile is another job, and stays."""

    def call() -> None:
        load_config()
        api = client.CustomObjectsApi()
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, AIJOB_PLURAL, name, body=options)
        except ApiException as error:
            if error.status not in (404, 409):  # gone, or another object under that name now
                raise

    await asyncio.to_thread(call)


# Page size of list_aijob_uids: kube-apiserver's own default cap for a paged LIST is 500 too.
AIJOB_LIST_PAGE = 500
AIJOB_LIST_TIMEOUT_S = 30.0  # per page


class IncompleteListError(RuntimeError):
    """A LIST of AIJobs that cannot be taken as every AIJob there is."""


async def list_aijob_uids(namespace: str | None) -> set[str]:
    """The uids of every AIJob that exists now, in ``namespace`` (None: all namespaces), each
    object's deletion pending or not. A fresh LIST from the API server, not kopf's watch cache:
    what the orphan sweep (orphans.py) stops a Ray job on must not lag behind the cluster. The
    pages of one LIST are one snapshot (kube-apiserver's continue tokens pin its resourceVersion);
    any error (a 410 for an expired token included) is raised, never a partial answer."""

    def call() -> set[str]:
        load_config()
        api = client.CustomObjectsApi()
        uids: set[str] = set()
        token: str | None = None
        while True:
            # A timeout of its own: keepalive is off in the client, so an API server that took the
            # request and never answers (its node gone mid-request) would hold the sweep for good.
            paging: dict[str, Any] = {"limit": AIJOB_LIST_PAGE, "_request_timeout": AIJOB_LIST_TIMEOUT_S}
            if token:
                paging["_continue"] = token
            if namespace:
                listed = api.list_namespaced_custom_object(GROUP, VERSION, namespace, AIJOB_PLURAL, **paging)
            else:
                listed = api.list_cluster_custom_object(GROUP, VERSION, AIJOB_PLURAL, **paging)
            if not isinstance(listed, dict) or not isinstance(items := listed.get("items"), list):
                raise IncompleteListError(f"AIJob list without items: {str(listed)[:200]}")
            for item in items:
                uid = ((item or {}).get("metadata") or {}).get("uid") if isinstance(item, dict) else None
                if not isinstance(uid, str) or not uid:
                    # One object that cannot be named may be the owner of any Ray job.
                    raise IncompleteListError("an AIJob in the list has no metadata.uid")
                uids.add(uid)
            token = (listed.get("metadata") or {}).get("continue") or None
            if not token:
                return uids

    return await asyncio.to_thread(call)


# The key of each attempt's submission ids (reconciler.keyed_submission_nonce), in the operator's
# own namespace: where every operator of one pool competes for the Lease (leadership.py), so every
# replica that may lead reads the same key, and a restarted one the key its predecessor used.
SUBMISSION_KEY_SECRET = "koinon-operator-submission-key"
SUBMISSION_KEY_FIELD = "key"
SUBMISSION_KEY_BYTES = 32
# Statuses the API server answers with that no retry of the start can cure (the Role missing, the
# namespace gone): the operator exits (kopf.PermanentError) rather than wait looking alive.
_REFUSED = (400, 401, 403, 404, 422)


def _stored_submission_key(secret: Any, namespace: str) -> bytes:
    data = getattr(secret, "data", None) or {}
    raw = data.get(SUBMISSION_KEY_FIELD)
    try:
        key = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
    except ValueError:
        key = b""
    if len(key) < SUBMISSION_KEY_BYTES:
        # Refused rather than replaced: someone wrote it (the operator makes a whole key), and a
        # short key could be guessed, and every attempt's ids with it; the operator may not update
        # Secrets, and whoever can should see why it stopped.
        raise kopf.PermanentError(
            f"Secret {namespace}/{SUBMISSION_KEY_SECRET}: data.{SUBMISSION_KEY_FIELD}: must hold at least "
            f"{SUBMISSION_KEY_BYTES} bytes (base64); fix or delete the Secret"
        )
    return key


def get_or_create_submission_key(namespace: str) -> bytes:
    """The key in Secret koinon-operator-submission-key of ``namespace``, created (32 random bytes)
    when there is none. Replicas starting together may both create it: the one that loses (409)
    reads the winner's, so all use one key. Blocking (the kubernetes client): run in a thread."""
    load_config()
    api = client.CoreV1Api()
    for _ in range(3):  # read, or create; a create that lost the race reads again
        try:
            return _stored_submission_key(api.read_namespaced_secret(SUBMISSION_KEY_SECRET, namespace), namespace)
        except ApiException as error:
            if error.status != 404:
                raise _start_error(error, "read", namespace) from error
        value = base64.b64encode(secrets.token_bytes(SUBMISSION_KEY_BYTES)).decode()
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=SUBMISSION_KEY_SECRET,
                namespace=namespace,
                labels={"app.kubernetes.io/name": "koinon-operator", "app.kubernetes.io/part-of": "koinon"},
            ),
            type="Opaque",
            data={SUBMISSION_KEY_FIELD: value},
        )
        try:
            api.create_namespaced_secret(namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise _start_error(error, "create", namespace) from error
            continue  # another replica created it first: use theirs
        return base64.b64decode(value)
    raise kopf.TemporaryError(f"Secret {namespace}/{SUBMISSION_KEY_SECRET}: created and deleted again meanwhile")


def _start_error(error: ApiException, verb: str, namespace: str) -> Exception:
    message = f"cannot {verb} Secret {namespace}/{SUBMISSION_KEY_SECRET} ({error.status} {error.reason})"
    if error.status in _REFUSED:
        return kopf.PermanentError(f"{message}: see manifests/operator/rbac.yaml")
    return kopf.TemporaryError(message, delay=10)
