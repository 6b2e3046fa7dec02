"""EnvHub: environment images built locally from TOML specs, tagged by the hash of their spec.

A spec ``sandboxd/envs/<name>.toml`` names a Debian suite, an mmdebstrap variant, packages, Python
wheels, files and optional setup commands. Its image is ``rollstream-env/<name>:<12 hex of
sha256(spec)>``, so the same spec always gives the same tag and a changed spec gives a new one.

Every image gets the users sandboxd runs commands as (``sandboxd.users``: ``agent`` and
``rs-verify``), unless its spec says ``sandbox_users = false``.

Python packages: pip inside the root cannot reach an index, so the host builds the wheels
(``pip wheel --no-deps``, for the host's Python, which must be the image's: bookworm and this host
both have 3.11) and installs them into the root's ``/usr/local/lib/python3.X/dist-packages``.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
import structlog

from sandboxd.errors import EnvHubError
from sandboxd.users import (
    AGENT_GID,
    AGENT_HOME,
    AGENT_UID,
    AGENT_USER,
    VERIFIER_GID,
    VERIFIER_UID,
    VERIFIER_USER,
)

ENVS_DIR = Path(__file__).parent / "envs"
MIRROR = "http://deb.debian.org/debian"
WORKDIR = "/work"

# mmdebstrap customize hook ($1 = the root): the agent's and the verifier's users and groups.
USERS_HOOK = (
    f'chroot "$1" groupadd -g {AGENT_GID} {AGENT_USER}'
    f' && chroot "$1" groupadd -g {VERIFIER_GID} {VERIFIER_USER}'
    f' && chroot "$1" useradd -u {AGENT_UID} -g {AGENT_GID} -d {AGENT_HOME} -M -s /bin/bash {AGENT_USER}'
    f' && chroot "$1" useradd -u {VERIFIER_UID} -g {VERIFIER_GID} -d /nonexistent -M -s /usr/sbin/nologin'
    f" {VERIFIER_USER}"
)

log = structlog.get_logger()

Progress = Callable[[str], None]


class EnvSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What an environment image contains."""

    suite: Annotated[str, msgspec.Meta(description="Debian suite, e.g. `bookworm`.")] = "bookworm"
    variant: Annotated[str, msgspec.Meta(description="mmdebstrap variant, e.g. `minbase`.")] = "minbase"
    packages: Annotated[list[str], msgspec.Meta(description="Debian packages to include.")] = []
    setup: Annotated[
        list[str],
        msgspec.Meta(description="Shell commands run once in the image (no network), then committed."),
    ] = []
    python_wheels: Annotated[
        list[str],
        msgspec.Meta(
            description="Pinned pip requirements, each installed with --no-deps (list every dependency) "
            "from wheels built on the host; the image needs `python3` of the host's version."
        ),
    ] = []
    sandbox_users: Annotated[
        bool,
        msgspec.Meta(
            description=f"Create the users sandboxd runs commands as: `{AGENT_USER}` (uid {AGENT_UID}, "
            f"home {AGENT_HOME}) and `{VERIFIER_USER}` (uid {VERIFIER_UID}). Without them commands still "
            "run under those uids, nameless."
        ),
    ] = True
    files: Annotated[
        dict[str, str],
        msgspec.Meta(
            description="Absolute image path -> source file relative to sandboxd/envs (or to the spec "
            "file of a task's environment); the contents are part of the tag."
        ),
    ] = {}
    # What a task's environment (``<task>/environment/envhub.toml``) may also need; left empty, a
    # spec keeps its tag.
    workdir: Annotated[str, msgspec.Meta(description="The image's working directory (default /work).")] = ""
    env: Annotated[dict[str, str], msgspec.Meta(description="Environment variables set in the image.")] = {}
    user: Annotated[str, msgspec.Meta(description="The user commands run as (default root).")] = ""


class EnvInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    tag: str
    built: bool
    size_bytes: int | None


def spec_path(name: str) -> Path:
    return ENVS_DIR / f"{name}.toml"


def env_names() -> list[str]:
    """Names of all environment specs shipped in ``sandboxd/envs``."""
    return sorted(p.stem for p in ENVS_DIR.glob("*.toml"))


def load_spec(name: str) -> EnvSpec:
    """Read and validate ``envs/<name>.toml``; a bad spec raises EnvHubError naming the problem."""
    path = spec_path(name)
    if not path.is_file():
        known = ", ".join(env_names()) or "none"
        raise EnvHubError(f"unknown environment {name!r}: no {path} (known: {known}).")
    return load_spec_file(path, ENVS_DIR)


