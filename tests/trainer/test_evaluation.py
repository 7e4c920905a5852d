"""The trainer's task evaluation (config.evaluation) with real torch on the tiny model.

Invariants:
* end to end (the trainer CLI, MinIO as the store): a LoRA fine-tuned on a small learnable task (the last of a few
  digits) beats its random base on held-out examples it never trained on, on every metric (higher; lower for
  evalLoss and perplexity); the manifest carries the evaluation, the predictions file is part of the published
  version with its sha256 in the manifest, and the report carries the same numbers and the tokens trained;
* a bad evaluation setting (a template field the samples lack, a regex that does not compile or matches no
  reference, no held-out data) fails before the model is loaded, with exit code 2 and a reason naming it;
* held-out samples are evaluation.uri's followed by the dataset's evalSplit samples (never training samples);
* default prompts are the training formats with a generation prompt (the real chat template);
* the base model is the same peft model with its adapter disabled: a fresh LoRA (B = 0) gives the base's answers
  and loss; batched left-padded generation answers as one prompt at a time does; the reference loss is the
  model's own mean token cross-entropy.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorafleet.contracts.evaluation import EVALUATION_KEY, PREDICTIONS_FILE
from lorafleet.contracts.exits import CONFIG_INVALID, DATASET_INVALID, EXIT_INVALID_INPUT
from lorafleet.contracts.trainer import Evaluation, TrainerReport
from lorafleet.trainer.errors import TrainerError
from tests.s3_fixtures import s3_bucket, s3_server  # noqa: F401
from tests.trainer_fixtures import TrainerEnv, need_training_stack, tiny_model_dir, write_jsonl  # noqa: F401

ALL_METRICS = [
    "exactMatch",
    "normalizedExactMatch",
    "contains",
    "rougeL",
    "regexAccuracy",
    "jsonValid",
    "evalLoss",
    "perplexity",
]


def last_digit_samples(count: int, seed: int) -> list[dict[str, str]]:
    """'Last of: 3 9 4 7\\nAnswer:' -> ' 7': learnable by a LoRA on the tiny model, and it generalises to unseen
    sequences (the answer copies the token before the newline)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
        samples.append({"prompt": f"Last of: {' '.join(digits)}\nAnswer:", "completion": f" {digits[-1]}"})
    return samples


# -- end to end --------------------------------------------------------------------------------------------------


def test_adapter_beats_its_base_and_the_result_travels_with_the_artifact(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    s3_server: Any,  # noqa: F811
    s3_bucket: str,  # noqa: F811
) -> None:
    from lorafleet.storage import ArtifactStore, version_folder

    store = ArtifactStore(s3_server.store_settings())
    train = last_digit_samples(200, seed=0)
    held = last_digit_samples(40, seed=1)
    held = [s for s in held if s["prompt"] not in {t["prompt"] for t in train}]  # never seen in training
    for key, rows in (("datasets/train.jsonl", train), ("datasets/held.jsonl", held)):
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        store.client.put_object(Bucket=s3_bucket, Key=key, Body=body)

    env = TrainerEnv(tmp_path, tiny_model_dir)
    config = env.config(
        train, dataset={"format": "completion"}, maxSteps=100, batchSize=8, learningRate=5e-3, checkpointInterval=1000
    )
    config.dataset.uri = f"s3://{s3_bucket}/datasets/train.jsonl"
    config.output.uri = f"s3://{s3_bucket}/lorafleet"
    config.output.checkpoint_uri = f"s3://{s3_bucket}/lorafleet/checkpoints/tests/run"
    config.evaluation = Evaluation.model_validate(
        {
            "uri": f"s3://{s3_bucket}/datasets/held.jsonl",
            "metrics": ALL_METRICS,
            "generation": {"maxNewTokens": 6},
            "samplePredictions": 5,
        }
    )
    path = env.write_config(config)
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.trainer", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**_base_env(), **s3_server.env(), "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = TrainerReport.model_validate(env.status(config))
    assert report.evaluation is not None and report.artifact is not None
    assert report.tokens_trained is not None and report.tokens_trained > 0
    result = report.evaluation
    assert result.examples == len(held) and set(result.metrics) == set(ALL_METRICS)
    for name, m in result.metrics.items():
        assert m.base is not None and m.adapter is not None, name
        better = m.adapter < m.base if name in ("evalLoss", "perplexity") else m.adapter > m.base
        assert better, f"{name}: adapter {m.adapter} vs base {m.base}"
        assert m.examples == len(held)
    assert result.metrics["perplexity"].adapter == pytest.approx(math.exp(result.metrics["evalLoss"].adapter), 1e-4)

    folder = version_folder(config.output.uri, "adapter", "run", "v1")
    manifest, digest = store.verify(folder)  # every file, the predictions too, against its sha256
    assert digest == report.artifact.digest
    assert manifest.to_json_obj()[EVALUATION_KEY] == result.wire()
    entry = manifest.file(PREDICTIONS_FILE)
    pulled = tmp_path / "pulled"
    store.pull(folder, pulled, digest=digest)
    predictions = (pulled / PREDICTIONS_FILE).read_bytes()
    assert hashlib.sha256(predictions).hexdigest() == entry.sha256
    rows = [json.loads(line) for line in predictions.decode().splitlines()]
    assert len(rows) == 5 and result.predictions_file == PREDICTIONS_FILE
    assert [r["reference"] for r in rows] == [s["completion"] for s in held[:5]]
    assert all({"prompt", "base", "adapter", "source", "line"} <= r.keys() for r in rows)


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "LORAFLEET_LOCAL_STORE"}


