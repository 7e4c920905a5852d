"""The trainer that runs inside a FineTuneJob's Job: `python -m lorafleet.trainer --config FILE`.

Nothing heavy is imported here: the operator imports lorafleet.trainer.errors and .status, which must stay
free of torch.
See docs/trainer.md.
"""
