"""Shared pytest plugins: the fixtures of each real component live in a module of their own."""

pytest_plugins = [
    "tests.integration.operator_fixtures",
    "tests.s3_fixtures",
    "tests.trainer_fixtures",
    "tests.serving_fixtures",
]
