"""The states of an adapter on a replica (part of the serving contract, lorafleet.contracts.serving). Free of any
lorafleet import, so the API models can use them without an import cycle."""

from __future__ import annotations

from typing import Literal

AdapterState = Literal["Pending", "Loading", "Loaded", "Failed"]
PENDING: AdapterState = "Pending"
LOADING: AdapterState = "Loading"
LOADED: AdapterState = "Loaded"
FAILED: AdapterState = "Failed"
ADAPTER_STATES: tuple[AdapterState, ...] = (PENDING, LOADING, LOADED, FAILED)
