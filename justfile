# rollstream's everyday commands. `just` alone lists them.
# Every recipe calls the `rollstream` console script of the project's virtualenv.

set positional-arguments

venv := justfile_directory() / ".venv"
rs := venv / "bin/rollstream"
py := venv / "bin/python"

# List the recipes
default:
    @{{just_executable()}} --list --unsorted

# Start the broker and every worker; show progress until Ctrl-C (extra args go to `rollstream up`)
up *args:
    {{rs}} up "$@"

# Stop everything `just up` started: no process and no sandbox container is left
down:
    {{rs}} down

# Per-group processes, backlog, redeliveries, policy version and lake totals
status:
    {{rs}} status

# SQL over the trajectory lake, e.g. just query "SELECT count(*) FROM trajectories"
query sql *args:
    {{rs}} query "$@"

# Change process counts of a running deployment, e.g. just scale rollout=3 reward=2
scale +counts:
    {{rs}} scale "$@"

# Follow the workers' logs (JSON lines under .rollstream/logs)
logs:
    tail -n 20 -F .rollstream/logs/*.log

# Build a sandbox environment image from sandboxd/envs/NAME.toml
env-build name:
    {{rs}} env build {{name}}

# Lint (ruff) and type-check (mypy, strict on every package; tests are not type-checked)
lint:
    {{venv}}/bin/ruff check .
    {{venv}}/bin/ruff format --check .
    {{venv}}/bin/mypy schemas streams sandboxd agent_harness consumers producers learner ops

# The whole test suite (real nats-server, real Docker, real torch), after lint
test *args: lint
    {{venv}}/bin/pytest -q "$@"

# Regenerate requirements.lock (pip constraints for bootstrap.sh and CI) from the resolved .venv
lock:
    { sed -n '1,3p' requirements.lock; {{venv}}/bin/pip freeze --exclude-editable | grep -v -i '^torch=='; } > requirements.lock.new
    mv requirements.lock.new requirements.lock

# Write PNG plots and a summary of the lake to ./report
report *args:
    {{rs}} report "$@"

# Transport benchmark: typed layer vs raw nats-py on one server
bench-transport:
    {{py}} -m ops.bench.transport

# Sandbox benchmark: cold start, warm acquire, session vs docker exec round trip, 64 at once
bench-sandbox:
    {{py}} -m ops.bench.sandbox

# Rollout benchmark: episodes/s and tokens/s per worker by concurrency, harness overhead
bench-rollout:
    {{py}} -m ops.bench.rollout

# Asynchrony benchmark: samples/s, learner idle and staleness at eta = 0, 1, 2, 4
bench-async:
    {{py}} -m ops.bench.async_bench

# Lake benchmark: ingest rate and query latency over 1M+ chunk rows
bench-lake:
    {{py}} -m ops.bench.lake

# Model benchmark (issue 13): per architecture and dtype, generation tokens/s (batched, KV cache) and learner samples/s; then the engine sections (weight publish+fetch per version, full vs LoRA; openai engine via rollstream serve vs in-process torch at concurrency 8)
bench-models *args:
    {{py}} -m ops.bench.models {{args}}
    {{py}} -m ops.bench.engines

# Only the engine sections of bench-models
bench-engines:
    {{py}} -m ops.bench.engines

# Learning demonstration on the blind-shortcut family: expert seed, SFT warm start, then online IPA, GRPO and IPA without failure IS (~45 min)
demo *args:
    {{py}} -m ops.demo "$@"

# The ablation of `just demo`: IPA, token-level GRPO and IPA w/o failure IS, three seeds each from one warm start, 256 trained samples per run (~80 min)
demo-ablation *args:
    {{py}} -m ops.demo --online-seeds 0,1,2 --online-samples 256 --minutes 88 --out demo-ablation-out "$@"

# Learning demonstration on a GEM game (GuessTheNumber-easy): random floor, noisy expert, SFT warm start, online IPA (~45 min)
demo-gem *args:
    {{py}} -m ops.demo_gem "$@"

# Chaos run: `rollstream up` while rollout, reward, lake and learner workers are SIGKILLed in turn, then drain and audit the lake
chaos kills="20" interval="6":
    {{py}} -m ops.chaos --kills {{kills}} --interval {{interval}}
