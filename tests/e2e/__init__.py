"""End-to-end tests on one local Ray + Serve, started for this package and stopped after its last test
(so its idle replicas do not share the cores with the tests that follow)."""
