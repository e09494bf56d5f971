"""The suite's plugins: shared fixtures (tests/support/fixtures.py), the moto S3 server
(tests/support/s3fixture.py) and the real sshd (tests/support/sshd_fixture.py). Tests are laid out as
the package is: tests/unit/<package>/ (offline, `make test-fast`) and tests/e2e/ (real services and
training processes)."""

pytest_plugins = ["tests.support.fixtures", "tests.support.s3fixture", "tests.support.sshd_fixture"]
