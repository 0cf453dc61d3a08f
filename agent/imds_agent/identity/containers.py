"""Which container a process runs in, described from its runtime's own state (never guessed from an address).

    directory = ContainerDirectory()                       # /var/lib/docker, /run/containerd, namespace "default"
    info = directory.describe(container_id, cgroup_text)   # Optional[ContainerInfo]; lookup() also says why not
    inside = uid_inside(uid_map_text, host_uid)            # the uid the process's user namespace shows

The container and its runtime come from the process's cgroup path, taken only from the layouts runtimes create
under cgroups that only root can make: slices all the way down to ``docker-<id>.scope``,
``cri-containerd-<id>.scope``, ``crio-<id>.scope`` or ``libpod-<id>.scope``, or the cgroupfs trees ``/docker/<id>``,
``/ecs/<task>/<id>``, ``/kubepods/.../pod<uid>/<id>`` and ``/<namespace>/<id>`` for the containerd namespaces
named (``ctr run`` puts a container there). The first container in the path counts: a container that can write its
own cgroup tree may make a child cgroup named after another container, and a user's delegated tree
(``user@UID.service``) is no slice, so a user cannot name a cgroup after someone else's container either.

Then the runtime's state describes it:

- Docker: ``<docker_root>/containers/<id>/config.v2.json``: ``Name`` (without the leading '/'), ``Config.Image``,
  ``Config.Labels`` (which include the labels the image declares). Kubernetes' dockershim labels
  (``io.kubernetes.pod.namespace``, ``io.kubernetes.pod.name``, ``io.kubernetes.container.name``) fill the pod
  fields only when the container's name is the one dockershim gives it (``k8s_<container>_<pod>_<namespace>_...``):
  an image's author can declare labels, not the name a container is started with.
- containerd: the task bundle ``<state>/io.containerd.runtime.v2.task/<namespace>/<id>/config.json`` (an OCI
  runtime spec): its ``annotations`` are the labels, and the CRI plugin's (``io.kubernetes.cri.sandbox-namespace``,
  ``-sandbox-name``, ``-container-name``, ``-image-name``) fill the pod, the name and the image. A container
  started with ``ctr`` has no image in its bundle (containerd keeps that in its metadata database), so only its id,
  which is also its name, describes it.
- cri-o and podman: recognised from the cgroup path; their state is not read yet, so only the id and the runtime.

The service account is always empty. Neither runtime's state names it: the CRI passes the pod's namespace, name
and uid, not its service account, and dockershim's labels are the same; the token mounted into the pod does name
it, but that is a credential, which this agent never reads. A rule that names a service account never matches.

Image references are written out in full (``nginx`` is ``docker.io/library/nginx:latest``), so that one pattern
fits every runtime. Everything read is bounded: a file is read up to ``MAX_STATE_BYTES`` (a regular file only,
never through a symlink), ids and namespaces are checked before they become part of a path, malformed state is no
information (with the reason), labels are capped in number and length (a label over the cap is left out rather
than cut, because a cut value could match a pattern the whole one does not), and descriptions are cached per
container until the state file's inode, size or mtime changes.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .caller import ContainerInfo, printable

DOCKER_ROOT = "/var/lib/docker"
CONTAINERD_STATE = "/run/containerd"
CONTAINERD_TASKS = "io.containerd.runtime.v2.task"
KUBERNETES_NAMESPACE = "k8s.io"  # the containerd namespace of the CRI plugin
MAX_STATE_BYTES = 1 << 20
MAX_LABELS = 128
MAX_LABEL_KEY = 256
MAX_LABEL_VALUE = 1024
MAX_FIELD = 512
CACHE_SIZE = 512
RUNTIMES = ("docker", "containerd", "cri-o", "podman")

_HEX64 = "[0-9a-f]{64}"
# containerd's identifier grammar (namespaces and container ids): no '/', no '..', at most 76 characters.
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_SCOPE_PREFIX = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}
_SCOPE = re.compile(rf"^(?:/[^/]+\.slice)*/(docker|cri-containerd|crio|libpod)-({_HEX64})\.scope(?:/.*)?$")
_CGROUPFS = (
    (re.compile(rf"^/docker/({_HEX64})(?:/.*)?$"), "docker"),
    (re.compile(rf"^/ecs/[0-9a-f]{{32}}/({_HEX64})(?:/.*)?$"), "docker"),
    (re.compile(rf"^/kubepods(?:/(?:burstable|besteffort))?/pod[0-9a-f-]{{36}}/({_HEX64})(?:/.*)?$"), ""),
    (re.compile(rf"^/libpod_parent/libpod-({_HEX64})(?:/.*)?$"), "podman"),
)
_CTR = re.compile(r"^/([^/]+)/([^/]+)(?:/.*)?$")
_DOCKERSHIM = ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name", "io.kubernetes.container.name")
_CRI = {
    "namespace": "io.kubernetes.cri.sandbox-namespace",
    "pod": "io.kubernetes.cri.sandbox-name",
    "name": "io.kubernetes.cri.container-name",
    "image": "io.kubernetes.cri.image-name",
}
_IMAGE_ID = re.compile(r"(?:sha256:)?[0-9a-f]{12,64}")


@dataclass(frozen=True)
class Location:
    """Where a cgroup path puts a process: the runtime ('' when the layout is shared by several), the
    container's id and, for containerd, its namespace."""

    runtime: str
    id: str
    namespace: str = ""