def load_spec_file(path: Path, root: Path) -> EnvSpec:
    """Read and validate a spec file whose ``files`` are relative to ``root``."""
    try:
        spec = msgspec.toml.decode(path.read_bytes(), type=EnvSpec)
    except msgspec.ValidationError as exc:
        raise EnvHubError(f"invalid environment spec {path}: {exc}; fix that field.") from exc
    except msgspec.DecodeError as exc:
        raise EnvHubError(f"{path} is not valid TOML: {exc}.") from exc
    for dst, src in spec.files.items():
        if not dst.startswith("/") or not (root / src).is_file():
            raise EnvHubError(
                f"invalid `files` entry {dst!r} = {src!r} in {path}: the key must be an absolute image "
                f"path and the value a file relative to {root}."
            )
    return spec


def spec_hash(spec: EnvSpec, root: Path = ENVS_DIR) -> str:
    """First 12 hex digits of the sha256 of the canonical (sorted-key JSON) spec, with the digests
    of its files. Fields left empty are omitted, so specs that do not use them keep their tags."""
    doc = msgspec.to_builtins(spec, order="sorted")
    for key in ("python_wheels", "files", "workdir", "env", "user"):
        if not doc[key]:
            del doc[key]
    if spec.files:
        doc["file_digests"] = {
            dst: hashlib.sha256((root / src).read_bytes()).hexdigest() for dst, src in spec.files.items()
        }
    canonical = msgspec.json.encode(doc, order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:12]


def image_tag(name: str) -> str:
    """The image tag of environment ``name``: ``rollstream-env/<name>:<spec hash>``."""
    return f"rollstream-env/{name}:{spec_hash(load_spec(name))}"


