"""A tiny local lmms-eval task pair for the plugin test (needs lmms-eval: `make test-lmms`).

``ov3_tiny_yesno`` (generate_until) and ``ov3_tiny_choice`` (multiple_choice → loglikelihood) over 4 images of the
llava test world, read with HF ``datasets``' local ``json`` builder — nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llava_bridge.lmms_plugin import MODEL_ID, manifest

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    return {"acc": float(results[0].strip().lower().startswith(doc["answer"]))}
'''

YESNO = """task: ov3_tiny_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function ov3_tiny_utils.doc_to_visual
doc_to_text: !function ov3_tiny_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
process_results: !function ov3_tiny_utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

CHOICE = """task: ov3_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function ov3_tiny_utils.doc_to_visual
doc_to_text: !function ov3_tiny_utils.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(world: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(world["scenes"][:4]):
        answer = "yes" if i % 2 == 0 else "no"
        shape = s["shape"] if answer == "yes" else ("square" if s["shape"] == "circle" else "circle")
        rows.append({"question_id": i, "image": str(world["images"] / s["image"]), "answer": answer,
                     "label": 0 if answer == "yes" else 1, "question": f"Is there a {shape} in the image?"})
    data = out / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "ov3_tiny_utils.py").write_text(UTILS)
    (out / "ov3_tiny_yesno.yaml").write_text(YESNO.format(data=data))
    (out / "ov3_tiny_choice.yaml").write_text(CHOICE.format(data=data))
    return out


def run_tiny_task(model_dir: str, world: dict, tmp: Path) -> dict:
    """Evaluate ``model_dir`` through lmms-eval's registry (model name ``openvision3_llava``): the generate_until
    task end to end with ``simple_evaluate``; loglikelihood with the requests lmms-eval builds for the
    multiple-choice task (its evaluator stringifies tuple results in 0.7.3, see llava_bridge/README.md)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "hf_datasets"))
    from lmms_eval.api.instance import Instance
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model
    from lmms_eval.tasks import TaskManager, get_task_dict


    via_entry_point = MODEL_ID in MODEL_REGISTRY_V2.list_model_names()
    if not via_entry_point:  # the project is not pip-installed in this interpreter: register by hand
        MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    tasks = write_tasks(world, tmp / "tasks")
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    res = simple_evaluate(model=MODEL_ID, model_args=f"pretrained={model_dir},device=cpu",
                          tasks=["ov3_tiny_yesno"], task_manager=tm, batch_size=1, log_samples=True)
    out = {"via_entry_point": via_entry_point, "n": len(res["samples"]["ov3_tiny_yesno"]),
           "accuracy": res["results"]["ov3_tiny_yesno"]["acc,none"]}
    # loglikelihood with lmms-eval's own request layout for a multiple-choice task
    task = get_task_dict(["ov3_tiny_choice"], tm)["ov3_tiny_choice"]
    lm = get_model(MODEL_ID).create_from_arg_string(f"pretrained={model_dir},device=cpu")
    lm.task_dict = {"ov3_tiny_choice": task.dataset}
    reqs = []
    for doc_id, doc in enumerate(task.test_docs()):
        ctx = task.doc_to_text(doc)
        reqs += task.construct_requests(doc_id, ctx, metadata={"task": "ov3_tiny_choice", "doc_id": doc_id,
                                                               "repeats": 1, "split": "test"})
    assert all(isinstance(r, Instance) and r.request_type == "loglikelihood" for r in reqs)
    lls = lm.loglikelihood(reqs)
    out["n_choice"] = len(reqs) // 2
    out["choice_accuracy"] = sum(
        (lls[2 * i][0] > lls[2 * i + 1][0]) == (doc["label"] == 0) for i, doc in enumerate(task.test_docs())
    ) / out["n_choice"]
    out["loglikelihoods"] = [(round(a, 4), b) for a, b in lls]
    return out