@dataclass(frozen=True)
class Described:
    """The answer of ``ContainerDirectory.lookup``: the container (None when the process is in none the agent
    recognises) and, when something could not be learnt, why."""

    info: Optional[ContainerInfo]
    reason: str = ""
    read: bool = False  # the runtime's state file was there and was read


def cgroup_path(cgroup_text: str) -> str:
    """The unified (v2) path of a /proc/PID/cgroup file, else the name=systemd one (v1), else ''."""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[0] == "0" or "name=systemd" in parts[1]):
            return parts[2]
    return ""


def locate(cgroup_text: str, containerd_namespaces: Sequence[str] = ()) -> Optional[Location]:
    """The container a /proc/PID/cgroup file places its process in, from the runtimes' own layouts only."""
    path = cgroup_path(cgroup_text)
    found = _SCOPE.match(path)
    if found:
        return Location(_SCOPE_PREFIX[found.group(1)], found.group(2))
    for pattern, runtime in _CGROUPFS:
        found = pattern.match(path)
        if found:
            return Location(runtime, found.group(1))
    found = _CTR.match(path)
    if found and found.group(1) in containerd_namespaces and _identifier(found.group(2)):
        return Location("containerd", found.group(2), found.group(1))
    return None


def uid_inside(uid_map: str, host_uid: int) -> Optional[int]:
    """The uid ``host_uid`` is inside a process's user namespace, from its /proc/PID/uid_map as the host reads it
    (lines of 'inside outside count'; the host's own namespace maps '0 0 4294967295', the identity); None when
    the namespace does not map it (the process then sees the overflow uid)."""
    for line in uid_map.splitlines():
        fields = line.split()
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            continue
        inside, outside, count = (int(f) for f in fields)
        if outside <= host_uid < outside + count:
            return inside + host_uid - outside
    return None


def normalize_image(ref: str) -> str:
    """An image reference in full, as the runtimes resolve it: 'nginx' -> 'docker.io/library/nginx:latest',
    'registry:5000/app' -> 'registry:5000/app:latest'; a digest is kept, an image id is returned as it is."""
    if not ref or _IMAGE_ID.fullmatch(ref):
        return ref
    name, at, digest = ref.partition("@")
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost" and first == first.lower()):
        domain, remainder = "docker.io", name
    else:
        domain, remainder = first, rest
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in remainder:
        remainder = "library/" + remainder
    if not at and ":" not in remainder.rsplit("/", 1)[-1]:
        remainder += ":latest"
    return f"{domain}/{remainder}{at}{digest}"


