"""Test suite (a package, so that plain `pytest` puts the project root on sys.path and tests can import tests.helpers)."""
