"""Shared pytest plugins."""

pytest_plugins = ["tests.integration.operator_fixtures"]