def describe_workload(info: ContainerInfo, uid: Optional[int] = None) -> str:
    """A one-line description of a container for logs and messages, everything the runtime's state supplied
    escaped (names, images and labels are chosen by whoever starts a container)."""
    parts = [f"{info.runtime} container {info.id[:12]}"]
    if info.name:
        parts.append(f"name {printable(info.name, 128)}")
    if info.image:
        parts.append(f"image {printable(info.image, 256)}")
    if info.pod_namespace or info.pod_name:
        parts.append(f"pod {printable(info.pod_namespace, 128)}/{printable(info.pod_name, 128)}")
    if info.service_account:
        parts.append(f"service account {printable(info.service_account, 128)}")
    if uid is not None:
        parts.append(f"uid {uid} inside")
    return ", ".join(parts)


class ContainerDirectory:
    """Describes containers from the runtimes' state files, with a bounded cache; safe to share between threads."""

    def __init__(
        self,
        docker_root: str = DOCKER_ROOT,
        containerd_state: str = CONTAINERD_STATE,
        containerd_namespaces: Sequence[str] = ("default",),
        max_bytes: int = MAX_STATE_BYTES,
        cache_size: int = CACHE_SIZE,
    ):
        self.docker_root = docker_root
        self.containerd_state = containerd_state
        self.containerd_namespaces = tuple(n for n in containerd_namespaces if _identifier(n))
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, str], tuple[tuple[int, ...], Described]] = OrderedDict()

    def describe(self, container_id: Optional[str], cgroup_text: str) -> Optional[ContainerInfo]:
        """The container of a process whose /proc/PID/cgroup reads ``cgroup_text``, or None; ``container_id``
        (what identity/procs.py found, if anything) must be the one the runtime's layout names."""
        return self.lookup(container_id, cgroup_text).info

    def lookup(self, container_id: Optional[str], cgroup_text: str) -> Described:
        """As ``describe``, with the reason when the container is not recognised or its state is unusable."""
        where = locate(cgroup_text, self.containerd_namespaces)
        if where is None:
            why = "the cgroup path is not in any runtime's layout" if container_id else ""
            return Described(None, why)
        if container_id is not None and container_id != where.id:
            return Described(None, f"the cgroup path names container {where.id[:12]}, not {container_id[:12]}")
        if where.runtime == "docker":
            return self._docker(where.id)
        if where.runtime == "containerd":
            return self._containerd(where.id, where.namespace or KUBERNETES_NAMESPACE)
        if where.runtime:
            return Described(ContainerInfo(where.id, where.runtime), f"{where.runtime}'s state is not read")
        # /kubepods/.../<id> is the layout of every CRI runtime on cgroupfs: the state found says which one.
        for found in (self._containerd(where.id, KUBERNETES_NAMESPACE), self._docker(where.id)):
            if found.read:
                return found
        return Described(ContainerInfo(where.id, "unknown"), "no runtime's state describes it")

    def _docker(self, cid: str) -> Described:
        path = os.path.join(self.docker_root, "containers", cid, "config.v2.json")
        return self._cached(("docker", "", cid), path, lambda doc: _from_docker(cid, doc))

    def _containerd(self, cid: str, namespace: str) -> Described:
        path = os.path.join(self.containerd_state, CONTAINERD_TASKS, namespace, cid, "config.json")
        return self._cached(("containerd", namespace, cid), path, lambda doc: _from_containerd(cid, namespace, doc))

    def _cached(self, key: tuple[str, str, str], path: str, parse: Callable[[Any], Described]) -> Described:
        """The description from the state file at ``path``, parsed again only when the file changed."""
        runtime, _, cid = key
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            return Described(ContainerInfo(cid, runtime), f"no state at {path} ({exc.strerror})")
        signature: tuple[int, ...] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == signature:
                self._cache.move_to_end(key)
                return hit[1]
        doc, signature, problem = _read_json(path, self.max_bytes)
        found = Described(ContainerInfo(cid, runtime), problem, read=True) if problem else parse(doc)
        with self._lock:
            self._cache[key] = (signature, found)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return found


