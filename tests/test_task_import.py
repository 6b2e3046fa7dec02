"""Task importers (Harbor 2.0, old Terminal-Bench, SWE-style), their validation reports, task
environments built from Dockerfiles, and the maths of evaluation (pass@k, reward files)."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from consumers.task_verify import VerifierBroken, parse_reward_file, parse_test_results, swe_reward
from ops.evaluation.passk import estimate, pass_at_k
from producers.families import harbor, import_tasks, swe
from producers.families.imported import cycle, importable, prepare
from sandboxd import envhub, taskenv
from schemas.task import MAX_TASK_FILE_BYTES

TASKS = Path(__file__).parent / "data" / "tasks"
HARBOR = TASKS / "harbor"
TB1 = TASKS / "tb1"


def by_name(path: Path) -> dict[str, object]:
    return {i.name: i for i in harbor.load(path)}


def test_every_harbor_directory_imports_with_its_timeouts_resources_tests_and_solution() -> None:
    items = harbor.load(HARBOR)
    assert len(items) == 8 and all(i.ok and i.format == "harbor" for i in items), [i.problems for i in items]
    task = {i.name: i.task for i in items}["fix-script"]
    assert task is not None and task.task_id == "fix-script" and task.family == "harbor"
    assert task.agent_timeout_s == 180.0 and task.resources.writable_root
    assert task.verifier is not None and task.verifier.command == "bash /tests/test.sh"
    assert set(task.verifier.files) == {"/tests/test.sh", "/tests/cases.txt"}
    assert task.verifier.timeout_s == 30.0
    assert task.oracle is not None and set(task.oracle.files) == {"/solution/solve.sh"}
    assert "Fix it so" in task.instruction and "cases.txt" not in task.instruction
    counting = {i.name: i.task for i in items}["count-errors"]
    assert counting is not None and counting.resources.memory_mb == 256
    assert counting.metadata["category"] == "text-processing" and counting.metadata["format"] == "harbor"
    tags = {i.name: i.task for i in items}["hello-file"]
    assert tags is not None and tags.metadata["tags"] == "trivial,files"


def test_every_old_terminal_bench_directory_imports_in_each_of_its_variants() -> None:
    items = {i.name: i for i in harbor.load(TB1)}
    assert len(items) == 4 and all(i.ok and i.format == "terminal-bench" for i in items.values())
    word = items["word-count"].task
    assert word is not None and word.oracle is not None
    assert word.oracle.files["/solution/solution.sh"] == b"wc -w < /app/essay.txt > /app/count.txt\n"
    replace = items["replace-words"].task  # the oldest layout (descriptions) and a one-service compose
    assert replace is not None and replace.instruction.startswith("In every .txt file")
    rev = items["reverse-lines"].task
    assert rev is not None and rev.verifier is not None and rev.verifier.env == {"TEST_DIR": "/tests"}
    assert set(rev.verifier.files) == {"/tests/run-tests.sh", "/tests/test_outputs.sh"}
    assert rev.agent_timeout_s == 120.0 and rev.verifier.timeout_s == 30.0


@pytest.mark.parametrize(
    ("task", "file", "field", "words"),
    [
        ("harbor-no-tests", "tests/test.sh", "", "missing"),
        ("harbor-bad-field", "task.toml", "verifier.timeout_sec", "positive number"),
        ("harbor-multi-container", "environment/docker-compose.yaml", "services", "multi-container"),
        ("tb1-no-instruction", "task.yaml", "instruction", "missing"),
    ],
)
def test_a_task_that_cannot_be_imported_is_reported_with_its_file_and_field(
    task: str, file: str, field: str, words: str
) -> None:
    item = by_name(TASKS / "invalid")[task]
    assert not item.ok  # type: ignore[attr-defined]
    errors = item.errors  # type: ignore[attr-defined]
    assert [(p.file, p.field) for p in errors] == [(file, field)]
    assert words in errors[0].message


def test_a_missing_reference_solution_is_a_warning_not_an_error(tmp_path: Path) -> None:
    shutil.copytree(HARBOR / "hello-file", tmp_path / "hello-file")
    shutil.rmtree(tmp_path / "hello-file" / "solution")
    [item] = harbor.load(tmp_path / "hello-file")
    assert item.ok and item.task is not None and item.task.oracle is None
    assert [(p.file, p.severity) for p in item.problems] == [("solution/solve.sh", "warning")]


def test_test_files_beyond_the_size_a_task_may_carry_are_refused(tmp_path: Path) -> None:
    shutil.copytree(HARBOR / "hello-file", tmp_path / "big")
    (tmp_path / "big" / "tests" / "fixture.bin").write_bytes(b"x" * (MAX_TASK_FILE_BYTES + 1))
    [item] = harbor.load(tmp_path / "big")
    assert not item.ok and "at most" in item.errors[0].message and item.errors[0].file == "tests/"


def test_a_folder_entry_that_is_no_task_directory_is_named() -> None:
    items = harbor.load(TASKS)  # holds the folders harbor/, tb1/, ... which are not tasks themselves
    assert items and all(not i.ok for i in items)
    assert "neither task.toml" in items[0].errors[0].message


def test_training_streams_cycle_the_tasks_with_ids_unique_across_epochs() -> None:
    tasks = [i.task for i in harbor.load(HARBOR) if i.task is not None]
    stream = cycle(tasks, seed=3, start=0, count=20)
    assert len({t.task_id for t in stream}) == 20
    assert {t.metadata["task"] for t in stream[:8]} == {t.task_id for t in tasks}
    assert stream[9].task_id.endswith("@1") and cycle(tasks, seed=3, start=9, count=1) == [stream[9]]


def test_swe_instances_import_with_hidden_tests_and_the_gold_patch_as_files(
    swe_instances: Path, swe_cache: Path
) -> None:
    items = {i.name: i for i in swe.load(swe_instances, cache=swe_cache)}
    assert sorted(items) == ["greet-punctuation", "math-div", "math-mul"] and all(
        i.ok for i in items.values()
    )
    mul = items["math-mul"].task
    assert mul is not None and mul.verifier is not None and mul.oracle is not None
    assert mul.verifier.fail_to_pass == ["test_mul"] and mul.verifier.pass_to_pass == ["test_add", "test_sub"]
    assert b"test_mul()" in mul.verifier.files["/testbed/tests/test_math.sh"]  # after test_patch
    assert b"$1 * $2" in mul.oracle.files["/solution/files/lib/math.sh"]
    assert "test_mul" not in mul.instruction and "/testbed" in mul.instruction
    div = items["math-div"].task
    assert div is not None and div.verifier is not None and div.verifier.fail_to_pass == ["test_div"]


def test_a_bad_swe_line_is_reported_with_its_line_and_field(
    swe_instances: Path, swe_cache: Path, tmp_path: Path
) -> None:
    good = msgspec.json.decode(swe_instances.read_bytes().splitlines()[0])
    lines = [
        {k: v for k, v in good.items() if k != "problem_statement"},
        good | {"instance_id": "no-commit", "base_commit": "0" * 40},
        good | {"instance_id": "bad-patch", "patch": "--- a/nope\n+++ b/nope\n@@ -1 +1 @@\n-x\n+y\n"},
        good | {"instance_id": "no-repo", "repo": "missing-repo"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(x) for x in lines))
    shutil.copytree(swe_instances.parent / "repo", tmp_path / "repo")
    items = swe.load(path, cache=swe_cache)
    fields = [(i.errors[0].file, i.errors[0].field) for i in items]
    assert fields == [
        ("bad.jsonl:1", ""),
        ("bad.jsonl:2", "repo"),
        ("bad.jsonl:3", "patch"),
        ("bad.jsonl:4", "repo"),
    ]
    assert "problem_statement" in items[0].errors[0].message


def test_import_tasks_picks_the_importer_by_path(swe_instances: Path) -> None:
    assert {i.format for i in import_tasks(TB1)} == {"terminal-bench"}
    assert {i.format for i in import_tasks(swe_instances)} == {"swe"}


# --- environments -------------------------------------------------------------------------------


def test_from_rollstream_env_resolves_to_the_envhub_tag_and_stage_names_stay() -> None:
    text, bases = taskenv.rewrite_from("FROM rollstream-env/base AS build\nRUN true\nFROM build\n")
    tag = envhub.image_tag("base")
    assert text.splitlines()[0] == f"FROM {tag} AS build" and text.splitlines()[2] == "FROM build"
    assert bases == [tag]


def test_an_environment_is_addressed_by_its_dockerfile_and_every_context_file(tmp_path: Path) -> None:
    for name in ("a", "b"):
        shutil.copytree(HARBOR / "count-errors" / "environment", tmp_path / name)
    tag = taskenv.image_tag((tmp_path / "a" / "Dockerfile").read_bytes(), tmp_path / "a")
    assert tag == taskenv.image_tag((tmp_path / "b" / "Dockerfile").read_bytes(), tmp_path / "b")
    (tmp_path / "b" / "server.log").write_text("changed\n")
    assert tag != taskenv.image_tag((tmp_path / "b" / "Dockerfile").read_bytes(), tmp_path / "b")


def test_build_errors_name_the_step_and_show_the_tail() -> None:
    log = "Step 1/3 : FROM x\n ---> abc\nStep 2/3 : RUN make\nmake: *** no rule\n"
    log += "DEPRECATED: legacy\n   builder\n"
    assert taskenv.failing_step(log) == " at step 2/3 `RUN make`"
    assert "builder" not in taskenv.tail(log) and "no rule" in taskenv.tail(log)


@pytest.mark.docker
def test_an_unbuildable_environment_is_reported_with_its_failing_step(base_image: str) -> None:
    [item] = prepare(harbor.load(TASKS / "invalid" / "harbor-unbuildable"))
    assert not item.ok
    assert item.errors[0].file == "environment/Dockerfile"
    assert "failed at step 3/6 `RUN exit 7`" in item.errors[0].message


@pytest.mark.docker
def test_old_terminal_bench_images_never_hold_the_tests_or_the_solution(base_image: str) -> None:
    [item] = prepare(harbor.load(TB1 / "run-script"))
    assert item.ok and item.task is not None
    listing = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", item.task.image, "ls", "-A", "/app"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "greet.sh" in listing
    assert not {"tests", "run-tests.sh", "solution.sh", "task.yaml"} & set(listing), listing
    assert item.task.workdir == "/app"


@pytest.mark.docker
def test_tasks_sharing_an_environment_share_one_image(base_image: str) -> None:
    items = prepare(
        [*harbor.load(HARBOR / "hello-file"), *harbor.load(TASKS / "broken" / "harbor-wrong-oracle")]
    )
    assert all(i.ok for i in items)
    assert items[0].task is not None and items[1].task is not None
    assert items[0].task.image == items[1].task.image and items[1].build_s == 0.0
    assert importable(items) == [items[0].task, items[1].task]


# --- evaluation maths ---------------------------------------------------------------------------


def test_pass_at_k_matches_hand_computed_values() -> None:
    # n = 5 attempts, c = 2 passed, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    assert math.isclose(pass_at_k(5, 2, 2), 0.7)
    # k = 1 is the pass rate; n - c < k means some draw of k always holds a pass
    assert math.isclose(pass_at_k(10, 5, 1), 0.5) and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0 and math.isclose(pass_at_k(4, 1, 4), 1.0)
    # n = 4, c = 1, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    assert math.isclose(pass_at_k(4, 1, 2), 0.5)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_the_task_set_estimate_is_the_mean_over_tasks_with_an_interval_around_it() -> None:
    est = estimate({"a": [True, False, False, False], "b": [True] * 4, "c": [False] * 4}, 2)
    assert math.isclose(est.value, (0.5 + 1.0 + 0.0) / 3) and est.tasks == 3
    assert 0.0 <= est.low < est.value < est.high <= 1.0
    perfect = estimate({str(i): [True] for i in range(12)}, 1)
    assert perfect.value == 1.0 and perfect.high == 1.0 and 0.6 < perfect.low < 0.9


def test_reward_files_give_text_json_and_partial_rewards_and_refuse_garbage() -> None:
    assert parse_reward_file("/logs/verifier/reward.txt", b"0.3333\n") == pytest.approx(0.3333)
    assert parse_reward_file("/logs/verifier/reward.json", b'{"reward": 0.75}') == 0.75
    assert parse_reward_file("/logs/verifier/reward.json", b'{"tests": 1, "style": 0.5}') == 0.75
    assert parse_reward_file("/logs/verifier/reward.json", b"1") == 1.0
    for bad in (b"yes", b"nan", b'{"reward": "high"}'):
        with pytest.raises(VerifierBroken):
            parse_reward_file("/logs/verifier/reward.json" if bad.startswith(b"{") else "/x/reward.txt", bad)


def test_swe_reward_needs_every_fail_to_pass_fixed_and_no_pass_to_pass_broken() -> None:
    results = parse_test_results("PASSED test_mul\nFAILED test_sub\nPASSED test_add\nnoise line\n")
    assert results == {"test_mul": True, "test_sub": False, "test_add": True}
    assert swe_reward(results, ["test_mul"], ["test_add"]).reward == 1.0
    assert swe_reward(results, ["test_mul"], ["test_add", "test_sub"]).reward == 0.0
    assert swe_reward(results, ["test_mul", "test_missing"], []).reward == 0.0
    assert "still failing: test_missing" in swe_reward(results, ["test_missing"], []).output


def test_a_repository_given_by_url_is_cloned_once_into_the_cache(swe_instances: Path, tmp_path: Path) -> None:
    lines = [msgspec.json.decode(line) for line in swe_instances.read_bytes().splitlines()]
    url = (swe_instances.parent / "repo").resolve().as_uri()  # file://: a clone without a network
    path = tmp_path / "url.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(line | {"repo": url}) for line in lines))
    items = swe.load(path, cache=tmp_path / "cache")
    assert [i.ok for i in items] == [True, True, True]
    assert len(list((tmp_path / "cache" / "repos").iterdir())) == 1
    assert items[0].task is not None and items[0].task.metadata["repo"] == url