def _docker() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise EnvHubError(
            "the docker command line is missing: install it with `apt-get install -y docker.io`."
        )
    probe = subprocess.run(
        [exe, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise EnvHubError(
            "no Docker engine answers at /var/run/docker.sock: start dockerd "
            "(`dockerd --iptables=false --bridge=none >/tmp/dockerd.log 2>&1 &`)."
        )
    return exe


def image_size(tag: str) -> int | None:
    """Size in bytes of a local image, or None if it is not built."""
    out = subprocess.run(
        [_docker(), "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True
    )
    return int(out.stdout.strip()) if out.returncode == 0 else None


def image_exists(tag: str) -> bool:
    return image_size(tag) is not None


def list_envs() -> list[EnvInfo]:
    """Every shipped spec with its tag and whether its image is built."""
    infos = []
    for name in env_names():
        tag = image_tag(name)
        size = image_size(tag)
        infos.append(EnvInfo(name=name, tag=tag, built=size is not None, size_bytes=size))
    return infos


def ensure_image(name: str, *, progress: Progress | None = None) -> str:
    """The tag of environment ``name``, building its image first if it is missing."""
    return build(name, force=False, progress=progress)


def build(name: str, *, force: bool = False, progress: Progress | None = None) -> str:
    """Build the image of environment ``name`` (skipped if present unless ``force``); returns its tag."""
    return _build(name, load_spec(name), ENVS_DIR, image_tag(name), force=force, progress=progress)


def build_spec_file(name: str, path: Path, *, progress: Progress | None = None) -> tuple[str, EnvSpec]:
    """The image of a spec file outside sandboxd/envs (a task's ``environment/envhub.toml``; its
    ``files`` relative to it), tagged ``rollstream-env/<name>:<hash>``, built unless present."""
    spec = load_spec_file(path, path.parent)
    tag = f"rollstream-env/{name}:{spec_hash(spec, path.parent)}"
    return _build(name, spec, path.parent, tag, force=False, progress=progress), spec


def _build(name: str, spec: EnvSpec, root: Path, tag: str, *, force: bool, progress: Progress | None) -> str:
    docker = _docker()
    if not force and image_exists(tag):
        return tag
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise EnvHubError("mmdebstrap is missing: install it with `apt-get install -y mmdebstrap`.")
    log.info("env.build.start", env=name, tag=tag, packages=spec.packages)
    base_tag = f"{tag}-base" if spec.setup else tag
    with tempfile.TemporaryDirectory(prefix="rollstream-wheels-") as wheelhouse:
        hooks = _customize_hooks(spec, Path(wheelhouse), progress or (lambda _line: None), root)
        _bootstrap(mmdebstrap, docker, spec, base_tag, progress or (lambda _line: None), hooks)
    if spec.setup:
        _run_setup(docker, spec, base_tag, tag, progress or (lambda _line: None))
    log.info("env.build.done", env=name, tag=tag)
    return tag


def _changes(spec: EnvSpec) -> list[str]:
    """``--change`` arguments of ``docker import`` / ``commit``: workdir, environment, user."""
    changes = ["--change", f"WORKDIR {spec.workdir or WORKDIR}"]
    for key, value in sorted(spec.env.items()):
        changes += ["--change", f"ENV {key}={shlex.quote(value)}"]
    return changes + (["--change", f"USER {spec.user}"] if spec.user else [])


def _customize_hooks(spec: EnvSpec, wheelhouse: Path, progress: Progress, root: Path = ENVS_DIR) -> list[str]:
    """mmdebstrap customize hooks (run on the host, ``$1`` = the root) that copy ``files`` in and
    install ``python_wheels``, whose wheels are built here first (the host can reach PyPI).
    Wheels go to ``wheelhouse/*.whl``, file snapshots to ``wheelhouse/file-<i>``."""
    hooks = [USERS_HOOK] if spec.sandbox_users else []
    for i, (dst, src) in enumerate(sorted(spec.files.items())):
        copy = wheelhouse / f"file-{i}"  # a snapshot: edits during the build cannot reach the image
        shutil.copyfile(root / src, copy)
        hooks.append(f'install -D -m 0644 {shlex.quote(str(copy))} "$1"{shlex.quote(dst)}')
    if not spec.python_wheels:
        return hooks
    progress(f"building wheels: {' '.join(spec.python_wheels)}")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(wheelhouse), *spec.python_wheels],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise EnvHubError(f"pip wheel failed for {spec.python_wheels}: {built.stderr.strip()[-2000:]}")
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    target = f'"$1"/usr/local/lib/{py}/dist-packages'
    wheels = " ".join(shlex.quote(str(w)) for w in sorted(wheelhouse.glob("*.whl")))
    hooks.append(
        f'test -x "$1"/usr/bin/{py} || {{ echo "python_wheels need {py} in the image '
        f'(add python3 to packages)" >&2; exit 1; }}; '
        f"{shlex.join(pip)} install --quiet --no-index --no-deps --target {target} {wheels}"
    )
    return hooks


def _bootstrap(
    mmdebstrap: str, docker: str, spec: EnvSpec, tag: str, progress: Progress, hooks: list[str]
) -> None:
    """mmdebstrap a root filesystem as a tar on stdout and pipe it into ``docker import``."""
    cmd = [mmdebstrap, f"--variant={spec.variant}", "--mode=root", "--format=tar"]
    if spec.packages:
        cmd.append("--include=" + ",".join(spec.packages))
    cmd += [f"--customize-hook={hook}" for hook in hooks]
    cmd += [spec.suite, "-", MIRROR]
    tail: deque[str] = deque(maxlen=30)
    with tempfile.TemporaryFile() as import_out:
        debstrap = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
        assert debstrap.stdout is not None and debstrap.stderr is not None
        importer = subprocess.Popen(
            [docker, "import", *_changes(spec), "-", tag],
            stdin=debstrap.stdout,
            stdout=import_out,
            stderr=subprocess.STDOUT,
        )
        debstrap.stdout.close()  # the importer holds the pipe now
        for raw in debstrap.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            progress(line)
        debstrap_rc = debstrap.wait()
        import_rc = importer.wait()
        import_out.seek(0)
        import_msg = import_out.read().decode(errors="replace").strip()
    if debstrap_rc != 0:
        details = "\n".join(tail)
        raise EnvHubError(f"mmdebstrap failed (exit {debstrap_rc}) building {tag}:\n{details}")
    if import_rc != 0:
        raise EnvHubError(f"docker import failed (exit {import_rc}) for {tag}: {import_msg}")


def _run_setup(docker: str, spec: EnvSpec, base_tag: str, tag: str, progress: Progress) -> None:
    """Run the spec's setup commands in a container of ``base_tag`` (no network), commit it as ``tag``."""
    script = "set -e\n" + "\n".join(spec.setup)
    name = f"rollstream-envbuild-{tag.rsplit(':', 1)[-1]}"
    subprocess.run([docker, "rm", "-f", name], capture_output=True)
    progress("running setup commands")
    run = subprocess.run(
        [
            docker,
            "run",
            "--name",
            name,
            "--network",
            "none",
            "--workdir",
            WORKDIR,
            "--user",
            "0",  # setup runs as root whatever `user` the image will have
            base_tag,
            "bash",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
    )
    try:
        if run.returncode != 0:
            raise EnvHubError(f"setup of {tag} failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
        commit = subprocess.run(
            [docker, "commit", *_changes(spec), "--change", 'CMD ["bash"]', name, tag],
            capture_output=True,
            text=True,
        )
        if commit.returncode != 0:
            raise EnvHubError(f"docker commit failed for {tag}: {commit.stderr.strip()}")
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True)
        subprocess.run([docker, "rmi", base_tag], capture_output=True)
