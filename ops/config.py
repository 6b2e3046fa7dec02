"""One configuration, ``rollstream.toml``: the sections of every part, composed into ``Config``.

Each part declares its own settings next to its code (``producers.settings``, ``consumers.settings``,
``consumers.lake.settings``, ``learner.settings``, ``sandboxd.settings``, ``agent_harness.settings``,
``agent_harness.proxy``, ``agent_harness.model`` for ``[policy]``); this module declares only the ops
sections (broker, metrics, process counts), composes them, and derives the run's paths. Decoded once
(file, then ``--set section.key=value`` flags); ``ops.pipeline`` hands each worker its own section.
Workers never read ``os.environ``. Unknown keys are errors that name the key; a policy that cannot
load (path, device, chat template) is one too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agent_harness.model import PolicySettings, check_policy
from agent_harness.proxy import ProxySettings
from agent_harness.server import ServeSettings
from consumers.lake.settings import LakeSettings
from consumers.settings import RewardSettings, RolloutSettings
from learner.settings import LearnerSettings
from ops.evaluation.settings import EvalSettings
from producers.settings import ProducerSettings
from sandboxd.settings import SandboxdSettings
from streams.topology import ack_wait_for


class ConfigError(ValueError):
    """A configuration problem, in one sentence naming the key and the fix."""


def _meta(description: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=description, **constraints)


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: Annotated[str, _meta("Broker URL the workers connect to; empty = the one `just up` starts.")] = ""
    host: Annotated[str, _meta("Address the embedded nats-server listens on.")] = "127.0.0.1"
    port: Annotated[int, _meta("Port of the embedded nats-server.", ge=1, le=65535)] = 4222
    creds_dir: Annotated[str, _meta("Directory of per-role credentials; empty = no auth (tests).")] = ""


class MetricsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    base_port: Annotated[
        int, _meta("`just up` gives worker k the Prometheus port base_port + k on 127.0.0.1; 0 = off.", ge=0)
    ] = 9400


class ProcessCounts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sandboxd: Annotated[int, _meta("sandboxd processes.", ge=0)] = 1
    producer: Annotated[int, _meta("Task producers.", ge=0, le=1)] = 1
    rollout: Annotated[int, _meta("Rollout group processes.", ge=0)] = 1
    reward: Annotated[int, _meta("Reward group processes.", ge=0)] = 1
    learner: Annotated[int, _meta("Learner processes.", ge=0, le=1)] = 1
    lake: Annotated[int, _meta("Lake writer processes.", ge=0)] = 1
    proxy: Annotated[
        int, _meta("OpenAI-compatible model proxies (proxy.port; one per host).", ge=0, le=1)
    ] = 0
    eval: Annotated[int, _meta("Background evaluators (`[eval] every` > 0 starts one).", ge=0, le=1)] = 0
    serve: Annotated[
        int,
        _meta(
            "`rollstream serve` inference servers (server k on serve.port + k); with "
            "rollout.engine = openai and no rollout.openai_urls the rollout workers use them.",
            ge=0,
        ),
    ] = 0


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    run: Annotated[str, _meta("Run name; part of every subject.", pattern=r"^[A-Za-z0-9_-]{1,64}$")] = (
        "default"
    )
    state_dir: Annotated[str, _meta("Where broker data, the policy, logs and the lake live.")] = ".rollstream"
    log_level: Annotated[Literal["debug", "info", "warning", "error"], _meta("Log level.")] = "info"
    torch_threads: Annotated[
        int,
        _meta(
            "Intra-op threads of torch in each worker process (0 = torch's default, one per core). "
            "Several workers sharing few cores run far faster with 1: two processes each spinning "
            "two OpenMP threads on two cores made a learner step 6x slower here.",
            ge=0,
        ),
    ] = 1
    nats: NatsSettings = NatsSettings()
    policy: PolicySettings = PolicySettings()
    producer: ProducerSettings = ProducerSettings()
    rollout: RolloutSettings = RolloutSettings()
    reward: RewardSettings = RewardSettings()
    learner: LearnerSettings = LearnerSettings()
    lake: LakeSettings = LakeSettings()
    sandboxd: SandboxdSettings = SandboxdSettings()
    metrics: MetricsSettings = MetricsSettings()
    proxy: ProxySettings = ProxySettings()
    serve: ServeSettings = ServeSettings()
    eval: EvalSettings = EvalSettings()
    processes: ProcessCounts = ProcessCounts()

    def __post_init__(self) -> None:
        if self.rollout.engine == "openai" and not self.rollout.openai_urls and self.processes.serve == 0:
            raise msgspec.ValidationError(
                "rollout.engine = openai needs servers: list them in rollout.openai_urls, or set "
                "processes.serve = N for `just up` to start N rollstream serve processes."
            )
        if self.policy.lora is not None and self.learner.warm_start_steps > 0:
            raise msgspec.ValidationError(
                "policy.lora trains adapters on the base policy, but the warm start trains every "
                "weight: set learner.warm_start_steps = 0 with policy.lora."
            )

    @property
    def state(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def lake_root(self) -> Path:
        p = Path(self.lake.path)
        return p if p.is_absolute() else self.state / p

    @property
    def policy_dir(self) -> Path:
        """``policy.path`` (relative to the working directory), or the embedded tiny model's home."""
        if self.policy.path:
            return Path(self.policy.path).expanduser().resolve()
        return self.state / "policy" / "base"

    @property
    def checkpoint_root(self) -> Path:
        """The learner's checkpoints of this run."""
        return self.state / "checkpoints" / self.run

    @property
    def weights_dir(self) -> Path:
        """Where new policy versions are written for inference servers to load (shared disk)."""
        return (
            Path(self.rollout.weights_dir).resolve()
            if self.rollout.weights_dir
            else self.state / "weights" / self.run
        )

    @property
    def serve_urls(self) -> list[str]:
        """The API base URLs of the `rollstream serve` processes `just up` starts."""
        return [f"http://{self.serve.host}:{self.serve.port + k}/v1" for k in range(self.processes.serve)]

    @property
    def rollout_settings(self) -> RolloutSettings:
        """``[rollout]`` with the run's facts filled in: the weights directory, and the serve
        processes' URLs when engine = openai names no server."""
        urls = self.rollout.openai_urls or self.serve_urls
        return msgspec.structs.replace(self.rollout, weights_dir=str(self.weights_dir), openai_urls=urls)

    @property
    def nats_url(self) -> str:
        return self.nats.url or f"nats://{self.nats.host}:{self.nats.port}"


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def ack_waits(config: Config) -> dict[str, float]:
    """The ack waits ``ensure`` gives the groups that heartbeat: two of their heartbeats."""
    return {
        "rollout": ack_wait_for(config.rollout.heartbeat_s),
        "reward": ack_wait_for(config.reward.heartbeat_s),
    }