# -- failing before training -------------------------------------------------------------------------------------


def _evaluating(env: TrainerEnv, **evaluation: Any) -> Any:
    config = env.config(last_digit_samples(20, 0), dataset={"format": "completion"}, name="bad")
    held = env.dataset([{"question": "Last of: 1 2", "answer": "2"}], "held.jsonl")
    config.evaluation = Evaluation.model_validate({"uri": held, **evaluation})
    return config


def test_a_template_field_the_samples_lack_fails_before_training(trainer_env: TrainerEnv) -> None:
    from tests.trainer_fixtures import cli

    config = _evaluating(trainer_env, promptTemplate="{question} {context}", referenceField="answer")
    proc = cli(trainer_env, config)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INVALID_INPUT, err
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert "start" not in events  # the model was never loaded, nothing trained
    report = TrainerReport.model_validate(trainer_env.status(config))
    assert report.error is not None and report.error.reason == DATASET_INVALID
    assert 'missing field "context" used by evaluation.promptTemplate' in (report.error.message or "")


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"metrics": ["regexAccuracy"], "answerPattern": "(\\d"}, "is not a valid regular expression"),
        ({"metrics": ["regexAccuracy"], "answerPattern": "[a-z]{9}"}, "matches none of the 1 references"),
        ({"promptTemplate": "{0.__class__}"}, "is not a plain field name"),
    ],
)
def test_bad_settings_are_config_invalid(trainer_env: TrainerEnv, evaluation: dict[str, Any], message: str) -> None:
    from lorafleet.trainer.train import validate

    config = _evaluating(trainer_env, **{"referenceField": "answer", "promptTemplate": "{question}", **evaluation})
    with pytest.raises(TrainerError) as raised:
        validate(config, sink=trainer_env.sink(config))
    assert raised.value.reason == CONFIG_INVALID and raised.value.exit_code == EXIT_INVALID_INPUT
    assert message in raised.value.message


def test_evaluation_needs_held_out_samples(trainer_env: TrainerEnv) -> None:
    from lorafleet.trainer.train import validate

    config = trainer_env.config(last_digit_samples(20, 0), dataset={"format": "completion"})
    config.evaluation = Evaluation()
    with pytest.raises(TrainerError, match="evaluation needs held-out samples") as raised:
        validate(config, sink=trainer_env.sink(config))
    assert raised.value.reason == CONFIG_INVALID


# -- held-out samples and prompts --------------------------------------------------------------------------------


def test_held_out_samples_are_the_evaluation_file_then_the_eval_split(trainer_env: TrainerEnv) -> None:
    from lorafleet.trainer.model import load_tokenizer
    from lorafleet.trainer.train import load_datasets, prepare_evaluation

    train = last_digit_samples(40, 0)
    config = trainer_env.config(train, dataset={"format": "completion", "evalSplit": 0.25})
    held = trainer_env.dataset(last_digit_samples(3, 9), "held.jsonl")
    config.evaluation = Evaluation.model_validate({"uri": held, "maxExamples": 100})
    sink = trainer_env.sink(config)
    tokenizer = load_tokenizer(config)
    datasets = load_datasets(config, tokenizer, sink, Path(config.work_dir))
    prepared = prepare_evaluation(config, tokenizer, sink, datasets)
    assert prepared is not None
    sources = [(e.source, e.line) for e in prepared.examples]
    split_lines = sorted(e.line for e in datasets.eval)
    assert sources == [(held, 1), (held, 2), (held, 3)] + [(config.dataset.uri, n) for n in split_lines]
    trained = {e.line for e in datasets.train}
    assert not trained & set(split_lines)
    assert [e.reference for e in prepared.examples[3:]] == [train[n - 1]["completion"] for n in split_lines]

    config.evaluation.max_examples = 2
    assert len(prepare_evaluation(config, tokenizer, sink, datasets).examples) == 2  # type: ignore[union-attr]


