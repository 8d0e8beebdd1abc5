"""The task / suite format: loading, defaults, and one precise message for every kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergescale.errors import TaskError
from mergescale.evaluate import Suite, load_suite, load_task, load_tasks
from mergescale.evaluate.tasks import MultipleChoiceRow

GOOD_ROW = {"context": "a b c", "choices": ["x", "y"], "gold": 1}


def make_task(
    tmp_path: Path, spec_text: str, rows: list[str] | None = None, name: str = "test.jsonl"
) -> Path:
    (tmp_path / name).write_text("\n".join(rows if rows is not None else [json.dumps(GOOD_ROW)]) + "\n")
    path = tmp_path / "task.yaml"
    path.write_text(spec_text)
    return path


SPEC = "name: t1\ncategory: cat\nkind: multiple_choice\ndata: {test: test.jsonl}\n"


def test_suite_loads_with_sets_defaults_and_row_counts(suite_dir: Path) -> None:
    suite = load_suite(suite_dir / "suite.yaml")
    assert isinstance(suite, Suite) and suite.name == "tiny"
    assert [t.name for t in suite.held_in] == ["mc_a", "gen"]
    assert [t.name for t in suite.held_out] == ["mc_b", "ppl"]
    assert [t.name for t in suite.tasks] == ["mc_a", "gen", "mc_b", "ppl"]
    assert suite.split_of("ppl") == "held_out" and suite.split_of("gen") == "held_in"
    mc_a, gen, mc_b, ppl = suite.tasks
    assert mc_a.metrics == ["acc", "acc_norm"] and mc_a.primary_metric == "acc"
    assert mc_b.primary_metric == "acc_norm" and mc_b.num_fewshot == 2
    assert gen.metrics == ["exact_match", "f1", "rouge_l"] and gen.generation.stop == ["."]
    assert ppl.metrics == ["loss", "ppl"]
    assert mc_b.validate_data() == {"train": 15, "validation": 5, "test": 30}
    # a folder holding suite.yaml is the suite; a task folder gives its tasks
    assert [t.name for t in load_tasks(suite_dir)] == ["mc_a", "gen", "mc_b", "ppl"]
    assert [t.name for t in load_tasks(suite_dir / "mc_b")] == ["mc_b"]
    with pytest.raises(TaskError, match="no task 'nope'; available: mc_a, gen, mc_b, ppl"):
        suite.task("nope")


def test_extra_row_fields_are_kept_and_category_defaults_to_name(tmp_path: Path) -> None:
    row = {**GOOD_ROW, "id": "q17", "source": {"template": 3}}
    task = load_task(make_task(tmp_path, "name: t1\ndata: {test: test.jsonl}\n", [json.dumps(row)]))
    assert task.category == "t1" and task.kind == "multiple_choice"
    (parsed,) = task.rows()
    assert isinstance(parsed, MultipleChoiceRow) and parsed.gold == 1
    assert parsed.model_extra == {"id": "q17", "source": {"template": 3}}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"context": "a", "choices": ["x", "y"]},
            "test.jsonl:2: field 'gold': missing (a multiple_choice row needs: context, choices, gold)",
        ),
        (
            {"context": "a", "choices": ["x", "y"], "gold": 2},
            "test.jsonl:2: field '(row)': gold 2 is out of range for 2 choices (0..1)",
        ),
        (
            {"context": "a", "choices": ["x", "y"], "gold": -1},
            "test.jsonl:2: field '(row)': gold -1 is out of range",
        ),
        (
            {"context": "a", "choices": [], "gold": 0},
            "test.jsonl:2: field 'choices': List should have at least 1 item",
        ),
        (
            {"context": "a", "choices": ["x", ""], "gold": 0},
            "test.jsonl:2: field 'choices': choice 1 is an empty string",
        ),
        (
            {"context": "a", "choices": ["x", "y"], "gold": "1"},
            "test.jsonl:2: field 'gold': Input should be a valid integer",
        ),
        (
            {"context": 3, "choices": ["x"], "gold": 0},
            "test.jsonl:2: field 'context': Input should be a valid string",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, row: dict, message: str) -> None:
    path = make_task(tmp_path, SPEC, [json.dumps(GOOD_ROW), json.dumps(row)])
    with pytest.raises(TaskError) as err:
        load_task(path)
    assert message in str(err.value)
    assert str(tmp_path / "test.jsonl") in str(err.value)


def test_bad_json_line_and_non_object_line(tmp_path: Path) -> None:
    path = make_task(
        tmp_path, SPEC, [json.dumps(GOOD_ROW), "", '{"context": "a", "choices": ["x"], "gold": 0']
    )
    with pytest.raises(TaskError, match=r"test\.jsonl:3: invalid JSON: Expecting ',' delimiter"):
        load_task(path)
    path = make_task(tmp_path, SPEC, ["[1, 2]"])
    with pytest.raises(TaskError, match=r"test\.jsonl:1: expected a JSON object, got list"):
        load_task(path)
    path = make_task(tmp_path, SPEC, [""])
    with pytest.raises(TaskError, match=r"test\.jsonl: data file has no rows"):
        load_task(path)


def test_generation_and_perplexity_rows(tmp_path: Path) -> None:
    spec = "name: g\nkind: generation\ndata: {test: test.jsonl}\n"
    path = make_task(tmp_path, spec, ['{"prompt": "p", "references": []}'])
    with pytest.raises(
        TaskError, match=r"test\.jsonl:1: field 'references': List should have at least 1 item"
    ):
        load_task(path)
    spec = "name: p\nkind: perplexity\ndata: {test: test.jsonl}\n"
    path = make_task(tmp_path, spec, ['{"text": "hello"}', '{"txt": "x"}'])
    with pytest.raises(
        TaskError, match=r"test\.jsonl:2: field 'text': missing \(a perplexity row needs: text\)"
    ):
        load_task(path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("name: t1\ncategory: c\n", "task.yaml: field 'data': missing"),
        (
            "name: t1\nkind: ranking\ndata: {test: test.jsonl}\n",
            "task.yaml:2: field 'kind': Input should be 'multiple_choice', 'generation' or 'perplexity'",
        ),
        (
            "name: t1\ndata: {test: test.jsonl}\nmetrics: [acc, bleu]\n",
            "task.yaml:3: field 'metrics': 'bleu' is not available for kind multiple_choice; available: acc, acc_norm",
        ),
        (
            "name: t1\ndata: {test: test.jsonl}\nnum_fewshot: 2\n",
            "task.yaml:3: field 'num_fewshot': is 2 but data has no train file",
        ),
        (
            "name: t1\ndata: {test: test.jsonl}\nnum_fewshot: -1\n",
            "task.yaml:3: field 'num_fewshot': Input should be greater than or equal to 0",
        ),
        ("name: t1\ndata: {test: test.jsonl}\ncolour: red\n", "task.yaml:3: field 'colour': unknown field"),
        (
            "name: t1\ndata:\n  test: test.jsonl\n  dev: d.jsonl\n",
            "task.yaml:4: field 'data.dev': unknown field",
        ),
        ("name: t1\ndata: {test: missing.jsonl}\n", "task.yaml:2: field 'data.test': file not found"),
        (
            "name: bad name\ndata: {test: test.jsonl}\n",
            "task.yaml:1: field 'name': String should match pattern",
        ),
        ("name: t1\ndata: {test: [unclosed\n", "task.yaml:3: invalid YAML"),
        ("- just\n- a list\n", "task.yaml: a task file must be a YAML mapping"),
    ],
)
def test_bad_task_files_name_file_line_and_field(tmp_path: Path, spec: str, message: str) -> None:
    path = make_task(tmp_path, spec)
    with pytest.raises(TaskError) as err:
        load_task(path)
    assert message in str(err.value), str(err.value)


def test_fewshot_needs_enough_train_rows(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    path = make_task(tmp_path, "name: t1\ndata: {test: test.jsonl, train: train.jsonl}\nnum_fewshot: 3\n")
    with pytest.raises(
        TaskError, match="field 'num_fewshot': 3 examples asked for but train has only 1 rows"
    ):
        load_task(path)


def test_bad_suites(tmp_path: Path) -> None:
    make_task(tmp_path, SPEC)
    suite = tmp_path / "suite.yaml"
    suite.write_text("held_in: [task.yaml]\nheld_out: [task.yaml]\n")
    with pytest.raises(TaskError, match="task name 't1' appears twice"):
        load_suite(suite)
    suite.write_text("held_in:\n  - task.yaml\n  - nothere.yaml\n")
    with pytest.raises(TaskError, match=r"suite\.yaml:3: field 'held_in\[1\]': no such task file or folder"):
        load_suite(suite)
    suite.write_text("held_in: [task.yaml]\nheldout: []\n")
    with pytest.raises(TaskError, match=r"suite\.yaml:2: field 'heldout': unknown field"):
        load_suite(suite)
    suite.write_text("name: empty\n")
    with pytest.raises(TaskError, match="the suite lists no tasks"):
        load_suite(suite)
    with pytest.raises(TaskError, match="no such task file, folder or suite"):
        load_tasks(tmp_path / "missing")


def test_fingerprint_follows_data_bytes(tmp_path: Path) -> None:
    path = make_task(tmp_path, SPEC)
    first = load_task(path).fingerprint()
    assert load_task(path).fingerprint() == first
    (tmp_path / "test.jsonl").write_text(json.dumps({**GOOD_ROW, "gold": 0}) + "\n")
    assert load_task(path).fingerprint() != first


def test_suite_yaml_written_by_hand_round_trips(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    make_task(a, SPEC)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"held_out": ["a"]}))
    suite = load_suite(tmp_path)
    assert suite.held_in == [] and [t.name for t in suite.held_out] == ["t1"]
    assert suite.name == tmp_path.name
