"""Typed contracts between the operator and its pods, each declared once.

| Module | Contract | Writer -> reader |
|---|---|---|
| `trainer` | `TrainerConfig` (ConfigMap `trainer.json`) | operator -> trainer pod |
| `trainer` | `TrainerReport` (termination message) | trainer pod -> operator |
| `trainer` | `TrainerProgress` (pod annotation `lorafleet.io/progress`) | trainer pod -> operator |
| `serving` | `DesiredAdapterSet` (ConfigMap `adapters.json`) | operator -> adapter-sync sidecar |
| `serving` | `ReplicaState` (`GET /lorafleet/state`) | sidecar -> operator |
| `exits` | exit codes and reasons of the trainer | trainer pod -> Job controller, operator |

Every contract is a pydantic model with a `version` field. Readers ignore unknown fields (an older pod and a
newer operator, or the reverse, keep working) and accept any version; writers emit the current one
(`base.Contract`). Torch-free: the operator imports all of this.
"""
