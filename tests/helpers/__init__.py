"""Small scripts the tests run in a separate process (a fresh interpreter, resource limits, kills).

Each runs from any working folder, as `python tests/helpers/NAME.py ARGS` (the tests use the
absolute path: see conftest.helper_command) or from the repository root as
`python -m tests.helpers.NAME ARGS`. They import only nnctl and the standard library.
"""
