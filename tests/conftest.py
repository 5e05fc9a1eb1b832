"""Shared pytest set-up: fixtures for the local servers live in localcluster.pytest_plugin."""

pytest_plugins = ["localcluster.pytest_plugin"]
