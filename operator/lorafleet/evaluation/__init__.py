"""Task evaluation in the trainer: after training, the base model and the adapter answer the same held-out prompts
and both are scored (issue #17). Free of torch except generate.py and run.py.

* metrics.py: the metrics, pure functions of (answer, reference), each with its exact definition;
* prompts.py: the held-out samples as (prompt, reference) pairs: a tenant's template, the chat template or the
  training formats;
* generate.py: batched generation and the reference's loss, with transformers (a vLLM backend would fit there);
* run.py: the sequence, returning the EvaluationResult (lorafleet.contracts.evaluation) and sample predictions.
"""
