"""The Locust suites ``merlin-dp loadtest`` runs (shipped with the package: users run them
against their own gateway)."""