def _explain(exc: msgspec.ValidationError | msgspec.DecodeError, source: str) -> ConfigError:
    msg = str(exc)
    where = _PATH_RE.search(msg)
    section = where.group(1).replace("[", ".").replace("]", "") if where else ""
    unknown = re.search(r"unknown field `([^`]+)`", msg)
    if unknown:
        key = f"{section}.{unknown.group(1)}" if section else unknown.group(1)
        return ConfigError(
            f"{source}: unknown key `{key}`; remove it or check its spelling (see README, Configuration)."
        )
    head = _PATH_RE.sub("", msg).strip(" -")
    return ConfigError(f"{source}: {head}" + (f" (key `{section}`)" if section else ""))


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: use section.key=value, e.g. --set learner.max_staleness=1")
    key, raw = item.split("=", 1)
    try:
        value: object = msgspec.toml.decode(f"v = {raw}".encode())["v"]
    except msgspec.DecodeError:
        value = raw  # a bare string
    return key.strip().split("."), value


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (or ``rollstream.toml`` if present), apply ``section.key=value`` overrides."""
    data: dict[str, object] = {}
    source = "defaults"
    if path is None and Path("rollstream.toml").exists():
        path = Path("rollstream.toml")
    if path is not None:
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist.")
        source = str(path)
        try:
            data = msgspec.toml.decode(path.read_bytes())
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: `{k}` is not a section")
            node = child
        node[keys[-1]] = value
        source = f"{source} + --set"
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, source) from None
    problem = check_policy(config.policy, config.policy_dir)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return config


def to_toml(config: Config) -> str:
    """``config`` as TOML; keys whose value is unset (None, e.g. ``policy.lora``) are left out, as
    TOML has no null and decoding an absent key gives the same default back."""
    return msgspec.toml.encode(_without_none(msgspec.to_builtins(config))).decode()


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value