def test_default_prompts_are_the_training_formats_with_a_generation_prompt(tiny_model_dir: Path) -> None:  # noqa: F811
    need_training_stack()
    from transformers import AutoTokenizer

    from lorafleet.contracts.trainer import Dataset
    from lorafleet.evaluation import prompts

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    spec = Evaluation()
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    example = prompts.example(chat, spec, Dataset(uri="s3://bucket/x", format="chat"), tokenizer, None)
    expected = tokenizer.apply_chat_template(chat["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert example.prompt == expected and example.prompt.endswith("<|im_start|>assistant\n")
    assert example.reference == "Rome." and not example.add_special_tokens

    instruction = Dataset(uri="s3://bucket/x", format="instruction")
    record = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    example = prompts.example(record, spec, instruction, tokenizer, None)
    user = [{"role": "user", "content": "Add.\n\n2 and 3"}]
    assert example.prompt == tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = None
    example = prompts.example(record, spec, instruction, tokenizer, None)
    assert example.prompt == "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert example.reference == "5" and example.add_special_tokens


# -- the backend -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir: Path) -> tuple[Any, Any]:  # noqa: F811
    need_training_stack()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, lora), tokenizer


def _examples(count: int) -> list[Any]:
    from lorafleet.evaluation.prompts import EvalExample

    return [
        EvalExample(s["prompt"], s["completion"], True, "s3://bucket/held.jsonl", i + 1)
        for i, s in enumerate(last_digit_samples(count, 3))
    ]


def test_a_fresh_adapter_is_its_base_and_a_trained_one_is_not(peft_model: tuple[Any, Any]) -> None:
    import torch

    from lorafleet.api.evaluation import GenerationSettings
    from lorafleet.evaluation.generate import TransformersBackend

    model, tokenizer = peft_model
    backend = TransformersBackend(model, tokenizer, max_length=64)
    examples, settings = _examples(6), GenerationSettings(max_new_tokens=4)
    assert backend.generate(examples, settings, adapter=True) == backend.generate(examples, settings, adapter=False)
    assert backend.reference_loss(examples, adapter=True) == pytest.approx(
        backend.reference_loss(examples, adapter=False)
    )
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        assert backend.reference_loss(examples, adapter=True) != pytest.approx(
            backend.reference_loss(examples, adapter=False)
        )
    finally:
        model.load_state_dict(state, strict=False)


def test_batched_generation_answers_as_one_prompt_at_a_time(peft_model: tuple[Any, Any]) -> None:
    from lorafleet.api.evaluation import GenerationSettings
    from lorafleet.evaluation.generate import TransformersBackend

    model, tokenizer = peft_model
    examples = _examples(7)  # prompts of different lengths: left padding in a batch
    assert len({len(tokenizer(e.prompt)["input_ids"]) for e in examples}) > 1
    settings = GenerationSettings(max_new_tokens=5, stop=["Last"])
    batched = TransformersBackend(model, tokenizer, max_length=64, batch_size=4).generate(
        examples, settings, adapter=False
    )
    alone = TransformersBackend(model, tokenizer, max_length=64, batch_size=1).generate(
        examples, settings, adapter=False
    )
    assert batched == alone
    assert all("Last" not in answer for answer in batched)


def test_the_reference_loss_is_the_models_mean_token_cross_entropy(peft_model: tuple[Any, Any]) -> None:
    import torch

    from lorafleet.evaluation.generate import TransformersBackend

    model, tokenizer = peft_model
    example = _examples(1)[0]
    prompt_ids = tokenizer(example.prompt)["input_ids"]
    ids = tokenizer(example.prompt + example.reference)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the reference's tokens follow the prompt's
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)
    loss = TransformersBackend(model, tokenizer, max_length=64).reference_loss([example], adapter=True)
    assert loss == pytest.approx(expected, rel=1e-5)