def _identifier(text: str) -> bool:
    return len(text) <= 76 and _IDENTIFIER.fullmatch(text) is not None


def _read_json(path: str, limit: int) -> tuple[Any, tuple[int, ...], str]:
    """The JSON document at ``path``, the opened file's signature, and what was wrong ('' when nothing was). A
    FIFO or device is refused without blocking, a symlink is not followed, and at most ``limit`` bytes are read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, (), f"cannot open {path} ({exc.strerror})"
    try:
        st = os.fstat(fd)
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if not stat.S_ISREG(st.st_mode):
            return None, signature, f"{path} is not a regular file"
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        return None, (), f"cannot read {path} ({exc.strerror})"
    finally:
        os.close(fd)
    if len(data) > limit:
        return None, signature, f"{path} is over {limit} bytes"
    try:
        return json.loads(data), signature, ""
    except (ValueError, RecursionError) as exc:
        return None, signature, f"{path} is not JSON ({type(exc).__name__})"


def _field(value: Any) -> str:
    """A string field of the state, or '' when it is missing, not a string or over the cap."""
    return value if isinstance(value, str) and len(value) <= MAX_FIELD else ""


def _labels(raw: Any) -> tuple[tuple[tuple[str, str], ...], str]:
    """Sorted (key, value) pairs of a label mapping, capped; and what was left out."""
    if not isinstance(raw, Mapping):
        return (), ""
    kept = sorted(
        (k, v)
        for k, v in raw.items()
        if isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= MAX_LABEL_KEY and len(v) <= MAX_LABEL_VALUE
    )
    dropped = len(raw) - len(kept) + max(0, len(kept) - MAX_LABELS)
    return tuple(kept[:MAX_LABELS]), f"{dropped} labels left out (over the caps)" if dropped else ""


def _from_docker(cid: str, doc: Any) -> Described:
    if not isinstance(doc, dict) or doc.get("ID") != cid or not isinstance(doc.get("Config"), dict):
        return Described(ContainerInfo(cid, "docker"), "config.v2.json does not describe this container", True)
    config = doc["Config"]
    name = _field(doc.get("Name")).lstrip("/")
    labels, note = _labels(config.get("Labels"))
    got = dict(labels)
    namespace, pod, container = (got.get(k, "") for k in _DOCKERSHIM)
    # dockershim names its containers k8s_<container>_<pod>_<namespace>_<pod uid>_<attempt>; labels alone could
    # come from the image.
    if namespace and pod and container and name.startswith(f"k8s_{container}_{pod}_{namespace}_"):
        name = container
    else:
        namespace = pod = ""
    info = ContainerInfo(cid, "docker", name, normalize_image(_field(config.get("Image"))), labels, namespace, pod)
    return Described(info, note, True)


def _from_containerd(cid: str, namespace: str, doc: Any) -> Described:
    if not isinstance(doc, dict):
        return Described(ContainerInfo(cid, "containerd"), "config.json is not an OCI runtime spec", True)
    labels, note = _labels(doc.get("annotations"))
    got = dict(labels)
    name = _field(got.get(_CRI["name"], "")) or (cid if namespace != KUBERNETES_NAMESPACE else "")
    image = normalize_image(_field(got.get(_CRI["image"], "")))
    pod_namespace, pod = _field(got.get(_CRI["namespace"], "")), _field(got.get(_CRI["pod"], ""))
    return Described(ContainerInfo(cid, "containerd", name, image, labels, pod_namespace, pod), note, True)
