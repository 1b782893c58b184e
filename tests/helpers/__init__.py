"""Shared test helpers (not tests): running ``ssvae`` in the test's own process."""
